"""The `popek` command trusts only popek: impostor servers, PYTHONPATH, a planted PATH.

A root ``popek`` hands its environment and its terminal to whatever answers on
the command socket, and signals the pid that answer names.  Here a listener
run as ``nobody`` stands on the socket (``POPEK_CLI_SOCKET`` pointing at it),
reads all it is sent and answers as a server would (``P<pid>`` of a victim
process, then a fake exit code); the native client and the Python launcher
must send it nothing, signal nothing, and refuse with one line.  Then a
``sitecustomize`` on ``PYTHONPATH`` and a fake ``nft``/``ip``/``dnsmasq`` first
on ``PATH`` must not run inside a root command.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import popek
from framework.events import read_line
from popek.cli import client

NOBODY = 65534
SECRET = "h3-impostor-secret-4f1c"

#: stands on the socket as ``nobody``: reports what it got, answers as a server would
IMPOSTOR = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1)
print("listening", flush=True)
conn, _ = s.accept()
conn.settimeout(30)
got, fds = b"", 0
try:
    while True:
        data, anc, _, _ = conn.recvmsg(1 << 20, socket.CMSG_SPACE(64))
        fds += sum(len(payload) // 4 for _, _, payload in anc)
        if not data:
            break
        got += data
except OSError:
    pass
try:  # the attack: make the client signal a victim's pid and exit with a code we chose
    conn.sendall(b"P%s\\nX0\\n" % sys.argv[2].encode())
    answered = True
except OSError:
    answered = False
print(json.dumps({"accepted": True, "bytes": len(got), "fds": fds,
                  "secret": sys.argv[3].encode() in got, "answered": answered}), flush=True)
"""


@pytest.fixture
def nest() -> Iterator[Path]:
    """A directory ``nobody`` owns and can reach (/tmp is 0700 here)."""
    top = Path(tempfile.mkdtemp(prefix="h3-impostor-", dir="/var/tmp"))
    top.chmod(0o755)
    os.chown(top, NOBODY, NOBODY)
    yield top
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The two `popek` commands setup can install: the native client and the launcher."""
    tmp = tmp_path_factory.mktemp("clients")
    native = tmp / "native"
    assert client.install(str(native)) == "native", "cc is part of scripts/setup.sh"
    launcher = tmp / "launcher"
    launcher.write_text(client.launcher(sys.executable, client.PACKAGE))
    launcher.chmod(0o755)
    return {"native": native, "python": launcher}


@pytest.mark.parametrize("kind", ["native", "python"])
def test_impostor_command_server_gets_nothing(kind: str, clients: dict[str, Path], nest: Path,
                                              tmp_path: Path) -> None:
    sock = nest / "cli.sock"
    victim = subprocess.Popen(["sleep", "600"])
    impostor = subprocess.Popen(["/usr/bin/python3", "-I", "-c", IMPOSTOR, str(sock),
                                 str(victim.pid), SECRET],
                                stdout=subprocess.PIPE, text=True, user=NOBODY, group=NOBODY,
                                extra_groups=[], cwd="/")
    try:
        assert impostor.stdout is not None
        assert read_line(impostor.stdout, 30, "the impostor to listen") == "listening\n"
        assert sock.stat().st_uid == NOBODY
        env = {**os.environ, "POPEK_CLI_SOCKET": str(sock), "POPEK_HOME": str(tmp_path / "h"),
               "H3_SECRET": SECRET}
        env.pop("POPEK_CLI_SERVER", None)
        cli = subprocess.run([str(clients[kind]), "list"], capture_output=True, text=True,
                             env=env, stdin=subprocess.DEVNULL, timeout=60, check=False)
        report = json.loads(read_line(impostor.stdout, 30, "the impostor's report"))
    finally:
        impostor.kill()
        impostor.wait()
    try:
        # the attack was made: the impostor took the connection and answered P/X
        assert report["accepted"]
        # and failed: not one byte, no descriptor, no secret, no signal, no faked code
        assert (report["bytes"], report["fds"], report["secret"]) == (0, 0, False), report
        assert victim.poll() is None, "the client signalled the impostor's pid"
        assert cli.returncode == client.REFUSED, (cli.returncode, cli.stderr)
        assert cli.stderr.strip().splitlines() == [
            f"popek: refused the command socket {sock}: it is served by uid {NOBODY}, not "
            "root; nothing was sent (unset POPEK_CLI_SOCKET, or set POPEK_CLI_SERVER=off)"]
        assert cli.stdout == ""
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("kind", ["native", "python"])
def test_pythonpath_puts_no_code_into_a_root_command(kind: str, clients: dict[str, Path],
                                                     tmp_path: Path) -> None:
    planted = tmp_path / "planted"
    planted.mkdir()
    marker = tmp_path / "ran"
    for module in ("sitecustomize", "usercustomize", "typer", "rich", "click"):
        (planted / f"{module}.py").write_text(
            f"open({str(marker)!r}, 'a').write({module!r} + '\\n')\n")
    env = {**os.environ, "POPEK_CLI_SERVER": "off", "POPEK_HOME": str(tmp_path / "h"),
           "PYTHONPATH": str(planted), "PYTHONSTARTUP": str(planted / "sitecustomize.py")}
    out = subprocess.run([str(clients[kind]), "list", "--format", "json"], capture_output=True,
                         text=True, env=env, stdin=subprocess.DEVNULL, timeout=120,
                         cwd=planted, check=False)
    ran = marker.read_text() if marker.exists() else ""
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []
    # the planted modules load in a Python that honours PYTHONPATH (the attack is real)...
    probe = subprocess.run([sys.executable, "-c", "import sitecustomize"], env=env,
                           cwd="/", check=False)
    assert probe.returncode == 0 and marker.read_text().endswith("sitecustomize\n")
    # ...and the command ran none of them
    assert ran == ""


def test_a_planted_path_runs_no_tool(popek_home: Path, tmp_path: Path) -> None:
    planted = tmp_path / "bin"
    planted.mkdir()
    marker = tmp_path / "ran"
    for tool in ("ip", "nft", "dnsmasq", "tc", "bridge", "sysctl", "modprobe"):
        fake = planted / tool
        fake.write_text(f"#!/bin/sh\necho {tool} >> {marker}\nexit 1\n")
        fake.chmod(0o755)
    env = {**os.environ, "POPEK_CLI_SERVER": "off",
           "PATH": f"{planted}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    assert shutil.which("nft", path=env["PATH"]) == str(planted / "nft")  # the attack is set
    try:
        popek("network", "create", "h3path", "--subnet", "10.231.77.0/24", env=env)
        assert not marker.exists(), marker.read_text()
    finally:
        popek("network", "delete", "--force", "h3path", check=False)
