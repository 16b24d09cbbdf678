"""The command server: one warm interpreter, forked for each ``popek`` command.

Started by :mod:`popek.cli.client` (``python -I -m popek.cli.cmdserver``) when a
root command finds none.  It imports all of popek once, then serves a
root-only Unix socket (``/run/popek/cli-<installation>.sock``, directory
mode 0700, peer uid checked with ``SO_PEERCRED``) in a single thread:

1. the server keeps one forked *spare* blocked in ``accept`` (and killed by
   the kernel should the server die: ``PR_SET_PDEATHSIG``);
2. a client sends its argv, working directory, environment and, as
   ``SCM_RIGHTS``, its stdin, stdout and stderr, and its umask;
3. the spare that accepted it tells the server, which forks the next spare,
   takes those descriptors as 0, 1 and 2, the client's directory and
   environment, sends ``P<pid>`` and runs :func:`popek.cli.entry.main`, the
   same code an in-process command runs; its exit code goes back as
   ``X<code>``.  No client waits for a fork.

It holds no state of its own: no store connection, no thread, nothing a
command could inherit but imported modules (each reseeds ``random``; the
modules are frozen out of the garbage collector's sight, so that a command's
collections neither walk them nor copy their pages).
It answers ``S`` (stale) and exits when popek's sources changed since it
started, so an upgrade never runs old code; it exits after ``IDLE_S`` seconds
without a command.  ``popek command-server status|stop`` reports or stops it.

``popek serve`` runs this same server as its worker (the API and the CLI then
share one service): :func:`claim` takes the socket's lock in ``popek serve``
(stopping a standalone server that holds it), the API process listens on the
socket itself and, when a client connects, starts ``python -m
popek.cli.cmdserver --owner PID --lock-fd FD --listen-fd FD --idle S``
(:mod:`popek.api.cliserver`), again whenever a client comes after it ended
(idle, stale, stopped, killed).  Such an *owned* server accepts on serve's
socket, dies with its owner (``PR_SET_PDEATHSIG``), and names its owner in its
status answer (``K<pid> serve <owner>``); while the owner holds the lock no
client can start a standalone one.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import importlib
import os
import pkgutil
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import NoReturn

import popek
from popek.cli import client
from popek.errors import PopekError

IDLE_S = 600.0
TICK_S = 1.0
PR_SET_PDEATHSIG = 1
MAX_REQUEST = 1 << 20
#: never imported ahead: entry points and this server itself
SKIP = ("popek.__main__", "popek.cli.fastgen", "popek.cli.cmdserver", "popek.cli.client")
#: never imported ahead either: the REST API's modules (FastAPI, pydantic, uvicorn) run in
#: ``popek serve``'s own process only, and would double this server's start and size
SKIP_PACKAGES = ("popek.api.",)
#: what popek imports inside functions, so that only the commands needing it pay
LAZY = ("rich.console", "rich.table", "rich.status", "click", "qemu.qmp", "asyncio", "pyroute2",
        "pyroute2.netlink.exceptions", "cryptography.exceptions",
        "cryptography.hazmat.primitives.serialization",
        "cryptography.hazmat.primitives.asymmetric.ed25519", "tomllib", "tempfile", "ctypes",
        "ctypes.util", "difflib", "logging", "grp")


class Request:
    """One command from a client: argv, working directory, umask, environment."""

    def __init__(self, args: list[str], cwd: bytes, umask: int, env: dict[bytes, bytes]) -> None:
        self.args, self.cwd, self.umask, self.env = args, cwd, umask, env

    @classmethod
    def decode(cls, data: bytes) -> Request:
        """Parse what :func:`popek.cli.client.encode` wrote; ``ValueError`` when malformed."""
        fields = data.split(b"\0")
        if len(fields) < 4 or fields[0] != client.MAGIC:
            raise ValueError("not a popek command request")
        umask = int(fields[2], 8)
        if not 0 <= umask <= 0o777:
            raise ValueError("umask out of range")
        argc = int(fields[3])
        if not 0 <= argc <= len(fields) - 4:
            raise ValueError("argument count out of range")
        args = [os.fsdecode(a) for a in fields[4:4 + argc]]
        env = dict(kv.split(b"=", 1) for kv in fields[4 + argc:] if b"=" in kv)
        return cls(args, fields[1], umask, env)


def preload() -> None:
    """Import every popek module once, so that no command pays for it."""
    for info in pkgutil.walk_packages(popek.__path__, "popek."):
        if info.name not in SKIP and not info.name.startswith(SKIP_PACKAGES):
            importlib.import_module(info.name)
    for name in LAZY:
        importlib.import_module(name)


def sources() -> list[str]:
    """The files of every popek module this interpreter has loaded."""
    files = (getattr(m, "__file__", None) for name, m in list(sys.modules.items())
             if name == "popek" or name.startswith("popek."))
    return sorted(f for f in files if f)


def fingerprint(files: list[str]) -> tuple[int, ...]:
    """Modification times of ``files`` (-1 for a file gone): they change on an upgrade."""
    stamps = []
    for path in files:
        try:
            stamps.append(os.stat(path).st_mtime_ns)
        except OSError:
            stamps.append(-1)
    return tuple(stamps)


def serve(path: str = client.SOCKET, idle: float = IDLE_S, lock_fd: int | None = None,
          owner: int = 0, listen_fd: int | None = None) -> None:
    """Serve commands on ``path`` until idle for ``idle`` seconds or stopped.

    The server keeps one forked *spare* blocked in ``accept``: the spare takes
    the next connection, tells the server (which forks the next spare) and
    becomes that command, so no client waits for a fork.

    ``owner``: the pid of the ``popek serve`` this server is part of (its
    parent, which holds the socket's lock and passes it as ``lock_fd``, and
    listens on ``path`` itself, passing that socket as ``listen_fd``): the server
    then ends with its owner and on SIGTERM, and leaves the socket file to it.
    """
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    os.chmod(os.path.dirname(path), 0o700)
    if lock_fd is None:
        lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    else:
        lock = lock_fd
        os.set_inheritable(lock, False)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the owner's: already held
    except BlockingIOError:
        return  # another server runs, or is starting
    if owner:
        _parent_death_signal(signal.SIGTERM)
        if os.getppid() != owner:  # it died before the request took effect
            return
    global _LOCK, _OWNER
    _LOCK, _OWNER = lock, owner
    os.chdir("/")
    preload()
    if threading.active_count() != 1:
        raise PopekError("command server: an import started a thread; forking would be unsafe")
    files = sources()
    known = fingerprint(files)
    # What is loaded now lives as long as the server: out of the collector's sight, a
    # child's collections neither walk it (tens of ms here) nor copy its pages on write.
    gc.collect()
    gc.freeze()
    notify_r, notify_w = os.pipe2(os.O_CLOEXEC)
    server = os.getpid()
    if owner:  # SIGTERM (the owner stopping, or gone): end as a stop does, in the loop
        signal.signal(signal.SIGTERM, lambda _s, _f: os.write(notify_w, b"s"))
    with Listener(path) if listen_fd is None else _Inherited(listen_fd) as sock:
        spare = 0
        try:
            last = time.monotonic()
            while True:
                _reap()
                if not spare:
                    spare = os.fork()
                    if spare == 0:
                        os.close(notify_r)
                        _spare(sock, notify_w, server, lambda: fingerprint(files) == known)
                ready, _, _ = select.select([notify_r], [], [], TICK_S)
                if not ready:
                    if time.monotonic() - last > idle:
                        return
                    continue
                news = os.read(notify_r, 64)
                last = time.monotonic()
                if b"s" in news:
                    return
                spare = 0  # it took a client: fork the next one
        finally:
            if spare:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(spare, signal.SIGKILL)
            _reap()


#: the lock descriptor of the running server (a command never keeps it: see _spare)
_LOCK = -1
#: the pid of the ``popek serve`` this server is part of; 0 when standalone
_OWNER = 0


class Listener:
    """A listening Unix socket at a path (mode 0600), removed again when the server ends."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.node = (0, 0)

    def __enter__(self) -> socket.socket:
        old = os.umask(0o177)
        try:
            if os.path.exists(self.path):
                os.unlink(self.path)
            self.sock.bind(self.path)
            self.node = _node(self.path)
        finally:
            os.umask(old)
        self.sock.listen(64)
        return self.sock

    def __exit__(self, *_exc: object) -> None:
        # only remove the path if it is still ours (a newer server may have replaced it)
        with contextlib.suppress(OSError):
            if _node(self.path) == self.node:
                os.unlink(self.path)
        self.sock.close()


class _Inherited:
    """The listening socket ``popek serve`` holds and passed on: closed, never removed."""

    def __init__(self, fd: int) -> None:
        os.set_inheritable(fd, False)  # a command's own children never get it
        self.sock = socket.socket(fileno=fd)

    def __enter__(self) -> socket.socket:
        return self.sock

    def __exit__(self, *_exc: object) -> None:
        self.sock.close()


def _node(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _spare(sock: socket.socket, notify: int, server: int, fresh: Callable[[], bool]) -> NoReturn:
    """In a forked spare: wait for a client, tell the server, serve the client."""
    code = 0
    try:
        _die_with(server)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # an owned server's handler: not ours
        if _LOCK >= 0:  # a command that outlives the server must not keep the next one out
            os.close(_LOCK)
        while True:
            try:
                conn, _ = sock.accept()
                break
            except InterruptedError:
                continue
        # a command must outlive the server (a stop, an idle exit) as any command does
        _parent_death_signal(0)
        os.write(notify, b"a")  # the server forks the next spare meanwhile
        sock.close()
        with conn:
            if not _handle(conn, fresh):
                os.write(notify, b"s")
    except BaseException:
        code = 1
    os._exit(code)


def _die_with(server: int) -> None:
    """Have the kernel kill this spare when the server dies (no orphan left accepting)."""
    _parent_death_signal(signal.SIGKILL)
    if os.getppid() != server:  # it died before the request took effect
        os._exit(0)


def _parent_death_signal(signum: int) -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)


def _handle(conn: socket.socket, fresh: Callable[[], bool]) -> bool:
    """Serve one connection in the spare; ``False`` when the server should stop."""
    conn.settimeout(5.0)
    uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                              struct.calcsize("3i")))[1]
    if uid != os.geteuid():
        conn.sendall(b"Erefused: not the server's user\n")
        return True
    try:
        data, fds = _receive(conn)
    except (OSError, ValueError):
        return True
    try:
        if data == client.MAGIC + b"\0status":
            owned = f" serve {_OWNER}" if _OWNER else ""
            conn.sendall(f"K{os.getppid()}{owned}\n".encode())
            return True
        if data == client.MAGIC + b"\0stop":
            conn.sendall(b"K\n")
            return False
        if not fresh():
            conn.sendall(b"Sstale: popek changed since the server started\n")
            return False
        try:
            request = Request.decode(data)
        except ValueError as exc:
            conn.sendall(f"E{exc}\n".encode())
            return True
        if len(fds) != 3:
            conn.sendall(b"Eexpected stdin, stdout and stderr\n")
            return True
        completing = client.COMPLETE_VAR.encode() in request.env
        if not client.remote_allowed(request.args, os.isatty(fds[0]) and os.isatty(fds[1]),
                                     completing):
            conn.sendall(b"Linteractive: run it in-process\n")
            return True
        _command(conn, fds, request)
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    """Read a whole request and the descriptors passed with it."""
    fds: list[int] = []
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk, ancillary, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(16))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds.extend(struct.unpack(f"{usable // 4}i", payload[:usable]))
        if not chunk:
            return b"".join(chunks), fds
        size += len(chunk)
        if size > MAX_REQUEST:
            for fd in fds:
                os.close(fd)
            raise ValueError("request too large")
        chunks.append(chunk)


def _command(conn: socket.socket, fds: list[int], request: Request) -> NoReturn:
    """Become the client's command: its stdio, directory and environment; report its code.

    The server was told (``a``) on accept, so it forks the next spare meanwhile.
    """
    from popek.cli import entry

    code = 1
    try:
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        _reopen_stdio()
        try:
            os.chdir(request.cwd)
        except OSError:  # gone meanwhile: the client runs it in-process and says why
            conn.sendall(b"Ethe working directory is gone\n")
            os._exit(0)
        os.umask(request.umask)
        os.environb.clear()
        os.environb.update(request.env)
        sys.argv = ["popek", *request.args]
        if "random" in sys.modules:
            sys.modules["random"].seed()
        conn.settimeout(None)
        if _OWNER:  # popek serve's: a long instance verb is one of its operations too
            from popek.cli import served

            finished = served.record(request.args)
            if finished is not None:
                entry.ON_EXIT.append(finished)
        # the hook goes first: once the client reads P it forwards signals, and an
        # interrupt just after P must still report the exit code
        entry.ON_EXIT.append(lambda c: _report(conn, c))
        _cancel_with_client(conn)
        conn.sendall(f"P{os.getpid()}\n".encode())
        entry.main(request.args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:  # as in-process: a Ctrl-C, or the client is gone
        with contextlib.suppress(OSError):
            print("Interrupted.", file=sys.stderr)
        code = 130
    except BaseException as exc:  # a bug: the one line an in-process command prints
        with contextlib.suppress(OSError):
            print(entry.internal_message(exc), file=sys.stderr)
        code = entry.INTERNAL_ERROR
    entry.leave(code)


def _cancel_with_client(conn: socket.socket) -> None:
    """Interrupt this command (``KeyboardInterrupt``) as soon as its client goes away.

    An in-process command dies with its process; here the command is another
    process, so a client killed with SIGKILL would leave it running.  The
    client's end of ``conn`` closes when it dies: the kernel then sends
    ``SIGIO`` (``O_ASYNC``) and the socket shows ``POLLHUP`` (the client's
    earlier ``shutdown(SHUT_WR)`` alone does not), and the command is cancelled
    as a Ctrl-C would cancel it, rolling back what it started.
    """
    def gone() -> bool:
        poll = select.poll()
        poll.register(conn, select.POLLHUP)
        return any(events & (select.POLLHUP | select.POLLERR) for _, events in poll.poll(0))

    def on_io(_signum: int, _frame: object) -> None:
        if gone():
            signal.signal(signal.SIGIO, signal.SIG_IGN)  # once
            raise KeyboardInterrupt

    signal.signal(signal.SIGIO, on_io)
    fcntl.fcntl(conn, fcntl.F_SETOWN, os.getpid())
    fcntl.fcntl(conn, fcntl.F_SETFL, fcntl.fcntl(conn, fcntl.F_GETFL) | os.O_ASYNC)
    if gone():  # it died before SIGIO was armed
        raise KeyboardInterrupt


def _report(conn: socket.socket, code: int) -> None:
    signal.signal(signal.SIGIO, signal.SIG_IGN)  # done: the client may go now
    with contextlib.suppress(OSError):
        conn.sendall(f"X{code}\n".encode())


def _reopen_stdio() -> None:
    """New ``sys.std*`` objects over descriptors 0-2, buffered as Python's start-up does."""
    encoding, errors = sys.stdout.encoding, sys.stdout.errors
    sys.stdin = open(0, encoding=encoding, errors=errors, closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", encoding=encoding, errors=errors, closefd=False,  # noqa: SIM115
                      buffering=1 if os.isatty(1) else -1)
    sys.stderr = open(2, "w", encoding=encoding, errors="backslashreplace",  # noqa: SIM115
                      closefd=False, buffering=1)


def starting(path: str | None = None) -> bool:
    """Whether a server holds the lock of ``path`` without answering yet (one starting,
    or ``popek serve`` starting its own again): no client would start one now.

    Read from ``/proc/locks`` (a ``flock`` held on the lock file's inode): trying
    the lock would make a server starting at that moment step aside.
    """
    path = path or client.socket_path()
    try:
        st = os.stat(path + ".lock")
        with open("/proc/locks") as locks:
            table = locks.read().split("\n")
    except OSError:
        return False
    node = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return any(len(f) > 5 and f[1] == "FLOCK" and f[5] == node
               for f in (line.split() for line in table))


def control(action: str, path: str | None = None) -> str | None:
    """Send ``status`` or ``stop`` to the server; its answer, or ``None`` if none runs."""
    path = path or client.socket_path()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5.0)
            sock.connect(path)
            sock.sendall(client.MAGIC + b"\0" + action.encode())
            sock.shutdown(socket.SHUT_WR)
            answer = sock.makefile("rb").readline()
    except OSError:
        return None
    return answer.decode().strip() or None


def stop(path: str | None = None, wait_s: float = 5.0) -> bool:
    """Stop the server and wait until its socket is gone; ``False`` if none ran."""
    path = path or client.socket_path()
    if control("stop", path) is None:
        return False
    deadline = time.monotonic() + wait_s
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return True


def parse_status(answer: str | None) -> tuple[int, int] | None:
    """``status``'s answer -> ``(server pid, owner pid)``, the owner 0 for a standalone
    server; ``None`` when no server answered (or the answer is not a status)."""
    words = (answer or "").split()
    if not words or not words[0].startswith("K") or not words[0][1:].isdigit():
        return None
    owner = words[2] if len(words) == 3 and words[1] == "serve" else "0"
    return int(words[0][1:]), int(owner) if owner.isdigit() else 0


class Claim:
    """What :func:`claim` found: the lock taken (``lock`` >= 0), or who keeps it."""

    def __init__(self, path: str, lock: int = -1, replaced: int = 0, owner: int = 0) -> None:
        #: the socket; the lock descriptor (-1: not taken)
        self.path, self.lock = path, lock
        #: the pid of the standalone server stopped to take the lock (0: none ran)
        self.replaced = replaced
        #: the pid of the ``popek serve`` whose server keeps the lock (0: none)
        self.owner = owner


def claim(path: str | None = None, wait_s: float = 15.0) -> Claim:
    """Take the command server's lock for ``popek serve`` (see the module docstring).

    A standalone server that holds it is stopped first (it lets its running
    commands finish); a server of another ``popek serve`` is left alone
    (``owner`` says whose).  When the lock stays held for ``wait_s`` without
    a server that answers, it is not taken.
    """
    path = path or client.socket_path()
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait_s
    replaced = 0
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return Claim(path, lock, replaced)
        except BlockingIOError:
            pass
        status = parse_status(control("status", path))
        if status is not None and status[1]:
            os.close(lock)
            return Claim(path, owner=status[1])
        if status is not None and control("stop", path) is not None:
            replaced = status[0]
        if time.monotonic() > deadline:
            os.close(lock)
            return Claim(path)
        time.sleep(0.02)  # a server starting (not listening yet) or stopping


def main(argv: list[str]) -> None:
    """``python -m popek.cli.cmdserver [--owner PID --lock-fd FD --listen-fd FD --idle S]``
    (see :func:`serve`)."""
    options = dict(zip(argv[1::2], argv[2::2], strict=False))
    owner, lock = options.get("--owner", "0"), options.get("--lock-fd", "")
    listen = options.get("--listen-fd", "")
    try:
        idle = float(options.get("--idle", IDLE_S))
    except ValueError:
        idle = IDLE_S
    serve(client.socket_path(), idle=idle, lock_fd=int(lock) if lock.isdigit() else None,
          owner=int(owner) if owner.isdigit() else 0,
          listen_fd=int(listen) if listen.isdigit() else None)


if __name__ == "__main__":
    # run the module under its own name, so that its file is in the fingerprint too
    from popek.cli import cmdserver as _named

    _named.main(sys.argv)
