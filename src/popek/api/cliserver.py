"""The CLI's command server as a supervised child of ``popek serve``: one service, two fronts.

``popek serve`` (:mod:`popek.cli.serve`) takes the lock of the command
server's socket before it becomes this API process and passes it on
(``--cli-socket PATH --cli-lock FD``).  :class:`CommandServer` runs
``python -I -m popek.cli.cmdserver --owner PID --lock-fd FD`` with that lock:
a fresh interpreter, single-threaded, that preloads popek and forks a spare per
command (:mod:`popek.cli.cmdserver`).  It is never forked from this process,
whose threads (the runner, uvicorn, SQLite's) could hold locks a fork would
copy held.

While this process lives it holds the lock, so no client starts a standalone
server.  The child exits when its sources changed (a client asked and got
``S``, and ran the command in-process), on ``popek command-server stop``, or
when killed; it is then started again, from the sources on disk, so the CLI
never runs old code.  A child that keeps failing at start is started again
after a growing delay (:data:`RETRY_S`, up to :data:`RETRY_MAX_S`).  It dies
with this process (``PR_SET_PDEATHSIG``); :meth:`CommandServer.stop` ends it
when the API stops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time

log = logging.getLogger("popek.api")

#: a child that lived less than this (seconds) failed at start: wait before the next
HEALTHY_S = 3.0
RETRY_S = 1.0
RETRY_MAX_S = 60.0
#: what the child keeps of this process's environment (a command gets its client's)
ENV_KEPT = ("PATH", "LANG", "LC_ALL")


class CommandServer:
    """Run and supervise the CLI's command server on ``path`` with the held ``lock``.

    The server is started from the supervising thread, which lives as long as
    it runs: ``PR_SET_PDEATHSIG`` fires when the thread that started a
    process ends, not only its process.
    """

    #: the server's command line, before ``--owner PID --lock-fd FD``
    command: tuple[str, ...] = (sys.executable, "-I", "-m", "popek.cli.cmdserver")

    def __init__(self, path: str, lock: int) -> None:
        self.path, self.lock = path, lock
        os.set_inheritable(lock, False)  # only the command server gets it (pass_fds)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._stopping = threading.Event()
        self._guard = threading.Lock()
        self._thread = threading.Thread(target=self._supervise, name="popek-cmdserver",
                                        daemon=True)

    def start(self) -> None:
        """Start the server and the thread that restarts it."""
        self._thread.start()

    def pid(self) -> int:
        """The pid of the running command server (0 while there is none)."""
        proc = self.proc
        return proc.pid if proc is not None and proc.poll() is None else 0

    def _spawn(self) -> subprocess.Popen[bytes] | None:
        env = {k: v for k, v in os.environ.items() if k in ENV_KEPT}
        env["POPEK_CLI_SOCKET"] = self.path
        args = [*self.command, "--owner", str(os.getpid()), "--lock-fd", str(self.lock)]
        with self._guard:
            if self._stopping.is_set():
                return None
            self.proc = subprocess.Popen(args, env=env, cwd="/", stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, pass_fds=(self.lock,),
                                         start_new_session=True)
            self.starts += 1
            return self.proc

    def _supervise(self) -> None:
        delay = RETRY_S
        while not self._stopping.is_set():
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
                log.info("the CLI's command server (pid %d) exited (%s): starting a fresh one",
                         proc.pid, code)
            if proc is not None and time.monotonic() - started >= HEALTHY_S:
                delay = RETRY_S
                continue
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, RETRY_MAX_S)

    def stop(self, timeout: float = 5.0) -> None:
        """End the server (SIGTERM: it removes its socket; SIGKILL after ``timeout``)."""
        with self._guard:
            self._stopping.set()
            proc = self.proc
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
            os.close(self.lock)
