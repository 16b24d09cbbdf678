"""The warm command server and its client (popek/cli/cmdserver.py, popek/cli/client.py).

A real server runs in a subprocess on a private socket; real clients connect to
it from other processes and run real popek commands against a private
POPEK_HOME (``list`` and ``info`` need no engine and no root).
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

from framework.events import read_line, wait_exit, wait_handlers, wait_state
from popek.cli import client, cmdserver

#: what a test server runs first: the command '_sleep SECONDS' takes a while, with no engine
SLEEP_PRELUDE = """
import sys, time
from popek.cli import cmdserver, entry
real_main = entry.main
def main(args):  # a command that takes a while, without an engine: '_sleep SECONDS'
    if args[:1] == ["_sleep"]:
        time.sleep(float(args[1]))
        entry.leave(0)
    real_main(args)
entry.main = main
"""
SERVER = SLEEP_PRELUDE + """
import types
probe = types.ModuleType("popek._probe")
probe.__file__ = sys.argv[2]
sys.modules["popek._probe"] = probe  # a loaded 'source' the test can touch
# Watch only the probe: popek's own files may change while the tests run (an editor
# saving, a checkout, a mutation tester, another job in the same tree), and a real
# server would then step down in the middle of the module (test_the_sources_... checks
# what sources() lists).
cmdserver.sources = lambda: [probe.__file__]
cmdserver.serve(sys.argv[1], idle=float(sys.argv[3]))
"""
CLIENT = """
import sys
from popek.cli import client
code = client.run_remote(sys.argv[2:], sys.argv[1])
sys.exit(99 if code is None else code)
"""
NOT_TAKEN = 99


class Server:
    """A command server in a subprocess, on a socket under ``tmp``."""

    def __init__(self, tmp: Path, idle: float = 60.0) -> None:
        self.socket = str(tmp / "run" / "cli.sock")
        self.probe = tmp / "probe.py"
        self.probe.write_text("")
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, self.socket,
                                      str(self.probe), str(idle)])
        # ready when a spare answers on the socket (it exists before it listens)
        wait_state(lambda: cmdserver.control("status", self.socket) == f"K{self.proc.pid}",
                   self.proc.pid, 60, "the command server to answer")

    def run(self, *args: str, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``popek ARGS`` through the server, from a new client process."""
        return subprocess.run([sys.executable, "-c", CLIENT, self.socket, *args],
                              capture_output=True, text=True, env=env, cwd=cwd, timeout=60,
                              check=False)

    def close(self) -> None:
        cmdserver.stop(self.socket)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # never idle for long enough to exit while the module runs, however slow the host
    srv = Server(tmp_path_factory.mktemp("cmdserver"), idle=3600.0)
    yield srv
    srv.close()


def _env(home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "POPEK_HOME": str(home), **extra}


def test_a_command_runs_in_a_child_with_the_clients_stdio_and_environment(
        server: Server, tmp_path: Path) -> None:
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    out = server.run("list", "--format", "json", env=_env(home_a))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []
    # the client's POPEK_HOME, not the server's, decided where the state went
    assert (home_a / "state.db").exists() and not home_b.exists()


def test_errors_and_exit_codes_pass_through_as_in_process(server: Server, tmp_path: Path) -> None:
    remote = server.run("info", "nosuch", env=_env(tmp_path))
    local = subprocess.run([sys.executable, "-m", "popek", "info", "nosuch"], capture_output=True,
                           text=True, env=_env(tmp_path), check=False)
    assert remote.returncode == local.returncode != 0
    assert "instance 'nosuch' not found" in remote.stderr
    assert remote.stderr.strip().splitlines()[-1] == local.stderr.strip().splitlines()[-1]
    usage = server.run("launch", "--vcpus", "x", env=_env(tmp_path))
    assert usage.returncode == 2 and "--vcpus" in usage.stderr


def test_the_child_works_in_the_clients_directory(server: Server, tmp_path: Path) -> None:
    # a relative POPEK_HOME is resolved against the client's working directory
    out = server.run("list", env=_env(Path("relhome")), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "relhome" / "state.db").exists()


def _exchange(path: str, args: list[str], env_home: Path) -> list[str]:
    """Speak the protocol by hand: the lines the server sends back."""
    import socket

    with open(os.devnull, "r+b") as null, socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        request = client.encode(args).replace(
            os.environb.get(b"POPEK_HOME", b"\0nohome"), os.fsencode(env_home))
        fds = bytes(memoryview(bytearray(b"".join(
            n.to_bytes(4, sys.byteorder) for n in [null.fileno()] * 3))))
        sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        sock.shutdown(socket.SHUT_WR)
        return sock.makefile("rb").read().decode().split()


def test_each_command_is_a_fresh_fork(server: Server, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path))
    children = set()
    for _ in range(3):
        lines = _exchange(server.socket, ["list"], tmp_path)
        assert lines[0].startswith("P") and lines[-1] == "X0", lines
        children.add(int(lines[0][1:]))
    assert len(children) == 3 and server.proc.pid not in children
    assert cmdserver.control("status", server.socket) == f"K{server.proc.pid}"


def test_a_client_of_another_user_is_refused(server: Server, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another user")
    run_dir = Path(server.socket).parent
    mode = run_dir.stat().st_mode
    run_dir.chmod(0o755)
    os.chmod(server.socket, 0o777)  # even with the socket open to all, the uid check holds
    try:
        pid = os.fork()
        if pid == 0:  # the client, as nobody
            try:
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
                code = client.run_remote(["list"], server.socket)
                os._exit(NOT_TAKEN if code is None else code)
            finally:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
    finally:
        os.chmod(server.socket, 0o600)
        run_dir.chmod(mode)
    assert os.waitstatus_to_exitcode(status) == NOT_TAKEN


def test_the_socket_and_its_directory_are_private(server: Server) -> None:
    assert Path(server.socket).stat().st_mode & 0o777 == 0o600
    assert Path(server.socket).parent.stat().st_mode & 0o777 == 0o700


def test_a_changed_source_makes_the_server_step_down(tmp_path: Path) -> None:
    srv = Server(tmp_path)
    try:
        assert srv.run("list", env=_env(tmp_path / "h")).returncode == 0
        stamp = srv.probe.stat().st_mtime_ns + 5_000_000_000
        os.utime(srv.probe, ns=(stamp, stamp))
        # the stale server does not run the command: the client runs it itself
        assert srv.run("list", env=_env(tmp_path / "h")).returncode == NOT_TAKEN
        srv.proc.wait(timeout=10)
        assert not os.path.exists(srv.socket)
    finally:
        srv.close()


def test_an_idle_server_exits_and_removes_its_socket(tmp_path: Path) -> None:
    srv = Server(tmp_path, idle=0.5)
    try:
        assert srv.proc.wait(timeout=15) == 0
        assert not os.path.exists(srv.socket)
    finally:
        srv.close()


def test_a_second_server_on_the_same_directory_steps_aside(server: Server) -> None:
    proc = subprocess.run([sys.executable, "-c", "import sys; from popek.cli import cmdserver; "
                           "cmdserver.serve(sys.argv[1])", server.socket], timeout=30,
                          check=False)
    assert proc.returncode == 0
    assert cmdserver.control("status", server.socket) == f"K{server.proc.pid}"


def test_a_signal_to_the_client_reaches_the_command(tmp_path: Path) -> None:
    # a stand-in server whose 'command' sleeps until it gets the forwarded SIGTERM
    sock_path = str(tmp_path / "fake.sock")
    fake = subprocess.Popen([sys.executable, "-c", FAKE_SERVER, sock_path],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout is not None
        assert read_line(fake.stdout, 30, "the stand-in server to listen") == "listening\n"
        cli = subprocess.Popen([sys.executable, "-c", CLIENT, sock_path, "list"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # the client forwards signals once it has the child's pid: before, a signal
        # would end the client itself (the race a fixed sleep lost on a loaded host)
        wait_handlers(cli.pid, client.FORWARDED)
        cli.send_signal(signal.SIGTERM)
        _, err = cli.communicate(timeout=10)
        assert cli.returncode == 128 + signal.SIGTERM, err
        assert fake.wait(timeout=10) == signal.SIGTERM  # its child died of exactly that
    finally:
        fake.kill()


#: stands for the server: answers with a child that waits for the forwarded signal and dies
#: of it; exits with that signal's number.  The child has the kernel's default action from
#: the fork on (a Python handler's pending flag is cleared in a fork's child: a signal
#: that came that early was lost), and dies with the stand-in should the test fail.
FAKE_SERVER = """
import ctypes, os, signal, socket, sys
for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, signal.SIG_DFL)
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1)
print("listening", flush=True)
conn, _ = s.accept()
conn.recvmsg(1 << 20, 64)
child = os.fork()
if child == 0:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    while True:
        signal.pause()
conn.sendall(f"P{child}\\n".encode())
_, status = os.waitpid(child, 0)
conn.close()
sys.exit(os.WTERMSIG(status) if os.WIFSIGNALED(status) else 100)
"""


@pytest.mark.parametrize(("args", "tty", "allowed"), [
    (["launch", "minimal", "a", "--container"], False, True),
    (["list"], True, True),
    (["console", "a"], True, False),
    (["console", "a", "--log"], True, True),
    (["exec", "a", "--", "ls", "-t"], True, False),
    (["exec", "a", "--", "ls", "-t"], False, True),
    (["exec", "-T", "a", "--", "sh"], True, True),
    (["exec", "--no-tty", "a", "--", "sh"], True, True),
    (["command-server", "stop"], False, False),
    (["launch", "--help"], False, False),
    (["--show-completion", "bash"], False, False),
    (["--install-completion", "zsh"], False, False),
    ([], False, False),
])
def test_interactive_commands_stay_in_process(args: list[str], tty: bool,
                                              allowed: bool) -> None:
    assert client.remote_allowed(args, tty) is allowed


def test_requests_round_trip_and_malformed_ones_are_refused() -> None:
    data = client.encode(["launch", "x y", "--memory", "1GiB"])
    request = cmdserver.Request.decode(data)
    assert request.args == ["launch", "x y", "--memory", "1GiB"]
    assert request.cwd == os.getcwdb()
    mask = os.umask(0o027)
    try:
        assert cmdserver.Request.decode(client.encode([])).umask == 0o027
    finally:
        os.umask(mask)
    assert request.env[b"PATH"] == os.environb[b"PATH"]
    for bad in (b"", b"other/1\0/\x0022\x000", client.MAGIC + b"\0/\x0022\x005\0a",
                client.MAGIC + b"\0/\x001777\x000", client.MAGIC + b"\0/\x009\x000"):
        with pytest.raises(ValueError):
            cmdserver.Request.decode(bad)


def test_the_fingerprint_sees_a_changed_or_removed_file(tmp_path: Path) -> None:
    files = [str(tmp_path / "a.py"), str(tmp_path / "b.py")]
    for f in files:
        Path(f).write_text("")
    before = cmdserver.fingerprint(files)
    assert cmdserver.fingerprint(files) == before
    os.utime(files[0], ns=(1, 1))
    assert cmdserver.fingerprint(files) != before
    os.unlink(files[1])
    assert cmdserver.fingerprint(files)[1] == -1


def test_the_sources_are_the_files_of_the_loaded_popek_modules(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import types

    import popek

    extra = types.ModuleType("popek._extra")
    extra.__file__ = str(tmp_path / "extra.py")
    monkeypatch.setitem(sys.modules, "popek._extra", extra)
    monkeypatch.setitem(sys.modules, "popekish", types.ModuleType("popekish"))
    files = cmdserver.sources()
    assert {popek.__file__, cmdserver.__file__, extra.__file__} <= set(files)
    assert files == sorted(files)
    assert all(f.startswith(str(Path(popek.__file__).parent)) or f == extra.__file__
               for f in files)


def test_the_launcher_runs_without_site_and_in_process_when_switched_off(tmp_path: Path) -> None:
    launcher = tmp_path / "popek"
    package = str(Path(client.__file__).resolve().parents[2])
    launcher.write_text(client.launcher(sys.executable, package))
    launcher.chmod(0o755)
    assert launcher.read_text().startswith(f"#!{sys.executable} -IS\n")
    out = subprocess.run([str(launcher), "list", "--format", "json"], capture_output=True,
                         text=True, env=_env(tmp_path / "home", POPEK_CLI_SERVER="off"),
                         check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


@pytest.mark.parametrize("answer", [b"P-1\nX0\n", b"P0\nX0\n", b"P1\nX0\n", b"P12x\nX0\n",
                                    b"P\nX0\n", b"X0\n", b"P99999999999\nX0\n"])
def test_no_pid_but_a_real_one_is_ever_signalled(answer: bytes) -> None:
    """``-1`` (every process), ``0`` (the group), init or garbage: refused as no command."""
    import socket

    before = [signal.getsignal(s) for s in client.FORWARDED]
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(answer)
        theirs.shutdown(socket.SHUT_WR)
        assert client._await(ours) is None  # not started: nothing to signal, no code taken
    assert [signal.getsignal(s) for s in client.FORWARDED] == before  # no forwarding set up


def test_a_command_of_the_server_reports_only_a_real_exit_code() -> None:
    import socket

    ours, theirs = socket.socketpair()
    old = {s: signal.getsignal(s) for s in client.FORWARDED}
    try:
        with ours, theirs:
            theirs.sendall(b"P4242\nX-3\nX300\nX7\n")
            theirs.shutdown(socket.SHUT_WR)
            assert client._await(ours) == 7
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def test_a_killed_server_leaves_no_spare_accepting(tmp_path: Path) -> None:
    srv = Server(tmp_path)
    try:
        wait_state(lambda: bool(_children(srv.proc.pid)), srv.proc.pid, 10, "a spare")
        spares = _children(srv.proc.pid)
        srv.proc.kill()
        srv.proc.wait()
        for spare in spares:  # its pidfd turns readable when it exits
            wait_exit(spare, 10, f"the spare {spare} to die with its server")
        # nobody accepts on the socket left behind: the client runs the command itself
        assert srv.run("list", env=_env(tmp_path / "h")).returncode == NOT_TAKEN
    finally:
        srv.close()


def test_concurrent_clients_are_all_served(server: Server, tmp_path: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", CLIENT, server.socket, "list", "--format",
                               "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=_env(tmp_path / f"h{i}")) for i in range(5)]
    for i, p in enumerate(procs):
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert json.loads(out) == []
        assert (tmp_path / f"h{i}" / "state.db").exists()


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The native client (client.c), built as setup builds it."""
    target = tmp_path_factory.mktemp("native") / "popek"
    kind = client.install(str(target))
    if kind != "native":
        pytest.skip("no C compiler: the Python launcher stands in for the native client")
    return target


def test_the_native_client_runs_commands_in_the_server(server: Server, native: Path,
                                                       tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the clients use the server only for root")
    env = _env(tmp_path / "h", POPEK_CLI_SOCKET=server.socket)
    out = subprocess.run([str(native), "list", "--format", "json"], capture_output=True,
                         text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []
    err = subprocess.run([str(native), "info", "nosuch"], capture_output=True, text=True,
                         env=env, check=False)
    assert err.returncode == 8 and "instance 'nosuch' not found" in err.stderr
    # it went through the server: the server's spare made the store, not a local process
    assert (tmp_path / "h" / "state.db").exists()


def test_the_native_client_falls_back_to_python(native: Path, tmp_path: Path) -> None:
    for extra in ({"POPEK_CLI_SOCKET": str(tmp_path / "none.sock"), "POPEK_CLI_SERVER": "off"},
                  {"POPEK_CLI_SERVER": "off"}):
        out = subprocess.run([str(native), "list", "--format", "json"], capture_output=True,
                             text=True, env=_env(tmp_path / "h", **extra), check=False)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == []


def test_the_native_client_forwards_signals(native: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the clients use the server only for root")
    sock_path = str(tmp_path / "fake.sock")
    fake = subprocess.Popen([sys.executable, "-c", FAKE_SERVER, sock_path],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout is not None
        assert read_line(fake.stdout, 30, "the stand-in server to listen") == "listening\n"
        cli = subprocess.Popen([str(native), "list"], env=_env(tmp_path,
                               POPEK_CLI_SOCKET=sock_path), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
        wait_handlers(cli.pid, client.FORWARDED)  # it has the child's pid
        cli.send_signal(signal.SIGINT)
        _, err = cli.communicate(timeout=10)
        assert cli.returncode == 128 + signal.SIGINT, err
        assert fake.wait(timeout=10) == signal.SIGINT  # its child died of exactly that
    finally:
        fake.kill()


def test_the_server_sends_interactive_commands_back(server: Server, tmp_path: Path) -> None:
    import socket

    primary, secondary = os.openpty()
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(server.socket)
            fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (secondary,) * 3)
            sock.sendmsg([client.encode(["exec", "c1", "--", "sh"])],
                         [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            sock.shutdown(socket.SHUT_WR)
            answer = sock.makefile("rb").read().decode()
    finally:
        os.close(primary)
        os.close(secondary)
    assert answer.startswith("L"), answer


def test_a_running_command_outlives_the_servers_stop(tmp_path: Path) -> None:
    srv = Server(tmp_path)
    try:
        # '_sleep 3' is the command under test: one still running when the server stops
        cli = subprocess.Popen([sys.executable, "-c", CLIENT, srv.socket, "_sleep", "3"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_handlers(cli.pid, client.FORWARDED)  # the command runs: the client has its pid
        assert cmdserver.stop(srv.socket)
        srv.proc.wait(timeout=10)
        _, err = cli.communicate(timeout=20)
        assert cli.returncode == 0, err
    finally:
        srv.close()


def test_a_signal_reaches_a_command_of_the_real_server(server: Server) -> None:
    cli = subprocess.Popen([sys.executable, "-c", CLIENT, server.socket, "_sleep", "30"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_handlers(cli.pid, client.FORWARDED)  # the command runs: the client has its pid
    t0 = time.monotonic()
    cli.send_signal(signal.SIGINT)
    _, err = cli.communicate(timeout=20)
    assert time.monotonic() - t0 < 5
    # the command's own report, as in-process: not a KeyboardInterrupt of the client
    assert cli.returncode == 130 and err == "Interrupted.\n", err


def _command_reading(server_pid: int, pipe_fd: int) -> int:
    """The server's child whose stdin is the pipe ``pipe_fd`` writes to: the command."""
    want = f"pipe:[{os.fstat(pipe_fd).st_ino}]"
    found = [pid for pid in _children(server_pid) if _readlink(f"/proc/{pid}/fd/0") == want]
    assert len(found) == 1, found
    return found[0]


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


@pytest.mark.parametrize("kind", ["python", "native"])
def test_killing_the_client_cancels_the_command(server: Server, kind: str,
                                                request: pytest.FixtureRequest) -> None:
    """In-process, a killed ``popek`` takes its command with it; through the server too."""
    if kind == "native":
        if os.geteuid() != 0:
            pytest.skip("the native client uses the server only for root")
        argv = [str(request.getfixturevalue("native")), "_sleep", "120"]
    else:
        argv = [sys.executable, "-c", CLIENT, server.socket, "_sleep", "120"]
    cli = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "POPEK_CLI_SOCKET": server.socket})
    assert cli.stdin is not None and cli.stderr is not None
    wait_handlers(cli.pid, client.FORWARDED)  # the command runs: the client has its pid
    command = _command_reading(server.proc.pid, cli.stdin.fileno())
    cli.kill()  # SIGKILL: nothing is forwarded, the client's socket just closes
    cli.wait(timeout=10)
    wait_exit(command, 20, "the command of the killed client to end")
    cli.stdin.close()
    assert cli.stderr.read() == "Interrupted.\n"  # cancelled as a Ctrl-C cancels it


def test_an_interrupt_just_after_the_pid_still_reports_the_exit_code(tmp_path: Path) -> None:
    """The client forwards signals as soon as it reads ``P``: the command must report.

    Fails if ``_command`` sends ``P`` before it hooks its exit report (the client
    then gets no ``X`` and prints "ended without an exit code").
    """
    import socket

    ours, theirs = socket.socketpair()

    class Interrupted:  # the forwarded SIGINT lands right after the P line went out
        def settimeout(self, value: float | None) -> None:
            theirs.settimeout(value)

        def fileno(self) -> int:
            return theirs.fileno()

        def sendall(self, data: bytes) -> None:
            theirs.sendall(data)
            if data.startswith(b"P"):
                raise KeyboardInterrupt

    pid = os.fork()
    if pid == 0:  # the command, as the spare becomes it
        try:
            ours.close()
            fds = [os.open(os.devnull, os.O_RDWR) for _ in range(3)]
            request = cmdserver.Request(["list"], os.fsencode(tmp_path), 0o022,
                                        {b"POPEK_HOME": os.fsencode(tmp_path / "h")})
            cmdserver._command(Interrupted(), fds, request)  # type: ignore[arg-type]
        finally:
            os._exit(70)
    theirs.close()
    with ours:
        answer = ours.makefile("rb").read().split()
    _, status = os.waitpid(pid, 0)
    assert answer == [f"P{pid}".encode(), b"X130"]  # interrupted: 130, as in-process
    assert os.waitstatus_to_exitcode(status) == 130
