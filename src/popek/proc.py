"""Watching processes that are not our children: liveness by pid and start time.

A pid alone can be reused; the start time (``/proc/PID/stat`` field 22) makes
the pair unique for the life of the host.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from popek.errors import EngineError

#: where popek finds the tools it runs (qemu, runc, bwrap, nft, ip, tc, dnsmasq, swtpm...):
#: the system's directories, never the caller's ``PATH`` (a root command must not run a
#: ``nft`` from a directory a user put first); the CLI sets ``PATH`` to it on entry too
TOOL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def tool(name: str) -> str | None:
    """The absolute path of tool ``name`` in :data:`TOOL_PATH`, or ``None`` when missing."""
    import shutil

    return shutil.which(name, path=TOOL_PATH)


def tool_env() -> dict[str, str]:
    """This process's environment with ``PATH`` set to :data:`TOOL_PATH` (for a tool's own
    lookups, such as the command ``nsenter`` runs)."""
    return {**os.environ, "PATH": TOOL_PATH}


def start_time(pid: int) -> int | None:
    """Return the start time (clock ticks after boot) of ``pid``, or ``None`` if it is gone.

    A zombie counts as gone.
    """
    try:  # os.open/os.read: a third of the cost of Path.read_text, and reconcile asks often
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        stat = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # the command name may contain spaces and parentheses: split after the last ')'
    fields = stat[stat.rindex(b")") + 2:].split()
    if not fields or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


#: pidfds kept open by a long-running process (:func:`keep_pidfds`), by (pid, start time);
#: ``None``: :func:`alive` reads ``/proc`` each time
_PIDFDS: dict[tuple[int, int], int] | None = None
_PIDFDS_LOCK = threading.Lock()
#: the most pidfds kept; past it the table is swept of exited processes, then emptied
MAX_PIDFDS = 4096


def keep_pidfds() -> None:
    """Make :func:`alive` in this process answer from a pidfd of each process it was asked
    about, kept open: one ``poll`` per answer instead of opening, reading and parsing
    ``/proc/PID/stat`` (a few times dearer).  For a process that asks about the same
    processes again and again (the API server lists every instance per request).
    The first question about a process still checks its start time, through
    ``/proc``, after its pidfd is open: the pidfd is of that process, not of one that
    reused its pid.  A pidfd polls readable once the process exited (a zombie
    included, as :func:`start_time` counts it gone); it is closed when found so."""
    global _PIDFDS
    with _PIDFDS_LOCK:
        if _PIDFDS is None:
            _PIDFDS = {}


def _exited(fd: int) -> bool:
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _pidfd_alive(table: dict[tuple[int, int], int], pid: int, started: int) -> bool:
    key = (pid, started)
    with _PIDFDS_LOCK:  # polled under the lock: no other thread closes it meanwhile
        fd = table.get(key)
        if fd is not None:
            if not _exited(fd):
                return True
            del table[key]
            os.close(fd)
            return False
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # gone, or no descriptor left: /proc answers
        return start_time(pid) == started
    if start_time(pid) != started:
        os.close(fd)
        return False
    with _PIDFDS_LOCK:
        if key in table:  # another thread opened one meanwhile
            os.close(fd)
        else:
            if len(table) >= MAX_PIDFDS:
                _sweep(table)
            table[key] = fd
    return True


def _sweep(table: dict[tuple[int, int], int]) -> None:
    """Close the pidfds of exited processes; all of them if that freed none (lock held)."""
    for key, fd in list(table.items()):
        if _exited(fd):
            del table[key]
            os.close(fd)
    if len(table) >= MAX_PIDFDS:
        for fd in table.values():
            os.close(fd)
        table.clear()


def alive(pid: int, started: int) -> bool:
    """Return whether the process ``pid`` that started at ``started`` still runs."""
    if pid <= 0:
        return False
    table = _PIDFDS
    return start_time(pid) == started if table is None else _pidfd_alive(table, pid, started)


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Poll ``check`` until it is true or ``timeout`` seconds pass; return the last result."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def kill(pid: int, started: int, timeout: float = 5.0) -> None:
    """SIGKILL the process if it is still the one that started at ``started``; wait for it."""
    if not alive(pid, started):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if not wait_until(lambda: not alive(pid, started), timeout):
        raise EngineError(f"process {pid} did not die after SIGKILL within {timeout:.0f}s")


def end_recorded(pidfile: Path, marker: str, grace: float = 0.0) -> None:
    """End the helper whose pid ``pidfile`` holds, then remove the file.

    Only a process whose command line mentions ``marker`` is ours (a pid
    recorded before a reboot may name another process now).  It gets
    ``grace`` seconds to exit by itself before it is killed.
    """
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        pid = 0
    if pid:
        started = start_time(pid)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            cmdline = b""
        if started is not None and marker.encode() in cmdline and \
                not wait_until(lambda: not alive(pid, started), grace, 0.01):
            kill(pid, started)
    pidfile.unlink(missing_ok=True)


def run(argv: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run`` without its polling: wait in the kernel, kill after ``timeout``.

    ``subprocess.run(timeout=...)`` waits for the child by sleeping in growing
    steps (up to 50 ms), which adds tens of milliseconds to every short
    command; here the wait blocks and a timer kills the child if it overruns.
    Raises ``subprocess.TimeoutExpired`` when the timer fired.
    """
    fired = threading.Event()
    with subprocess.Popen(argv, **kwargs) as p:

        def overrun() -> None:
            fired.set()
            p.kill()

        timer = threading.Timer(timeout, overrun)
        timer.start()
        try:
            out, err = p.communicate()
        finally:
            timer.cancel()
        if fired.is_set():
            raise subprocess.TimeoutExpired(argv, timeout, out, err)
        return subprocess.CompletedProcess(argv, p.returncode, out, err)


@contextlib.contextmanager
def flocked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
