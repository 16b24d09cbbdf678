"""``popek serve`` is the CLI's command server too (issue 14.1): one service for both fronts.

A real ``popek serve`` on private sockets (its API socket and the CLI's
command server socket, ``POPEK_CLI_SOCKET``, under a directory of this module)
over the session's POPEK_HOME:

- it takes over a standalone command server already running there;
- a CLI command runs in a fork of serve's command server, whose parent is
  serve (the pid chain of a running ``exec``), and no other command server
  runs for that socket (the processes counted);
- a long CLI verb (stop, start) run there is an operation the API lists;
- ``command-server status`` names serve, ``command-server stop`` leaves
  serve serving and gets a fresh server of serve's;
- stopping serve (SIGTERM) takes its command server and spare along, and the
  CLI works again in-process, then with a server of its own.

Stale sources (the server restarted, the command run by the client itself) are
tested in tests/unit/test_cmdserver_owned.py with a probe file: popek's own
files here change under others' edits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from framework import popek
from framework.events import read_line, wait_exit, wait_state
from popek.cli import client, cmdserver

CT = "osv-ct"
#: the Python client, as the ``popek`` launcher runs it
CLIENT = "from popek.cli.client import main; main()"


class Setup:
    """The private sockets, and ``popek serve`` on them once started."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.cli = str(base / "run" / "cli.sock")
        self.api = base / "api.sock"
        self.env = {**os.environ, client.ENV_SOCKET: self.cli}
        self.serve: subprocess.Popen[str] | None = None

    def start_serve(self) -> subprocess.Popen[str]:
        log = (self.base / "serve.log").open("a")
        proc = subprocess.Popen([sys.executable, "-m", "popek", "serve", "--socket",
                                 str(self.api)], env=self.env, stdout=subprocess.PIPE,
                                stderr=log, text=True)
        log.close()
        assert proc.stdout is not None
        line = read_line(proc.stdout, 60, "popek serve to listen")
        assert line.strip() == f"popek: API listening on unix:{self.api}", line
        self.serve = proc
        return proc

    def log(self) -> str:
        return (self.base / "serve.log").read_text()

    def status(self) -> tuple[int, int] | None:
        return cmdserver.parse_status(cmdserver.control("status", self.cli))

    def owned(self, other_than: int = 0) -> int:
        """The pid of serve's command server, once it answers (not ``other_than``)."""
        assert self.serve is not None
        serve = self.serve.pid
        def up() -> bool:
            status = self.status()
            return status is not None and status[1] == serve and status[0] != other_than

        wait_state(up, serve, 90, "serve's command server to answer")
        status = self.status()
        assert status is not None
        return status[0]

    def cli_run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``popek ARGS`` through the Python client (the command server when there is one)."""
        return subprocess.run([sys.executable, "-I", "-c", CLIENT, *args], env=self.env,
                              capture_output=True, text=True, timeout=240, check=False,
                              stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def setup(popek_home: Path, minimal_image: str) -> Iterator[Setup]:
    s = Setup(Path(tempfile.mkdtemp(prefix="osv-")))
    try:
        yield s
    finally:
        if s.serve is not None and s.serve.poll() is None:
            s.serve.terminate()
            s.serve.wait(timeout=60)
        cmdserver.stop(s.cli)  # a standalone one the last test's client started
        popek("delete", "--force", CT, check=False)
        shutil.rmtree(s.base, ignore_errors=True)


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _servers(path: str) -> list[int]:
    """The command server processes of socket ``path`` (their spares and commands left out)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes()
            environ = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"popek.cli.cmdserver" in cmdline and os.fsencode(f"{client.ENV_SOCKET}={path}") \
                in environ:
            found.append(int(d.name))
    return sorted(p for p in found if _parent(p) not in found)


@contextlib.contextmanager
def _started(setup: Setup, args: list[str]) -> Iterator[int]:
    """Start a command by hand (the protocol); its pid while it runs; cancelled after.

    A server that answers ``S`` (others edited popek's sources meanwhile) ran
    nothing and is replaced by serve: the command is sent again to the fresh one.
    """
    for _ in range(5):
        old = setup.owned()
        with open(os.devnull, "r+b") as null, socket.socket(socket.AF_UNIX) as sock:
            sock.connect(setup.cli)
            fds = b"".join(n.to_bytes(4, sys.byteorder) for n in [null.fileno()] * 3)
            sock.sendmsg([client.encode(args)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            sock.shutdown(socket.SHUT_WR)
            line = sock.makefile("rb").readline().decode()
            if line.startswith("P"):
                yield int(line[1:])
                return
        assert line.startswith("S"), line
        wait_exit(old, 30, "the stale command server to exit")
    raise AssertionError("serve's command server was stale five times in a row")


def test_serve_takes_over_a_standalone_command_server(setup: Setup) -> None:
    standalone = subprocess.Popen([sys.executable, "-I", "-m", "popek.cli.cmdserver"],
                                  env=setup.env, cwd="/")
    try:
        wait_state(lambda: setup.status() == (standalone.pid, 0), standalone.pid, 90,
                   "the standalone command server")
        serve = setup.start_serve()
        assert standalone.wait(timeout=60) == 0
        owned = setup.owned()
        assert _parent(owned) == serve.pid
        assert f"took over the CLI's command server on {setup.cli} (stopped pid " \
               f"{standalone.pid})" in setup.log()
    finally:
        if standalone.poll() is None:
            standalone.kill()
            standalone.wait()


def test_cli_commands_run_in_serves_command_server(setup: Setup, minimal_image: str) -> None:
    assert setup.serve is not None
    serve = setup.serve.pid
    out = setup.cli_run("launch", minimal_image, CT, "--container", "--memory", "64MiB")
    assert out.returncode == 0 and f"Instance {CT} is running" in out.stdout, out.stderr
    # the API sees what the CLI did: one store, one host
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(setup.api)),
                      base_url="http://popek", timeout=60) as api:
        assert api.get(f"/1.0/instances/{CT}").json()["state"] == "running"
    # a CLI command is a fork of serve's command server, which is serve's child
    with _started(setup, ["exec", CT, "--", "sleep", "60"]) as command:
        owned = _parent(command)
        assert _parent(owned) == serve
        assert setup.status() == (owned, serve)
        # one command server for the socket, serve's: the client started none of its own
        assert _servers(setup.cli) == [owned]
    wait_exit(command, 60, "the exec to end with its client")
    assert _servers(setup.cli) == [owned]
    status = setup.cli_run("command-server", "status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.strip() == (f"The command server runs as pid {owned}, part of popek "
                                     f"serve (pid {serve}).")


def _served(setup: Setup, args: list[str]) -> tuple[int, int]:
    """Run a command by hand (the protocol) in serve's server to its end: pid, exit code.

    Sent again to the fresh server when one answers ``S`` (see _started).
    """
    for _ in range(5):
        old = setup.owned()
        with open(os.devnull, "r+b") as null, socket.socket(socket.AF_UNIX) as sock:
            sock.connect(setup.cli)
            fds = b"".join(n.to_bytes(4, sys.byteorder) for n in [null.fileno()] * 3)
            sock.sendmsg([client.encode(args)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            sock.shutdown(socket.SHUT_WR)
            lines = sock.makefile("rb").read().decode().split()
        if lines and lines[0].startswith("P"):
            assert lines[-1].startswith("X"), lines
            return int(lines[0][1:]), int(lines[-1][1:])
        assert lines and lines[0].startswith("S"), lines
        wait_exit(old, 30, "the stale command server to exit")
    raise AssertionError("serve's command server was stale five times in a row")


def test_cli_work_through_serve_is_an_operation_of_the_api(setup: Setup) -> None:
    pids = {}
    for verb in ("stop", "start"):
        pid, code = _served(setup, [verb, CT])
        assert code == 0, verb
        pids[pid] = f"instance.{verb}"
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(setup.api)),
                      base_url="http://popek", timeout=60) as api:
        ops = [op for op in api.get("/1.0/operations").json() if op["server"] in pids]
        assert sorted((pids[op["server"]], op["target"], op["status"], op["identity"])
                      for op in ops) == [("instance.start", CT, "success", "root@host"),
                                         ("instance.stop", CT, "success", "root@host")]
        assert all(op["op"] == pids[op["server"]] for op in ops)
        assert api.get(f"/1.0/instances/{CT}").json()["state"] == "running"


def test_command_server_stop_leaves_serve_serving(setup: Setup) -> None:
    assert setup.serve is not None
    old = setup.owned()
    out = setup.cli_run("command-server", "stop")
    assert out.returncode == 0, out.stderr
    assert f"part of popek serve (pid {setup.serve.pid})" in out.stdout, out.stdout
    wait_exit(old, 60, "the stopped command server to exit")
    new = setup.owned(other_than=old)
    assert _parent(new) == setup.serve.pid and setup.serve.poll() is None
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(setup.api)),
                      base_url="http://popek", timeout=60) as api:
        assert api.get("/1.0/instances").status_code == 200
    assert setup.cli_run("info", CT).returncode == 0
    assert _servers(setup.cli) == [new]


def test_stopping_serve_takes_its_command_server_along(setup: Setup) -> None:
    assert setup.serve is not None
    owned = setup.owned()
    wait_state(lambda: bool(_spares(owned)), owned, 30, "a spare")
    spares = _spares(owned)
    setup.serve.send_signal(signal.SIGTERM)
    assert setup.serve.wait(timeout=60) == 0
    for pid in [owned, *spares]:
        wait_exit(pid, 30, f"process {pid} to end with popek serve")
    assert not os.path.exists(setup.cli) and not setup.api.exists()
    assert _servers(setup.cli) == []
    # the CLI works with no server at all: in-process, and it starts one of its own
    out = setup.cli_run("info", CT)
    assert out.returncode == 0, out.stderr
    wait_state(lambda: (setup.status() or (0, 1))[1] == 0, os.getpid(), 90,
               "the CLI's own command server")
    standalone = _servers(setup.cli)
    assert len(standalone) == 1 and setup.status() == (standalone[0], 0)
    assert setup.cli_run("info", CT).returncode == 0
    assert cmdserver.stop(setup.cli)


def _spares(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if _parent(int(d.name)) == pid:
                    kids.append(int(d.name))
    return kids
