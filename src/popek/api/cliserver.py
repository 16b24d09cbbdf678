"""The CLI's command server as a worker of ``popek serve``, started when a command comes.

``popek serve`` (:mod:`popek.cli.serve`) takes the lock of the command
server's socket before it becomes this API process and passes it on
(``--cli-socket PATH --cli-lock FD``).  :class:`CommandServer` then listens on
that socket itself, so serve is the one long-lived popek process of the host:
while no CLI command comes, nothing else runs.  When a client connects (the
listening socket turns readable) it starts ``python -I -m popek.cli.cmdserver
--owner PID --lock-fd FD --listen-fd FD --idle S``: a fresh interpreter,
single-threaded, that preloads popek, accepts on serve's socket and forks a
spare per command (:mod:`popek.cli.cmdserver`); the client's connection waits
in the socket's backlog meanwhile.  The worker is never forked from this
process, whose threads (the runner, uvicorn, SQLite's) could hold locks a
fork would copy held.

The worker exits after ``idle`` seconds without a command, when its sources
changed (a client asked and got ``S``, and ran the command in-process), on
``popek command-server stop``, or when killed; the next client's connection
starts a fresh one, from the sources on disk, so the CLI never runs old code.
A worker that keeps failing at start is started again after a growing delay
(:data:`RETRY_S`, up to :data:`RETRY_MAX_S`).  It dies with this process
(``PR_SET_PDEATHSIG``); :meth:`CommandServer.stop` ends it and removes the
socket when the API stops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time

log = logging.getLogger("popek.api")

#: a worker that lived less than this (seconds) failed at start: wait before the next
HEALTHY_S = 3.0
RETRY_S = 1.0
RETRY_MAX_S = 60.0
#: a worker ends after this many seconds without a command (the next one starts another)
IDLE_S = 600.0
#: what the worker keeps of this process's environment (a command gets its client's)
ENV_KEPT = ("PATH", "LANG", "LC_ALL")


def listen(path: str) -> socket.socket:
    """A listening Unix socket at ``path`` (mode 0600 in its 0700 directory), replacing a
    dead server's socket file left there."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    os.chmod(os.path.dirname(path), 0o700)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # the lock is ours: no live server listens there
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    sock.listen(64)
    return sock


class CommandServer:
    """Serve the CLI's command server socket ``path`` (its ``lock`` held): start a worker
    when a client comes, again after it ends.

    The worker is started from the supervising thread, which lives as long as
    it runs: ``PR_SET_PDEATHSIG`` fires when the thread that started a
    process ends, not only its process.
    """

    #: the worker's command line, before ``--owner PID --lock-fd FD --listen-fd FD --idle S``
    command: tuple[str, ...] = (sys.executable, "-I", "-m", "popek.cli.cmdserver")

    def __init__(self, path: str, lock: int, idle: float = IDLE_S) -> None:
        """Listen on ``path`` now (an ``OSError`` when it cannot be bound)."""
        self.path, self.lock, self.idle = path, lock, idle
        os.set_inheritable(lock, False)  # only the worker gets it (pass_fds)
        self.sock = listen(path)
        self.node = os.stat(path).st_ino
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._guard = threading.Lock()
        self._thread = threading.Thread(target=self._supervise, name="popek-cmdserver",
                                        daemon=True)

    def start(self) -> None:
        """Start the thread that starts a worker whenever a client comes."""
        self._thread.start()

    def pid(self) -> int:
        """The pid of the running worker (0 while there is none)."""
        proc = self.proc
        return proc.pid if proc is not None and proc.poll() is None else 0

    def _spawn(self) -> subprocess.Popen[bytes] | None:
        env = {k: v for k, v in os.environ.items() if k in ENV_KEPT}
        env["POPEK_CLI_SOCKET"] = self.path
        fd = self.sock.fileno()
        args = [*self.command, "--owner", str(os.getpid()), "--lock-fd", str(self.lock),
                "--listen-fd", str(fd), "--idle", repr(self.idle)]
        with self._guard:
            if self._stopping.is_set():
                return None
            self.proc = subprocess.Popen(args, env=env, cwd="/", stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, pass_fds=(self.lock, fd),
                                         start_new_session=True)
            self.starts += 1
            return self.proc

    def _client_waits(self) -> bool:
        """Block until a client connects (``True``) or :meth:`stop` is called (``False``)."""
        while not self._stopping.is_set():
            try:
                ready, _, _ = select.select([self.sock, self._wake_r], [], [])
            except InterruptedError:
                continue
            if self.sock in ready and not self._stopping.is_set():
                return True
        return False

    def _supervise(self) -> None:
        delay = RETRY_S
        while self._client_waits():
            started = time.monotonic()
            try:
                proc = self._spawn()
            except OSError as exc:
                log.warning("cannot start the CLI's command server: %s", exc)
                proc = None
            if proc is None and self._stopping.is_set():
                return
            if proc is not None:
                log.info("the CLI's command server runs as pid %d on %s", proc.pid, self.path)
                code = proc.wait()
                if self._stopping.is_set():
                    return
                log.info("the CLI's command server (pid %d) exited (%s)", proc.pid, code)
            if proc is not None and time.monotonic() - started >= HEALTHY_S:
                delay = RETRY_S
                continue
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, RETRY_MAX_S)

    def stop(self, timeout: float = 5.0) -> None:
        """End the worker (SIGTERM; SIGKILL after ``timeout``), stop listening, remove the
        socket (when it is still this server's)."""
        with self._guard:
            self._stopping.set()
            proc = self.proc
        os.write(self._wake_w, b"x")
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self.node:
                os.unlink(self.path)
        self.sock.close()
        for fd in (self.lock, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
