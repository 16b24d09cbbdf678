"""The `popek` command as users run it: the native client, through the warm command server.

A real command server (on a private socket) and the native client built as
setup builds it drive a real container; the same commands run in-process
(``python -m popek``) give the same answers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import container_cgroup, popek, popek_json, wait_for
from framework.events import wait_handlers
from popek.cli import client, cmdserver

CT = "cmdsrv"


class Front:
    """The native client and a command server of its own."""

    def __init__(self, tmp: Path) -> None:
        self.socket = str(tmp / "run" / "cli.sock")
        self.binary = tmp / "popek"
        if client.install(str(self.binary)) != "native":
            pytest.skip("no C compiler: the native client cannot be built here")
        self.env = {**os.environ, "POPEK_CLI_SOCKET": self.socket}
        self.server = subprocess.Popen([sys.executable, "-m", "popek.cli.cmdserver"],
                                       env=self.env, cwd="/")
        wait_for(lambda: os.path.exists(self.socket), 30, "the command server to listen")

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(self.binary), *args], capture_output=True, text=True,
                              env=self.env, stdin=subprocess.DEVNULL, timeout=120, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"popek {' '.join(args)}: {proc.returncode}\n{proc.stderr}")
        return proc

    def close(self) -> None:
        cmdserver.stop(self.socket)
        self.server.wait(timeout=10)


@pytest.fixture(scope="module")
def front(minimal_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    tmp = tmp_path_factory.mktemp("front")
    tmp.chmod(0o755)
    f = Front(tmp)
    try:
        yield f
    finally:
        popek("delete", "--force", CT, check=False)
        f.close()


def _ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        chain.append(pid)
    return chain


def test_a_container_lives_through_the_server_as_through_the_cli(front: Front) -> None:
    out = front.run("launch", "minimal", CT, "--container", "--memory", "64MiB")
    assert f"Instance {CT} is running" in out.stdout
    remote = json.loads(front.run("info", CT, "--format", "json").stdout)
    local = json.loads(popek("info", CT, "--format", "json").stdout)
    # the same record; of the usage, the limits (memory and CPU time move between calls)
    for info in (remote, local):
        usage = info.pop("usage")
        info["limits"] = (usage["memory_limit"], usage["pids_limit"])
    assert remote == local
    proc = front.run("exec", CT, "--", "sh", "-c", "echo out; echo err >&2; exit 7", check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (7, "out\n", "err\n")
    # the container's init does not hang below the server: instances are their own
    init = popek_json("info", CT)["pid"]
    assert front.server.pid not in _ancestors(init)
    assert front.run("launch", "minimal", CT, "--container", check=False).returncode != 0
    front.run("stop", CT)
    assert popek_json("info", CT)["state"] == "stopped"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_ctrl_c_reaches_the_command(front: Front) -> None:
    front.run("start", CT)
    cli = subprocess.Popen([str(front.binary), "exec", CT, "--", "sleep", "60"],
                           env=front.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    # ready when the command runs in the container (popek's exec is in its own code, which
    # answers Ctrl-C with "Interrupted.") and the client forwards signals (it has the pid)
    procs = container_cgroup(CT, "pids") / "cgroup.procs"
    wait_for(lambda: any(_cmdline(int(p)) == b"sleep\x0060\x00"
                         for p in procs.read_text().split()), 60, "sleep 60 in the container")
    wait_handlers(cli.pid, client.FORWARDED)
    t0 = time.monotonic()
    cli.send_signal(signal.SIGINT)
    _, err = cli.communicate(timeout=20)
    assert cli.returncode == 130 and "Interrupted" in err, err
    assert time.monotonic() - t0 < 10


def test_delete_through_the_server_leaves_nothing(front: Front) -> None:
    info = popek_json("info", CT)
    front.run("delete", "--force", CT)
    assert not Path(info["workdir"]).exists()
    assert popek_json("list") == []
