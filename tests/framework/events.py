"""Waits on the event a test needs, not on a guessed delay.

``time.sleep(1)`` "so that the other side is ready" is a race that a loaded
host loses.  These helpers wait for the event itself: a process's exit (a
pidfd becomes readable), a signal handler installed (the kernel's ``SigCgt``
mask of the process), a line on a pipe.  Where the event can only be seen as a
state (a handler, a console line in a file), it is checked again after a short
wait on the process's pidfd, so a process that dies meanwhile fails the test at
once instead of at the deadline.
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Callable, Iterable
from typing import IO

#: between two checks of a state: short, and cut short by the process's exit
RECHECK_S = 0.005


def wait_exit(pid: int, timeout: float, what: str) -> None:
    """Wait until process ``pid`` exits (its pidfd becomes readable)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if not select.select([fd], [], [], timeout)[0]:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
    finally:
        os.close(fd)


def wait_state(check: Callable[[], bool], pid: int, timeout: float, what: str,
               interval: float = RECHECK_S) -> None:
    """Wait until ``check()`` holds while process ``pid`` lives; fail if it exits first.

    ``check`` runs again after at most ``interval`` s, or at once when ``pid`` exits.
    """
    fd = os.pidfd_open(pid)
    try:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            if select.select([fd], [], [], interval)[0] and not check():
                raise AssertionError(f"process {pid} exited while waiting for {what}")
    finally:
        os.close(fd)


def caught_signals(pid: int) -> set[int]:
    """The signals process ``pid`` has a handler for (``SigCgt`` in its status)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    mask = int(line.split()[1], 16)
                    return {n for n in range(1, 65) if mask >> (n - 1) & 1}
    except FileNotFoundError:
        pass
    return set()


def wait_handlers(pid: int, signals: Iterable[int], timeout: float = 30.0) -> None:
    """Wait until process ``pid`` has installed a handler for each of ``signals``."""
    wanted = set(signals)
    names = ", ".join(signal.Signals(s).name for s in sorted(wanted))
    wait_state(lambda: wanted <= caught_signals(pid), pid, timeout,
               f"process {pid} to handle {names}")


def read_line(stream: IO[str], timeout: float, what: str) -> str:
    """The next line the process writes on ``stream`` (a pipe), within ``timeout``."""
    if not select.select([stream], [], [], timeout)[0]:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")
    line = stream.readline()
    if not line:
        raise AssertionError(f"the pipe closed while waiting for {what}")
    return line

