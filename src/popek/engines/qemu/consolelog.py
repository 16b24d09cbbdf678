"""The host side of a VM's bounded console log (the logger itself is ``conlog.py``).

QEMU's serial chardev logs to the FIFO ``console.fifo``; the logger, started
here as the instance uid before QEMU, keeps ``console.log`` and one rotated
``console.log.1`` of at most :data:`conlog.LIMIT` bytes each.  Readers here
take only the tail and never follow a link: the instance directory belongs
to the instance uid, which QEMU runs as.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from pathlib import Path

from popek import proc
from popek.engines.qemu import conlog
from popek.errors import EngineError

#: the interpreter that runs the logger (Debian's python3, which python3-venv pulls in)
PYTHON = "/usr/bin/python3"
#: the most ``console --log`` returns: both files at their largest
MAX_READ = 2 * (conlog.LIMIT + conlog.CHUNK)


def fifo_path(log: Path) -> Path:
    """The FIFO QEMU writes the console to (its chardev ``logfile``)."""
    return log.with_name("console.fifo")


def _pidfile(log: Path) -> Path:
    return log.with_name("conlog.pid")


def rotated(log: Path) -> Path:
    """The previous console log."""
    return log.with_name(log.name + ".1")


def start(log: Path, uid: int, gid: int) -> None:
    """Make the FIFO and start the logger as ``uid``; return once it reads the FIFO.

    Raises :class:`EngineError` when the logger cannot start.
    """
    stop(log)
    fifo = fifo_path(log)
    for old in (log, rotated(log), fifo):
        old.unlink(missing_ok=True)
    os.mkfifo(fifo, 0o600)
    os.chown(fifo, uid, gid)
    # the system's interpreter, with the script as text: the instance uid may not be able
    # to read popek's interpreter or sources (a virtualenv under /root)
    argv = [PYTHON, "-I", "-S", "-c", Path(conlog.__file__).read_text(), str(fifo), str(log),
            str(conlog.LIMIT), str(_pidfile(log))]
    try:
        res = proc.run(argv, 10.0, user=uid, group=gid, extra_groups=[], umask=0o077,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, start_new_session=True, cwd="/")
    except (OSError, subprocess.SubprocessError) as exc:
        raise EngineError(f"cannot start the console logger: {exc}") from exc
    if res.returncode != 0:
        detail = (res.stderr or b"").decode(errors="replace").strip().splitlines()[-1:]
        raise EngineError("the console logger failed" + (f": {detail[0][:200]}" if detail else ""))


def stop(log: Path, drain: float = 1.0) -> None:
    """Stop the logger if it still runs.

    It ends by itself once QEMU exited and it wrote what the FIFO held (the
    guest's last lines, which ``exit_reason`` reads): it gets ``drain``
    seconds for that before it is killed.
    """
    proc.end_recorded(_pidfile(log), str(fifo_path(log)), drain)


def _read_tail(path: Path, limit: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return b""
    except OSError as exc:
        raise EngineError(f"cannot read the console log {path}: {exc.strerror}") from exc
    with contextlib.closing(os.fdopen(fd, "rb")) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise EngineError(f"the console log {path} is not a regular file")
        f.seek(max(st.st_size - limit, 0))
        return f.read(limit)


def tail(log: Path, limit: int = MAX_READ) -> bytes:
    """The last ``limit`` bytes the guest printed (the rotated file, then the current one)."""
    current = _read_tail(log, limit)
    if len(current) >= limit:
        return current
    return _read_tail(rotated(log), limit - len(current)) + current
