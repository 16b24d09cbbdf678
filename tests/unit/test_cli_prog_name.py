"""The program is called ``popek`` in every usage line, error and completion script (no root).

Click names the program after ``sys.argv[0]`` and ``__main__`` unless told: the
native client's Python fallback runs ``python -S -c ...`` (Click said ``Usage:
-c``), the command server runs as ``python -m popek.cli.cmdserver`` (``Usage:
python -m popek.cli.popek``), ``python -m popek`` said ``python -m popek``.  Each
entry point runs here in a subprocess with bad arguments against a private
POPEK_HOME.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework.events import wait_state
from popek.cli import client, cmdserver

#: bad command lines: Typer commands, a sub-app, the fast path's verbs (which leave
#: what they cannot parse to Typer), and help
BAD = [
    ["launch"],
    ["network", "create"],
    ["list", "--bogus"],
    ["launch", "minimal", "x", "--vcpus", "many"],
    ["info"],
    ["image", "build"],
]
HELP = [["--help"], ["launch", "--help"]]
#: the command server as it really runs: ``-m popek.cli.cmdserver`` (run through runpy
#: so that __main__ is that module, as with -m), watching only a probe file so that
#: edits to popek's sources elsewhere in the checkout do not make it step down
SERVER = """
import runpy, sys
from popek.cli import cmdserver
cmdserver.sources = lambda: [sys.argv[1]]
runpy.run_module("popek.cli.cmdserver", run_name="__main__", alter_sys=True)
"""
CLIENT = """
import sys
from popek.cli import client
code = client.run_remote(sys.argv[2:], sys.argv[1])
sys.exit(99 if code is None else code)
"""
NOT_TAKEN = 99


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("_POPEK")}
    return {**env, "POPEK_HOME": str(home), "COLUMNS": "100", **extra}


def check_named_popek(out: str) -> None:
    """Every usage line and hint names ``popek``; no interpreter spelling leaks out."""
    usages = re.findall(r"Usage: (\S+)", out)
    hints = re.findall(r"Try '(\S+)", out)
    assert usages or hints, out
    assert set(usages) | set(hints) == {"popek"}, out
    for leak in ("python -m", "__main__", "Usage: -c", "Try '-c", "popek.cli"):
        assert leak not in out, out


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("cmdserver")
    sock = str(tmp / "run" / "cli.sock")
    probe = tmp / "probe.py"
    probe.write_text("")
    proc = subprocess.Popen([sys.executable, "-I", "-c", SERVER, str(probe)],
                            env={**os.environ, client.ENV_SOCKET: sock})
    try:
        wait_state(lambda: cmdserver.control("status", sock) == f"K{proc.pid}", proc.pid, 60,
                   "the command server to answer")
        yield sock
    finally:
        cmdserver.stop(sock)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``popek`` command as setup installs it: the native client, else the launcher."""
    target = tmp_path_factory.mktemp("native") / "popek"
    client.install(str(target))
    return target


def _run(argv: list[str], env: dict[str, str]) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120,
                         stdin=subprocess.DEVNULL, check=False)
    assert res.returncode in (0, 2), (res.returncode, res.stdout, res.stderr)
    return res.stdout + res.stderr


@pytest.mark.parametrize("args", BAD + HELP, ids=" ".join)
def test_the_installed_command_in_process(native: Path, home: Path, args: list[str]) -> None:
    # POPEK_CLI_SERVER=off: the native client execs `python -S -c ...` (sys.argv[0] "-c")
    check_named_popek(_run([str(native), *args], _env(home, POPEK_CLI_SERVER="off")))


@pytest.mark.parametrize("args", BAD + HELP, ids=" ".join)
def test_python_dash_m_popek(home: Path, args: list[str]) -> None:
    check_named_popek(_run([sys.executable, "-m", "popek", *args], _env(home)))


def test_the_python_launcher(tmp_path: Path, home: Path) -> None:
    package = str(Path(client.__file__).resolve().parents[2])
    launcher = tmp_path / "popek"
    launcher.write_text(client.launcher(sys.executable, package))
    launcher.chmod(0o755)
    for args in (["launch"], ["list", "--bogus"]):
        check_named_popek(_run([str(launcher), *args], _env(home, POPEK_CLI_SERVER="off")))


@pytest.mark.parametrize("args", BAD, ids=" ".join)
def test_the_command_server(server: str, home: Path, args: list[str]) -> None:
    res = subprocess.run([sys.executable, "-c", CLIENT, server, *args], capture_output=True,
                         text=True, env=_env(home), timeout=120, check=False)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    check_named_popek(res.stdout + res.stderr)


def _completion_named_popek(script: str) -> None:
    assert "_popek_completion" in script, script
    assert "_POPEK_COMPLETE" in script, script
    assert re.search(r"complete .*popek\s*$", script, re.MULTILINE), script
    for leak in ("python -m", "__main__", "_-C_COMPLETE", "popek.cli"):
        assert leak not in script, script


def test_completion_scripts_name_popek(native: Path, home: Path) -> None:
    env = _env(home, POPEK_CLI_SERVER="off", _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    for argv in ([str(native)], [sys.executable, "-m", "popek"]):
        # Typer's variable: _POPEK_COMPLETE=source_SHELL prints the script for SHELL
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True,
                             env={**env, "_POPEK_COMPLETE": "source_bash"}).stdout
        _completion_named_popek(out)
        # popek completion bash: what a user loads (zsh and fish: tests/unit/test_completion.py)
        out = subprocess.run([*argv, "completion", "bash"], capture_output=True,
                             text=True, timeout=120, check=True, env=env).stdout
        _completion_named_popek(out)

