"""Handing QEMU a volume key through a FIFO, never its command line or a file.

QEMU reads a ``secret`` object's ``file=`` with a plain ``open`` when the
object is made, before the machine starts.  The usual way to pass it a
descriptor, ``/dev/fd/N``, needs ``/proc``, which QEMU's jail does not have
(see ``jail.py``); ``/dev/fdset/N`` is not understood by the secret object.
So popek makes a FIFO (mode 0600, owned by the instance's uid) in the
instance directory, which the jail binds, and a thread writes the key into
it once QEMU opens it for reading: the key passes through the kernel's pipe
buffer only, and nothing is left on disk.  Only root and the instance's uid
(the directory is 0700 and each instance has a uid of its own) can open the
FIFO; when QEMU did not read it, :meth:`KeyFifo.close` takes the key back out
and removes the FIFO.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from pathlib import Path

from popek.errors import EngineError


class KeyFifo:
    """A FIFO at ``path`` that gives ``key`` to its first reader, then closes."""

    def __init__(self, path: Path, key: str, uid: int, gid: int) -> None:
        self.path = path
        self._key = key.encode()
        self.path.unlink(missing_ok=True)  # a link left there is removed, not followed
        try:
            os.mkfifo(self.path, 0o600)
            os.chown(self.path, uid, gid, follow_symlinks=False)
        except OSError as exc:
            raise EngineError(f"cannot make the key FIFO {path}: {exc.strerror}") from exc
        self.read = False
        self._closing = False
        self._thread = threading.Thread(target=self._feed, name="popek-keyfifo", daemon=True)
        self._thread.start()

    def _feed(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)  # waits
        except OSError:
            return
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.write(fd, self._key)
                self.read = not self._closing
        except OSError:
            pass
        finally:
            os.close(fd)

    def close(self) -> None:
        """Stop feeding (take the key back when nobody read it) and remove the FIFO."""
        self._closing = True
        if self._thread.is_alive():
            with contextlib.suppress(OSError):
                fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW
                             | os.O_CLOEXEC)
                self._thread.join(5.0)
                with contextlib.suppress(OSError):
                    os.read(fd, len(self._key) + 1)
                os.close(fd)
        self._thread.join(5.0)
        self.path.unlink(missing_ok=True)
