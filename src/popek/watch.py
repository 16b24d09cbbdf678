"""Waiting for a file to grow without polling it: Linux inotify through ctypes.

A boot under TCG takes seconds; polling the console log every few
milliseconds would steal CPU from the emulated guest on a small host.
:class:`FileWatch` sleeps in the kernel until the file is written to (or a
timeout passes), so waiting costs nothing and reacts at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import time
from collections.abc import Callable
from pathlib import Path

IN_MODIFY = 0x00000002
IN_CREATE = 0x00000100
IN_CLOEXEC = 0o2000000
IN_NONBLOCK = 0o4000

# The symbols of the running process (libc among them); ctypes.util.find_library
# would run ldconfig and import tempfile for the same answer.
_libc = ctypes.CDLL(None, use_errno=True)


class FileWatch:
    """Wake up when ``path`` (or, until it exists, its directory) is written to."""

    def __init__(self, path: Path) -> None:
        """Start watching ``path``'s directory for creation and modification."""
        self.path = path
        self.fd = _libc.inotify_init1(IN_CLOEXEC | IN_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        wd = _libc.inotify_add_watch(self.fd, str(path.parent).encode(), IN_MODIFY | IN_CREATE)
        if wd < 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, f"cannot watch {path.parent}")

    def wait(self, timeout: float) -> None:
        """Block until something in the directory changes or ``timeout`` seconds pass."""
        ready, _, _ = select.select([self.fd], [], [], max(timeout, 0))
        if ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self.fd, 65536)  # drain the events; the caller re-reads the file

    def close(self) -> None:
        """Stop watching."""
        os.close(self.fd)

    def __enter__(self) -> FileWatch:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def wait_for_line(path: Path, line: bytes, timeout: float, alive: Callable[[], bool],
                  check_every: float = 0.1) -> bool:
    """Wait until ``path`` contains ``line``; return ``False`` on timeout or when ``alive()``
    turns false (checked at least every ``check_every`` seconds)."""
    deadline = time.monotonic() + timeout
    offset = 0
    seen = b""
    with FileWatch(path) as watch:
        while True:
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
            except FileNotFoundError:
                chunk = b""
            offset += len(chunk)
            seen = seen[-len(line):] + chunk
            if line in seen:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not alive():
                return False
            watch.wait(min(check_every, remaining))
