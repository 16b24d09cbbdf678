"""A shared filesystem volume in two real containers at once (issue 15.3: "attached to
one running instance at a time unless marked shared").

Both containers mount the volume through the same loop device, so one ext4 superblock
(two devices over one file would be two file systems writing the same blocks): what A
writes B reads at once, without a remount.  Each sees the files owned by its own root
(an id-mapped mount per container, each with its own id range).  Detaching from A
leaves B working; when both stop, the loop device is released.  Not marked shared, the
second attach is refused; a block volume is never marked shared; delete and unmark are
refused while held, naming the holders.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import popek, popek_json, require_root_and_tools
from popek.engines.container.volumes import bound_loops

require_root_and_tools()

A, B = "shv-a", "shv-b"
VOL = "shv-data"


def released(file: Path, within: float = 10.0) -> bool:
    """Whether no loop device is bound to ``file`` any more, within ``within`` seconds: the
    kernel clears an autoclear device after its last close, from a work queue (measured
    here: the clearing can come after ``umount`` returned)."""
    deadline = time.monotonic() + within
    while bound_loops(str(file)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)  # polling a condition with a deadline, not waiting a guess
    return True


def sh(name: str, script: str, check: bool = True) -> str:
    return popek("exec", name, "--", "sh", "-c", script, timeout=120, check=check).stdout


@pytest.fixture(scope="module")
def two(popek_home: Path, minimal_image: str) -> Iterator[Path]:
    popek("storage", "volume", "create", "local", VOL, "--size", "64MiB", "--type",
          "filesystem")
    popek("storage", "volume", "create", "local", "shv-blk", "--size", "16MiB")
    popek("storage", "volume", "create", "local", "shv-made", "--size", "16MiB", "--type",
          "filesystem", "--shared")
    popek("launch", minimal_image, A, "--container", "--disk", f"local/{VOL}:/shared")
    popek("launch", minimal_image, B, "--container")
    yield popek_home / "storage" / "local" / "default" / f"{VOL}.ext4"
    for name in (A, B):
        popek("delete", "--force", name, check=False)
    for vol in (VOL, "shv-blk", "shv-made"):
        popek("storage", "volume", "delete", "local", vol, check=False)


def test_a_volume_not_marked_shared_is_held_by_one(two: Path) -> None:
    proc = popek("storage", "volume", "attach", f"local/{VOL}", B, check=False)
    assert proc.returncode != 0
    assert f"attached to default/{A}" in proc.stderr and "unless marked shared" in proc.stderr
    assert popek_json("storage", "volume", "info", "local", VOL)["holders"] == [f"default/{A}"]


def test_a_block_volume_is_not_marked_shared(two: Path) -> None:
    proc = popek("storage", "volume", "set", "local", "shv-blk", "security.shared=true",
                 check=False)
    assert proc.returncode != 0
    assert "cannot mark block volume shv-blk shared: a qcow2 file written by two QEMUs" in \
        proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert popek_json("storage", "volume", "info", "local", "shv-blk")["shared"] is False
    proc = popek("storage", "volume", "create", "local", "shv-blk2", "--size", "16MiB",
                 "--shared", check=False)
    assert proc.returncode != 0 and "cannot mark block volume shv-blk2 shared" in proc.stderr
    names = [v["name"] for v in popek_json("storage", "volume", "list", "local")]
    assert "shv-blk2" not in names  # nothing made
    assert popek_json("storage", "volume", "info", "local", "shv-made")["config"] == {
        "security.shared": "true"}  # made shared (--shared at create)


def test_two_containers_share_one_file_system_live(two: Path) -> None:
    out = popek("storage", "volume", "set", "local", VOL, "security.shared=true").stdout
    assert "security.shared=true" in out
    info = popek_json("storage", "volume", "info", "local", VOL)
    assert (info["shared"], info["config"]) == (True, {"security.shared": "true"})
    popek("storage", "volume", "attach", f"local/{VOL}", B, "--path", "/data")
    assert popek_json("storage", "volume", "info", "local", VOL)["holders"] == [
        f"default/{A}", f"default/{B}"]
    assert len(bound_loops(str(two))) == 1  # one device, so one superblock
    sh(A, "echo from-a > /shared/note && chown 1000:1000 /shared/note")
    assert sh(B, "cat /data/note") == "from-a\n"  # seen at once: the same cache
    assert sh(B, "stat -c %u /data/note") == "1000\n"  # each sees ids as its own
    assert sh(B, "stat -c %u:%g /data") == "0:0\n"
    sh(B, "echo from-b >> /data/note")
    assert sh(A, "cat /shared/note") == "from-a\nfrom-b\n"
    ids = {popek_json("info", n)["uid"] for n in (A, B)}
    assert len(ids) == 2  # two id ranges, one volume


def test_unmark_and_delete_name_the_holders(two: Path) -> None:
    proc = popek("storage", "volume", "set", "local", VOL, "security.shared=false",
                 check=False)
    assert proc.returncode != 0
    assert f"held by default/{A}, default/{B}" in proc.stderr, proc.stderr
    proc = popek("storage", "volume", "delete", "local", VOL, check=False)
    assert proc.returncode != 0
    assert f"attached to default/{A}, default/{B}" in proc.stderr, proc.stderr
    assert popek_json("storage", "volume", "info", "local", VOL)["shared"] is True


def test_detaching_one_leaves_the_other_working_and_stopping_both_frees_the_device(
        two: Path) -> None:
    popek("storage", "volume", "detach", f"local/{VOL}", A)
    assert " /shared " not in sh(A, "cat /proc/mounts")
    sh(B, "echo after > /data/after && sync")
    assert sh(B, "cat /data/note /data/after") == "from-a\nfrom-b\nafter\n"
    assert len(bound_loops(str(two))) == 1
    popek("storage", "volume", "attach", f"local/{VOL}", A, "--path", "/shared")
    assert sh(A, "cat /shared/after") == "after\n"  # back on the same device
    assert len(bound_loops(str(two))) == 1
    popek("stop", A)
    assert sh(B, "cat /data/after") == "after\n"  # A's stop leaves B's mount
    assert len(bound_loops(str(two))) == 1
    popek("stop", B)
    assert released(two)  # the last holder gone: the device released
    popek("start", B)  # a fresh device, the data kept
    assert sh(B, "cat /data/after") == "after\n"
    popek("stop", B)
    assert released(two)
