"""The VM console logger (engines/qemu/conlog.py) and its reader (consolelog.py), no QEMU.

The logger runs here exactly as the engine starts it (the system's python3,
``-I -S -c`` with the script's text), as the current user, on a real FIFO
that the test writes to as QEMU would.
"""

from __future__ import annotations

import os
import select
import subprocess
from pathlib import Path

import pytest

from popek.engines.qemu import conlog, consolelog
from popek.errors import EngineError

LIMIT = 256 << 10


def _run_logger(tmp_path: Path, limit: int = LIMIT) -> tuple[Path, Path, int]:
    fifo, log, pidfile = tmp_path / "console.fifo", tmp_path / "console.log", tmp_path / "pid"
    os.mkfifo(fifo, 0o600)
    subprocess.run([consolelog.PYTHON, "-I", "-S", "-c", Path(conlog.__file__).read_text(),
                    str(fifo), str(log), str(limit), str(pidfile)], check=True, timeout=30,
                   stdin=subprocess.DEVNULL)
    return fifo, log, int(pidfile.read_text())


def _wait_gone(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        assert select.select([fd], [], [], 30)[0], "the logger did not exit"
    finally:
        os.close(fd)


def test_a_flood_is_rotated_and_bounded(tmp_path: Path) -> None:
    fifo, log, pid = _run_logger(tmp_path)
    lines = b"".join(b"line %07d of the flood\n" % i for i in range(200_000))  # 5 MB
    w = os.open(fifo, os.O_WRONLY)  # does not block: the logger reads already
    view = memoryview(lines)
    while view:
        view = view[os.write(w, view):]
    os.close(w)  # QEMU exits: the logger writes what is left and ends
    _wait_gone(pid)
    old = log.with_name("console.log.1")
    assert old.stat().st_size <= LIMIT + conlog.CHUNK
    assert log.stat().st_size <= LIMIT + conlog.CHUNK
    # what is kept is exactly the end of what was written, in order
    kept = old.read_bytes() + log.read_bytes()
    assert len(kept) >= LIMIT
    assert lines.endswith(kept)
    assert consolelog.tail(log, 100) == lines[-100:]
    assert consolelog.tail(log) == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        ["console.fifo", "console.log", "console.log.1", "pid"]


def test_a_silent_guest_costs_no_cpu(tmp_path: Path) -> None:
    """While nothing is written the logger sleeps in poll(2): no CPU time at all."""
    fifo, log, pid = _run_logger(tmp_path)
    w = os.open(fifo, os.O_WRONLY)
    try:
        os.write(w, b"boot\n")
        before = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13]
        # a measured window, not a synchronisation: the logger must not wake during it
        select.select([], [], [], 1.0)
        after = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13]
        assert before == after
    finally:
        os.close(w)
    _wait_gone(pid)
    assert log.read_bytes() == b"boot\n"


def test_the_reader_never_follows_a_link(tmp_path: Path) -> None:
    """QEMU owns the directory: a console.log planted as a link is refused, not read as root."""
    secret = tmp_path / "secret"
    secret.write_text("root only\n")
    (tmp_path / "console.log").symlink_to(secret)
    with pytest.raises(EngineError, match="cannot read the console log"):
        consolelog.tail(tmp_path / "console.log")
    (tmp_path / "console.log").unlink()
    os.mkfifo(tmp_path / "console.log")  # would block a reader that opened it blocking
    with pytest.raises(EngineError, match="not a regular file"):
        consolelog.tail(tmp_path / "console.log")
    (tmp_path / "console.log").unlink()
    assert consolelog.tail(tmp_path / "console.log") == b""
