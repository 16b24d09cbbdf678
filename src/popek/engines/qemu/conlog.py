"""The console logger of one VM: a bounded, rotated ``console.log``.

QEMU writes what the guest prints on its serial console to the chardev's
``logfile`` without any bound (a guest printing in a loop grew it by about
450 KB/s).  So QEMU's logfile is a FIFO, ``console.fifo``, and this small
process, started by the engine as the instance's uid just before QEMU, reads
it and writes ``console.log``; once that file holds :data:`LIMIT` bytes it
is renamed to ``console.log.1`` (replacing the previous one) and a new one
is begun.  A VM's console therefore takes at most ``2 * (LIMIT + CHUNK)``
bytes on the host: the last 2 to 4 MiB the guest printed.

The logger sleeps in ``poll(2)`` while the guest is silent and exits by
itself when QEMU closes the FIFO (QEMU exited).  When it reads slower than
the guest prints, the FIFO fills and QEMU waits: the guest is slowed down,
the host is not filled.  It is run as ``/usr/bin/python3 -I -S -c SOURCE``
(no site packages, nothing of popek imported: about 6 MiB resident) and so
imports only the standard library.  Usage::

    python3 -I -S -c "$(cat conlog.py)" FIFO LOG LIMIT PIDFILE

It opens the FIFO, forks, writes the child's pid to ``PIDFILE`` and exits:
once it returned, QEMU can open the FIFO for writing without blocking.
"""

from __future__ import annotations

import os
import select
import sys

#: bytes in ``console.log`` before it is rotated to ``console.log.1``
LIMIT = 2 << 20
#: the most read (and written) at once
CHUNK = 1 << 16


def _open_log(path: str) -> tuple[int, int]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    return fd, os.fstat(fd).st_size


def relay(fifo: int, log: str, limit: int) -> None:
    """Copy the FIFO to ``log``, rotating it at ``limit`` bytes, until every writer left."""
    out, size = _open_log(log)
    poller = select.poll()
    poller.register(fifo, select.POLLIN)
    try:
        while True:
            poller.poll()
            try:
                data = os.read(fifo, CHUNK)
            except BlockingIOError:
                continue
            if not data:
                return  # QEMU closed its end
            if size >= limit:
                os.close(out)
                os.replace(log, log + ".1")
                out, size = _open_log(log)
            view = memoryview(data)
            while view:
                view = view[os.write(out, view):]
            size += len(data)
    finally:
        os.close(out)


def main(argv: list[str]) -> int:
    """Start the logger in the background; see the module docstring."""
    fifo_path, log, limit, pidfile = argv[1], argv[2], int(argv[3]), argv[4]
    fifo = os.open(fifo_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    pid = os.fork()
    if pid:
        fd = os.open(pidfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        os.write(fd, f"{pid}\n".encode())
        os.close(fd)
        return 0
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 2)  # the caller waits for the end of the starter's stderr, not of this one
    os.close(null)
    relay(fifo, log, limit)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
