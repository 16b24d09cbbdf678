"""Handing QEMU the secret of an RBD disk through a pipe, read once at start.

QEMU reads a ``secret`` object's ``file`` whole when it makes the object,
before the guest runs.  The jail has no ``/proc`` (so no ``/dev/fd/N``) and
QEMU opens that file by name, not through an fd set; so popek gives it a FIFO
in the instance directory (mode 0600, owned by the instance uid, in a 0700
directory only that uid and root can enter): QEMU's open blocks until popek
opens the other end, popek writes the key, closes, and removes the FIFO.  A
FIFO holds no data at rest: the key is never in a file, and it is on no
command line (only the FIFO's path is).
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Sequence
from pathlib import Path

from popek.errors import EngineError

#: seconds QEMU has to open the pipes after it was started
OPEN_TIMEOUT_S = 10.0


def make(paths: Sequence[Path], uid: int, gid: int) -> None:
    """Make each FIFO (a stale file of that name removed first), readable by ``uid`` only."""
    for path in paths:
        path.unlink(missing_ok=True)
        os.mkfifo(path, 0o600)
        os.chown(path, uid, gid)


def feed(pipes: Sequence[tuple[Path, str]], timeout: float = OPEN_TIMEOUT_S) -> None:
    """Write each key into its FIFO once QEMU has it open for reading, then remove the
    FIFO; :class:`EngineError` when QEMU did not open one within ``timeout`` seconds
    (every FIFO is removed either way)."""
    try:
        deadline = time.monotonic() + timeout
        for path, key in pipes:
            fd = -1
            while fd < 0:
                try:  # ENXIO until QEMU, the reader, has the FIFO open
                    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        raise EngineError(f"cannot hand QEMU its Ceph key: {exc}") from exc
                    if time.monotonic() > deadline:
                        raise EngineError("QEMU did not read its Ceph key within "
                                          f"{timeout:g} s (see its log)") from exc
                    time.sleep(0.02)  # polling a FIFO for its reader: no event to wait on
            try:
                os.set_blocking(fd, True)
                os.write(fd, key.encode())
            finally:
                os.close(fd)
    finally:
        for path, _ in pipes:
            with contextlib.suppress(OSError):
                path.unlink()
