"""A full ``POPEK_HOME`` filesystem: one clear line per command, nothing half made, then all well.

Runs on a private, small tmpfs ``POPEK_HOME`` (issue 12, point 2).  Before the
fix every mutating command said ``cannot be used: database or disk is full
(busy, full disk or no permission?)`` (earlier still ``command server:
OperationalError: cannot rollback``), and the first audited command on the
full disk left a record in the log whose head never reached the store, so
``popek audit verify`` reported the log TAMPERED for good once space was back.
"""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import REPO, popek, require_root_and_tools

require_root_and_tools()


@pytest.fixture
def small_home() -> Iterator[dict[str, str]]:
    """The environment of a fresh POPEK_HOME on a 64 MiB tmpfs of its own (h2: this test's tag)."""
    mnt = Path(tempfile.mkdtemp(prefix="popek-h2-full-", dir="/var/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=755", "popek-h2-full",
                    str(mnt)], check=True)
    env = {**os.environ, "POPEK_HOME": str(mnt / "home"),
           "POPEK_CACHE": os.environ.get("POPEK_CACHE", str(REPO / ".cache" / "popek"))}
    try:
        yield env
    finally:
        for name in ("h2full-a", "h2full-b", "h2full-v"):
            popek("delete", "--force", name, check=False, env=env)
        subprocess.run(["umount", "--lazy", str(mnt)], check=False)
        mnt.rmdir()


def _fill(path: Path) -> None:
    """Write zeros into ``path`` until its filesystem is full (and prove it is)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (1 << 20, 4096):
            with pytest.raises(OSError) as full:
                while True:
                    os.write(fd, bytes(size))
            assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


def _snapshot(home: Path) -> set[str]:
    """The files under ``home`` but empty lock files and SQLite's own -wal/-shm."""
    return {str(p.relative_to(home)) for p in home.rglob("*")
            if p.is_file() and not p.name.endswith(".lock")
            and p.name not in ("state.db-shm", "state.db-wal")}


def test_full_home_one_line_nothing_half_made_then_intact(small_home: dict[str, str]) -> None:
    env = small_home
    home = Path(env["POPEK_HOME"])
    popek("image", "build", "minimal", env=env, timeout=900)
    popek("launch", "minimal", "h2full-a", env=env)
    popek("trust", "allow-unsigned", env=env)
    before_list = popek("list", env=env).stdout
    before_files = _snapshot(home)

    _fill(home.parent / "fill")
    commands = [
        ["launch", "minimal", "h2full-b", "--container"],
        ["launch", "minimal", "h2full-v"],
        ["network", "create", "h2full", "--subnet", "10.231.7.0/24"],
        ["trust", "allow-unsigned", "--off"],
        ["stop", "h2full-a"],
        ["trust", "keygen", "h2full", "--role", "image"],
    ]
    for args in commands:
        res = popek(*args, check=False, env=env)
        lines = [ln for ln in res.stderr.splitlines() if not ln.startswith("popek: ")
                 or "warning" in ln]
        assert res.returncode == 6, (args, res)
        assert len(lines) == 1, (args, res.stderr)
        assert lines[0].startswith("Error: no space left on the filesystem holding "
                                   f"{home}"), (args, res.stderr)
        assert "Traceback" not in res.stderr and "OperationalError" not in res.stderr
    # nothing half made: the same instances, no new files under the home
    assert popek("list", env=env).stdout == before_list
    assert _snapshot(home) - before_files == set()

    (home.parent / "fill").unlink()
    verify = popek("audit", "verify", env=env, check=False)
    assert verify.returncode == 0, verify
    assert "intact" in verify.stdout
    popek("trust", "allow-unsigned", "--off", env=env)
    popek("stop", "h2full-a", env=env)
    popek("launch", "minimal", "h2full-v", env=env)
    assert popek("audit", "verify", env=env).returncode == 0


def test_a_launch_the_disk_stops_half_way_leaves_no_instance(small_home: dict[str, str]) -> None:
    """The home has room for the launch's records but not for the container's file
    system: the launch fails with the one line, and its roll-back, which removes
    the files first, may not be able to drop the record on the full disk.  Once
    space is back, no instance is left of it (reconcile finishes the roll-back:
    before, it stayed as a stopped instance whose start "was interrupted")."""
    env = small_home
    home = Path(env["POPEK_HOME"])
    popek("image", "build", "minimal", env=env, timeout=900)
    fill = home.parent / "fill"
    _fill(fill)
    os.truncate(fill, fill.stat().st_size - (96 << 10))  # 96 KiB for the records
    res = popek("launch", "minimal", "h2full-b", "--container", "--disk", "64MiB",
                check=False, env=env)
    assert res.returncode == 6, res
    assert res.stderr.splitlines()[-1].startswith("Error: no space left on the filesystem")
    assert "Traceback" not in res.stderr
    fill.unlink()
    assert "h2full-b" not in popek("list", env=env).stdout
    assert not (home / "instances" / "default" / "h2full-b").exists()
    popek("launch", "minimal", "h2full-b", "--container", "--disk", "64MiB", env=env)
    assert popek("audit", "verify", env=env).returncode == 0
