"""The store's own checks never take SQLite's locks away (no root).

Closing any descriptor of a file drops every POSIX lock the process holds on
it.  The header check opened and closed ``state.db``: in ``popek serve``,
whose threads each hold a connection, that dropped the SHARED lock SQLite
keeps on the database in WAL mode, so another process closing its last
connection believed itself alone, checkpointed and removed the WAL under the
server, and the suite found the store "malformed".
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from popek.state.store import SQLiteStore, header_problem

#: in another process: may it take the byte range of SQLite's SHARED locks exclusively?
PROBE = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 510, 0x40000000 + 2)
    print("free")
except OSError:
    print("held")
"""


def _lock_state(path: Path) -> str:
    return subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True,
                          text=True, check=True).stdout.strip()


def test_the_header_check_keeps_the_locks_of_open_connections(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SQLiteStore(path)
    try:
        store.put("/k", b"v")
        assert store.get("/k") is not None
        assert _lock_state(path) == "held"  # SQLite's own lock: the probe is real
        for _ in range(3):
            assert header_problem(path) == ""
            SQLiteStore(path).close()  # another store of the same file, opened and closed
        assert _lock_state(path) == "held"  # before the fix: "free"
    finally:
        store.close()
    assert _lock_state(path) == "free"  # the last connection gone, the lock goes with it
