"""The command server run by ``popek serve`` (popek/api/cliserver.py, cmdserver's owned mode).

An *owner* process does what ``popek serve`` does: it takes the command
server's lock with :func:`cmdserver.claim` (stopping a standalone server) and
runs the server as its supervised child with :class:`CommandServer`.  The
server watches a probe file instead of popek's sources (others edit those
while the tests run), so that a test decides when its code is "stale".
Real processes, real sockets under the test's directory, real commands
(``list`` against a private POPEK_HOME).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cmdserver import SLEEP_PRELUDE

from framework.events import read_line, wait_exit, wait_state
from popek.cli import client, cmdserver

#: a command server as serve runs it, watching only the probe (argv[1])
CHILD = SLEEP_PRELUDE + """
cmdserver.sources = lambda: [sys.argv[1]]
cmdserver.main(sys.argv[1:])
"""
#: popek serve's part: claim the lock, listen, start a server per client until SIGTERM
OWNER = """
import signal, sys, threading
from popek.api.cliserver import CommandServer
from popek.cli import cmdserver
sock, probe = sys.argv[1], sys.argv[2]
got = cmdserver.claim(sock, wait_s=float(sys.argv[3]))
if got.lock < 0:
    print(False, got.replaced, got.owner, flush=True)
    sys.exit(0)
srv = CommandServer(sock, got.lock, idle=float(sys.argv[4]))
srv.command = (sys.executable, "-I", "-c", CHILD, probe)
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
srv.start()
print(True, got.replaced, got.owner, flush=True)  # listening
done.wait()
srv.stop()
""".replace("CHILD", repr(CHILD))
#: a standalone server, as a client starts one, watching only the probe
STANDALONE = """
import sys
from popek.cli import cmdserver
cmdserver.sources = lambda: [sys.argv[2]]
cmdserver.serve(sys.argv[1])
"""
CLIENT = """
import sys
from popek.cli import client
code = client.run_remote(sys.argv[2:], sys.argv[1])
sys.exit(99 if code is None else code)
"""
NOT_TAKEN = 99


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _status(sock: str) -> tuple[int, int] | None:
    return cmdserver.parse_status(cmdserver.control("status", sock))


class Owner:
    """A stand-in of ``popek serve``'s process: the lock, and the server as its child."""

    def __init__(self, tmp: Path, wait_s: float = 15.0, idle: float = 600.0) -> None:
        self.socket = str(tmp / "run" / "cli.sock")
        self.probe = tmp / "probe.py"
        if not self.probe.exists():
            self.probe.write_text("")
        self.proc = subprocess.Popen([sys.executable, "-c", OWNER, self.socket,
                                      str(self.probe), str(wait_s), str(idle)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        took, replaced, owner = read_line(self.proc.stdout, 60, "the claim").split()
        self.took, self.replaced, self.owner = took == "True", int(replaced), int(owner)

    def server(self, other_than: int = 0) -> int:
        """The pid of the running server (waiting for one that is not ``other_than``)."""
        wait_state(lambda: (_status(self.socket) or (0, 0))[0] not in (0, other_than),
                   self.proc.pid, 60, "the owned command server to answer")
        status = _status(self.socket)
        assert status is not None
        return status[0]

    def run(self, *args: str, home: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", CLIENT, self.socket, *args],
                              capture_output=True, text=True, timeout=60, check=False,
                              env={**os.environ, "POPEK_HOME": str(home)})

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture
def owner(tmp_path: Path) -> Iterator[Owner]:
    o = Owner(tmp_path)
    assert o.took
    yield o
    o.close()


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if _parent(int(d.name)) == pid:
                    kids.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def test_the_owned_server_is_the_owners_child_and_runs_commands(owner: Owner,
                                                                tmp_path: Path) -> None:
    pid = owner.server()
    assert _parent(pid) == owner.proc.pid
    assert _status(owner.socket) == (pid, owner.proc.pid)
    # a command is a fork of that server: its parent the server, whose parent the owner
    with _started(owner.socket, ["_sleep", "60"]) as command:
        assert _parent(command) == pid
    wait_exit(command, 30, "the command to end with its client")
    assert owner.run("list", home=tmp_path / "h").returncode == 0
    assert (tmp_path / "h" / "state.db").exists()


def test_serve_is_the_one_process_until_a_command_comes(tmp_path: Path) -> None:
    """No worker runs before a client connects; it starts for that client (who waits in
    the socket's backlog), ends when idle, and the next client starts another: an idle
    host has one popek process (issue 14.1).  Before, the worker ran from serve's start
    and never idled out."""
    owner = Owner(tmp_path, idle=2.0)
    try:
        assert owner.took and os.path.exists(owner.socket)  # serve listens itself
        assert _children(owner.proc.pid) == []
        assert owner.run("list", home=tmp_path / "h").returncode == 0  # served, warm or not
        pid = owner.server()
        assert _parent(pid) == owner.proc.pid
        wait_exit(pid, 60, "the idle worker to end")
        assert _children(owner.proc.pid) == [] and os.path.exists(owner.socket)
        assert owner.run("list", home=tmp_path / "h").returncode == 0
        assert _parent(owner.server(other_than=pid)) == owner.proc.pid
    finally:
        owner.close()


@contextlib.contextmanager
def _started(path: str, args: list[str]) -> Iterator[int]:
    """Start a command by hand (the protocol); its pid while it runs; cancelled after."""
    import socket

    with open(os.devnull, "r+b") as null, socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        fds = b"".join(n.to_bytes(4, sys.byteorder) for n in [null.fileno()] * 3)
        sock.sendmsg([client.encode(args)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        sock.shutdown(socket.SHUT_WR)
        line = sock.makefile("rb").readline().decode()
        assert line.startswith("P"), line
        yield int(line[1:])


def _served(path: str, args: list[str]) -> tuple[int, int]:
    """Run a command by hand (the protocol) to its end: its pid and exit code."""
    import socket

    with open(os.devnull, "r+b") as null, socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        fds = b"".join(n.to_bytes(4, sys.byteorder) for n in [null.fileno()] * 3)
        sock.sendmsg([client.encode(args)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        sock.shutdown(socket.SHUT_WR)
        lines = sock.makefile("rb").read().decode().split()
    assert lines[0].startswith("P") and lines[-1].startswith("X"), lines
    return int(lines[0][1:]), int(lines[-1][1:])


def _operations(home: Path) -> list[dict[str, object]]:
    from popek.core.operations import Operations
    from popek.state import open_store

    if not (home / "state.db").exists():
        return []
    return Operations(open_store()).all()  # POPEK_HOME is home (the test's monkeypatch)


def test_a_long_verb_through_serves_server_is_an_operation(owner: Owner, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "h"
    monkeypatch.setenv("POPEK_HOME", str(home))
    owner.server()
    assert _served(owner.socket, ["list"])[1] == 0
    pid, code = _served(owner.socket, ["stop", "nosuch", "--timeout", "3"])
    assert code == 8  # not found: the command ran as in-process
    [op] = _operations(home)  # list is no operation
    assert (op["op"], op["target"], op["project"], op["identity"], op["status"]) == (
        "instance.stop", "nosuch", "default", "root@host", "failure")
    assert op["server"] == pid  # the command's own process carried it
    assert op["error"] == {"code": "not_found", "field": None,
                           "message": "popek stop nosuch failed (exit code 8)"}
    # an instance of a remote is the remote's to record
    _served(owner.socket, ["stop", "lab:web"])
    assert len(_operations(home)) == 1


def test_a_standalone_server_records_no_operation(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "h"
    monkeypatch.setenv("POPEK_HOME", str(home))
    sock = str(tmp_path / "run" / "cli.sock")
    (tmp_path / "probe.py").write_text("")
    standalone = subprocess.Popen([sys.executable, "-c", STANDALONE, sock,
                                   str(tmp_path / "probe.py")])
    try:
        wait_state(lambda: _status(sock) == (standalone.pid, 0), standalone.pid, 60,
                   "the standalone server")
        assert _served(sock, ["stop", "nosuch"])[1] == 8
        assert _operations(home) == []
    finally:
        cmdserver.stop(sock)
        standalone.wait(timeout=30)


def test_no_standalone_server_starts_while_the_owner_holds_the_lock(owner: Owner) -> None:
    pid = owner.server()
    proc = subprocess.run([sys.executable, "-c", STANDALONE, owner.socket, str(owner.probe)],
                          timeout=30, check=False)
    assert proc.returncode == 0  # it stepped aside at once
    assert _status(owner.socket) == (pid, owner.proc.pid)


def test_stale_sources_restart_the_server_never_run_old_code(owner: Owner,
                                                              tmp_path: Path) -> None:
    old = owner.server()
    assert owner.run("list", home=tmp_path / "h").returncode == 0
    stamp = owner.probe.stat().st_mtime_ns + 5_000_000_000
    os.utime(owner.probe, ns=(stamp, stamp))
    # the stale server runs nothing: the client runs the command itself ...
    assert owner.run("list", home=tmp_path / "h").returncode == NOT_TAKEN
    wait_exit(old, 30, "the stale server to exit")
    # ... and the owner starts a fresh one, its own child again
    new = owner.server(other_than=old)
    assert _parent(new) == owner.proc.pid
    assert owner.run("list", home=tmp_path / "h").returncode == 0


def test_a_stop_restarts_the_owned_server(owner: Owner, tmp_path: Path) -> None:
    old = owner.server()
    assert cmdserver.stop(owner.socket)
    wait_exit(old, 30, "the stopped server to exit")
    new = owner.server(other_than=old)
    assert _parent(new) == owner.proc.pid
    assert owner.run("list", home=tmp_path / "h").returncode == 0


def test_a_killed_server_is_restarted(owner: Owner) -> None:
    old = owner.server()
    os.kill(old, signal.SIGKILL)
    assert _parent(owner.server(other_than=old)) == owner.proc.pid


def test_the_server_and_its_spare_end_with_the_owner(owner: Owner, tmp_path: Path) -> None:
    pid = owner.server()
    wait_state(lambda: bool(_children(pid)), pid, 30, "a spare")
    spares = _children(pid)
    owner.proc.terminate()
    assert owner.proc.wait(timeout=30) == 0
    for p in [pid, *spares]:
        wait_exit(p, 30, f"process {p} to end with the owner")
    assert not os.path.exists(owner.socket)
    # the lock is free again: a client's own server may start
    assert owner.run("list", home=tmp_path / "h").returncode == NOT_TAKEN
    standalone = subprocess.Popen([sys.executable, "-c", STANDALONE, owner.socket,
                                   str(owner.probe)])
    try:
        wait_state(lambda: _status(owner.socket) == (standalone.pid, 0), standalone.pid, 60,
                   "a standalone server")
    finally:
        cmdserver.stop(owner.socket)
        standalone.wait(timeout=30)


def test_an_owner_killed_with_sigkill_takes_its_server_along(owner: Owner) -> None:
    pid = owner.server()
    owner.proc.kill()
    owner.proc.wait()
    wait_exit(pid, 30, "the server to die with its owner")  # PR_SET_PDEATHSIG


def test_a_standalone_server_is_taken_over(tmp_path: Path) -> None:
    sock = str(tmp_path / "run" / "cli.sock")
    (tmp_path / "probe.py").write_text("")
    standalone = subprocess.Popen([sys.executable, "-c", STANDALONE, sock,
                                   str(tmp_path / "probe.py")])
    try:
        wait_state(lambda: _status(sock) == (standalone.pid, 0), standalone.pid, 60,
                   "the standalone server")
        o = Owner(tmp_path)
        try:
            assert o.took and o.replaced == standalone.pid
            assert standalone.wait(timeout=30) == 0
            assert _parent(o.server()) == o.proc.pid
        finally:
            o.close()
    finally:
        if standalone.poll() is None:
            standalone.kill()
            standalone.wait()


def test_a_second_owner_leaves_the_first_ones_server_alone(owner: Owner,
                                                           tmp_path: Path) -> None:
    pid = owner.server()
    second = Owner(tmp_path, wait_s=5)
    second.close()
    assert not second.took and second.owner == owner.proc.pid
    assert _status(owner.socket) == (pid, owner.proc.pid)


@pytest.mark.parametrize(("answer", "parsed"), [
    ("K12", (12, 0)),
    ("K12 serve 34", (12, 34)),
    (None, None),
    ("", None),
    ("Kx", None),
    ("Sstale: popek changed", None),
    ("K12 serve x", (12, 0)),
])
def test_status_answers_are_parsed(answer: str | None, parsed: tuple[int, int] | None) -> None:
    assert cmdserver.parse_status(answer) == parsed


def test_status_says_starting_while_the_lock_is_held_without_a_server(tmp_path: Path) -> None:
    sock = str(tmp_path / "run" / "cli.sock")
    os.makedirs(os.path.dirname(sock))

    def status() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "popek", "command-server", "status"],
                              capture_output=True, text=True, timeout=60, check=False,
                              env={**os.environ, client.ENV_SOCKET: sock})

    assert not cmdserver.starting(sock)
    assert status().stdout.startswith("No command server runs")
    # what popek serve holds while it starts its server again (and a server while it starts)
    lock = os.open(sock + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert cmdserver.starting(sock)
        out = status()
        assert out.returncode == 8 and out.stdout.startswith("A command server is starting"), \
            out.stdout
    finally:
        os.close(lock)
    assert not cmdserver.starting(sock)
