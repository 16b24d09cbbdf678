"""Snapshots and clones of filesystem volumes with real containers and a real XFS pool
(issue 15.2).

What a container wrote is back after a restore (what it wrote after the snapshot is
gone) and present in a clone mounted in another container.  On a pool directory on XFS
(a loop-mounted file: reflinks), a clone of a 16 GiB volume takes the time of a 1 GiB
one: the copy shares blocks (``cp --reflink=auto``); on ext4 it would be a sparse copy
as long as the data.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import popek, popek_json, require_root_and_tools

require_root_and_tools()

CT, CT2 = "fss-ct", "fss-ct2"
MiB, GiB = 1 << 20, 1 << 30


def sh(name: str, script: str) -> str:
    return popek("exec", name, "--", "sh", "-c", script, timeout=120).stdout


@pytest.fixture(scope="module")
def ct(popek_home: Path, minimal_image: str) -> Iterator[str]:
    popek("storage", "volume", "create", "local", "fss-v", "--size", "64MiB", "--type",
          "filesystem")
    popek("launch", minimal_image, CT, "--container", "--disk", "local/fss-v:/data")
    yield CT
    for name in (CT, CT2):
        popek("delete", "--force", name, check=False)
    for vol in ("fss-copy", "fss-v"):
        popek("storage", "volume", "delete", "local", vol, check=False)


def test_a_restore_brings_back_what_the_container_wrote_and_a_clone_has_it(ct: str,
                                                                          minimal_image: str
                                                                          ) -> None:
    sh(CT, "echo before > /data/f && sync")
    popek("storage", "volume", "snapshot", "local", "fss-v", "s1")  # attached: frozen
    sh(CT, "echo after > /data/f && echo new > /data/g && sync")
    proc = popek("storage", "volume", "restore", "local", "fss-v", "s1", check=False)
    assert proc.returncode != 0 and "detach it first" in proc.stderr  # attached: refused
    popek("storage", "volume", "detach", "local/fss-v", CT)
    popek("storage", "volume", "restore", "local", "fss-v", "s1")
    popek("storage", "volume", "attach", "local/fss-v", CT, "--path", "/data")
    assert sh(CT, "cat /data/f; ls /data") == "before\nf\nlost+found\n"
    popek("storage", "volume", "clone", "local", "fss-v", "s1", "fss-copy")
    info = popek_json("storage", "volume", "info", "local", "fss-copy")
    assert (info["type"], info["origin"]) == ("filesystem", "default/fss-v@s1")
    popek("launch", minimal_image, CT2, "--container", "--disk", "local/fss-copy:/copy")
    assert sh(CT2, "cat /copy/f") == "before\n"
    sh(CT2, "echo mine > /copy/f && sync")
    assert sh(CT, "cat /data/f") == "before\n"  # the clone is a volume of its own


def _frozen_now(pid: int, path: str) -> bool:
    """Whether the file system at ``path`` in the container whose init is ``pid`` is
    frozen: a second FIFREEZE fails with EBUSY; one that succeeds is thawed at once."""
    from popek.engines.container import volumes

    dfd = volumes._open_in_ns(pid, path)
    try:
        try:
            fcntl.ioctl(dfd, volumes.FIFREEZE, 0)
        except OSError as exc:
            assert exc.errno == errno.EBUSY, exc
            return True
        fcntl.ioctl(dfd, volumes.FITHAW, 0)
        return False
    finally:
        os.close(dfd)


def test_a_snapshot_of_a_mounted_volume_is_consistent_and_leaves_it_thawed(
        ct: str, popek_home: Path) -> None:
    """The container's file system is frozen for the copy (its last write, never synced
    by it, is in the snapshot, which e2fsck finds clean) and thawed after (it writes on)."""
    sh(CT, "echo unsynced > /data/live")  # in the container's page cache only
    popek("storage", "volume", "snapshot", "local", "fss-v", "live")
    snap = popek_home / "storage" / "local" / "default" / "fss-v@live.ext4"
    check = subprocess.run(["e2fsck", "-fn", str(snap)], capture_output=True, text=True,
                           check=False)
    assert check.returncode == 0, check.stdout + check.stderr  # clean: no journal replay
    got = subprocess.run(["debugfs", "-R", "cat /live", str(snap)], capture_output=True,
                         text=True, check=True).stdout
    assert got == "unsynced\n"
    sh(CT, "echo on > /data/after && sync")  # thawed: this would hang on a frozen one
    pid = popek_json("info", CT)["pid"]
    assert not _frozen_now(pid, "/data")
    popek("storage", "volume", "snapshot-delete", "local", "fss-v", "live")  # attached: ok
    assert not snap.exists()


def test_a_killed_snapshot_does_not_leave_the_container_frozen(ct: str,
                                                               popek_home: Path) -> None:
    """A freeze outlives the process that asked for it: the guard popek starts with it
    thaws the file system when that process is killed while it holds it frozen."""
    pid = popek_json("info", CT)["pid"]
    file = popek_home / "storage" / "local" / "default" / "fss-v.ext4"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from popek.engines.container import volumes\n"
         f"with volumes.frozen({pid}, {str(file)!r}, '/data'):\n"
         "    print('frozen', flush=True)\n    time.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "frozen\n"
        assert _frozen_now(pid, "/data")  # the freeze is real
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 10
    while _frozen_now(pid, "/data"):
        assert time.monotonic() < deadline, "still frozen 10 s after its holder died"
        time.sleep(0.05)
    sh(CT, "echo alive > /data/k && sync && cat /data/k")


@pytest.fixture
def xfs_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs missing: make setup installs xfsprogs")
    image, mnt = tmp_path / "xfs.img", tmp_path / "xfs"
    with image.open("wb") as f:
        f.truncate(40 * GiB)  # sparse
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_clone_on_xfs_takes_the_same_time_whatever_the_size(
        xfs_pool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        request: pytest.FixtureRequest) -> None:
    from popek.state.store import SQLiteStore
    from popek.storage.service import Storage

    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (xfs_pool / "pool").mkdir()
    store = SQLiteStore(tmp_path / "home" / "state.db")
    request.addfinalizer(store.close)
    storage = Storage(store)
    storage.create_pool("xfs", "dir", {"path": str(xfs_pool / "pool")})
    times = {}
    for size in (1 * GiB, 16 * GiB):
        name = f"v{size // GiB}"
        storage.create_volume("xfs", "default", name, size, "filesystem")
        f = xfs_pool / "pool" / "default" / f"{name}.ext4"
        mnt = tmp_path / f"m{name}"
        mnt.mkdir()
        dev = subprocess.run(["losetup", "--find", "--show", str(f)], capture_output=True,
                             text=True, check=True).stdout.strip()
        try:  # 256 MiB of data in each, so the copy has blocks to carry
            subprocess.run(["mount", dev, str(mnt)], check=True)
            try:
                subprocess.run(["dd", "if=/dev/urandom", f"of={mnt}/data", "bs=1M",
                                "count=256", "status=none"], check=True)
            finally:
                subprocess.run(["umount", str(mnt)], check=True)
        finally:
            subprocess.run(["losetup", "-d", dev], check=True)
        took = []
        for i in range(3):
            t0 = time.perf_counter()
            storage.snapshot_volume("xfs", "default", name, f"s{i}")
            storage.clone_volume("xfs", "default", name, f"s{i}", f"{name}c{i}")
            took.append(time.perf_counter() - t0)
        times[size] = sorted(took)[1]  # the median of 3
        assert (xfs_pool / "pool" / "default" / f"{name}c0.ext4").stat().st_size == size
    print(f"snapshot+clone on XFS (median of 3): 1 GiB {times[GiB] * 1000:.0f} ms, "
          f"16 GiB {times[16 * GiB] * 1000:.0f} ms")
    assert times[16 * GiB] < max(3 * times[GiB], 0.3), times  # flat, not 16x
    assert times[16 * GiB] < 2.0, times
