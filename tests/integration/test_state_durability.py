"""Through the real CLI: a lost WAL loses nothing, damage is exit 7 in one line, backups work.

Runs in a private POPEK_HOME (no image, no engine, a few seconds).  Before
the end-of-command checkpoint, ``popek trust list`` after the WAL was deleted
did not show the key just made, and a garbled ``state.db`` was exit 6.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import popek, require_root_and_tools

require_root_and_tools()


@pytest.fixture
def home() -> Iterator[dict[str, str]]:
    """The environment of a fresh private POPEK_HOME."""
    path = Path(tempfile.mkdtemp(prefix="popek-durable-", dir="/var/tmp"))
    path.chmod(0o755)  # as homes were made: popek takes it down to 0711
    yield {**os.environ, "POPEK_HOME": str(path)}
    shutil.rmtree(path, ignore_errors=True)


def test_a_lost_wal_damage_and_a_backup_round_trip(home: dict[str, str]) -> None:
    db = Path(home["POPEK_HOME"]) / "state.db"
    wal, shm = db.with_name("state.db-wal"), db.with_name("state.db-shm")
    popek("trust", "keygen", "durable1", "--role", "image", env=home)
    for f in (wal, shm):
        f.unlink(missing_ok=True)
    assert "durable1" in popek("trust", "list", env=home).stdout
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert stat.S_IMODE(Path(home["POPEK_HOME"]).stat().st_mode) == 0o711

    backup = Path(home["POPEK_HOME"]).parent / f"{Path(home['POPEK_HOME']).name}.backup"
    try:
        out = popek("admin", "backup", str(backup), env=home).stdout
        assert "1 private key" in out and stat.S_IMODE(backup.stat().st_mode) == 0o600
        popek("trust", "keygen", "durable2", "--role", "policy", env=home)
        out = popek("admin", "restore", str(backup), env=home).stdout
        assert "Restored" in out and "kept as" in out
        listing = popek("trust", "list", env=home).stdout
        assert "durable1" in listing and "durable2" not in listing
        # the audit head was carried over: the log is not rolled back, nothing is amiss
        assert popek("audit", "verify", env=home).returncode == 0

        whole = db.read_bytes()
        db.write_bytes(random.Random(11).randbytes(100) + whole[100:])
        for args in (["trust", "list"], ["trust", "keygen", "durable3", "--role", "audit"]):
            bad = popek(*args, check=False, env=home)
            assert bad.returncode == 7, bad
            lines = bad.stderr.splitlines()
            assert lines[0].startswith("Error: ") and str(db) in lines[0] and "damaged" in lines[0]
            assert "Traceback" not in bad.stderr
            # one line, read-only or mutating: no second warning that the audit record
            # could not go to the same damaged store
            assert len(lines) == 1, lines
        assert db.read_bytes()[100:] == whole[100:]  # left as it was

        junk = popek("admin", "restore", "/etc/hostname", check=False, env=home)
        assert junk.returncode == 2 and "not a popek backup" in junk.stderr
        out = popek("admin", "restore", str(backup), env=home).stdout
        assert "could not be read" in out
        assert "durable1" in popek("trust", "list", env=home).stdout
        # the store that anchored the audit log's tail was lost: verify says so
        lost = popek("audit", "verify", check=False, env=home)
        assert lost.returncode != 0 and "seq" in lost.stdout
    finally:
        backup.unlink(missing_ok=True)
