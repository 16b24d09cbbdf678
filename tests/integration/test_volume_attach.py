"""A block volume attached to a real VM at launch (issue 15.3, the part that is built).

``popek launch ... --disk POOL/VOLUME``: the guest sees the volume as
``/dev/vda`` (QEMU gets descriptors of its files, never paths: the jail holds
none), with the data written on the host before, through the snapshot chain
it reads; what the guest writes survives a stop and a start; while attached
the volume is not deleted, snapshotted nor attached to a second VM; deleting
the VM frees it, and a clone of a snapshot taken after shows in another VM
the data the first one wrote.  One VM boot at a time under TCG.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import popek, popek_json, require_root_and_tools
from popek.errors import NOT_FOUND, WRONG_STATE

require_root_and_tools()

VM, VM2 = "hatt-vm", "hatt-vm2"
MiB = 1 << 20


def guest(name: str, script: str) -> str:
    return popek("exec", name, "--", "sh", "-c", script, timeout=120).stdout


@pytest.fixture(scope="module")
def volume(popek_home: Path, minimal_image: str) -> Iterator[Path]:
    import subprocess

    popek("storage", "volume", "create", "local", "hatt-data", "--size", "64MiB")
    f = popek_home / "storage" / "local" / "default" / "hatt-data.qcow2"
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 512", str(f)],
                   check=True, capture_output=True)
    popek("storage", "volume", "snapshot", "local", "hatt-data", "s1")  # read through a chain
    yield f
    for name in (VM, VM2):
        popek("delete", "--force", name, check=False)
    for vol in ("hatt-copy", "hatt-data"):
        popek("storage", "volume", "delete", "local", vol, check=False)


def test_a_vm_reads_and_writes_its_volume_across_a_restart(volume: Path,
                                                          minimal_image: str) -> None:
    popek("launch", minimal_image, VM, "--memory", "256MiB", "--disk", "local/hatt-data")
    info = popek_json("storage", "volume", "info", "local", "hatt-data")
    assert info["attached"] == f"default/{VM}"
    assert guest(VM, "head -c 8 /dev/vda") == "aaaaaaaa"  # the host's data, via snapshot s1
    guest(VM, "printf popek-persist | dd of=/dev/vda bs=512 seek=8 conv=notrunc,fsync")
    argv = (Path(popek_json("info", VM)["workdir"]) / "qemu.argv.json").read_text()
    assert str(volume) not in argv and "/dev/fdset/" in argv  # descriptors, no path
    popek("stop", VM)
    popek("start", VM)
    assert guest(VM, "dd if=/dev/vda bs=512 skip=8 count=1 2>/dev/null | head -c 13") == \
        "popek-persist"


def test_an_attached_volume_is_held(volume: Path, minimal_image: str) -> None:
    for args in (["storage", "volume", "delete", "local", "hatt-data"],
                 ["storage", "volume", "snapshot", "local", "hatt-data", "s2"]):
        proc = popek(*args, check=False)
        assert proc.returncode == WRONG_STATE, proc.stderr
        assert f"attached to default/{VM}" in proc.stderr
        assert f"popek storage volume detach local/hatt-data {VM}" in proc.stderr
    proc = popek("launch", minimal_image, VM2, "--disk", "local/hatt-data", check=False)
    assert proc.returncode == WRONG_STATE and "one instance at a time" in proc.stderr
    proc = popek("launch", minimal_image, VM2, "--disk", "local/nosuch", check=False)
    assert proc.returncode == NOT_FOUND and "volume 'nosuch' not found" in proc.stderr
    assert VM2 not in {i["name"] for i in popek_json("list")}  # nothing was made
    proc = popek("launch", minimal_image, VM2, "--container", "--disk", "local/hatt-data",
                 check=False)
    assert "is a block volume: a container takes filesystem volumes" in proc.stderr


def test_deleting_the_vm_frees_the_volume_and_a_clone_keeps_its_data(
        volume: Path, minimal_image: str) -> None:
    popek("delete", "--force", VM)
    assert popek_json("storage", "volume", "info", "local", "hatt-data")["attached"] == ""
    popek("storage", "volume", "snapshot", "local", "hatt-data", "s2")
    popek("storage", "volume", "clone", "local", "hatt-data", "s2", "hatt-copy")
    popek("launch", minimal_image, VM2, "--memory", "256MiB", "--disk", "local/hatt-copy")
    assert guest(VM2, "dd if=/dev/vda bs=512 skip=8 count=1 2>/dev/null | head -c 13") == \
        "popek-persist"
    popek("delete", "--force", VM2)


@pytest.fixture(scope="module")
def bare_vm(volume: Path, minimal_image: str) -> str:
    """VM launched with no disk, once for the tests below (one TCG boot, not one each):
    each finds it running with no volume and leaves it so; ``volume`` deletes it."""
    popek("delete", "--force", VM, check=False)  # the one the tests above had
    popek("launch", minimal_image, VM, "--memory", "256MiB")
    return VM


def test_attach_and_detach_on_a_stopped_vm(volume: Path, bare_vm: str) -> None:
    """``popek storage volume attach|detach POOL/VOLUME VM`` on a stopped VM: the disk from
    the next start once attached, gone once detached."""
    popek("storage", "volume", "create", "local", "hatt-late", "--size", "16MiB")
    try:
        popek("stop", VM)
        assert popek("storage", "volume", "attach", "local/hatt-late", VM).stdout == \
            f"Volume local/hatt-late attached to {VM}.\n"
        assert popek_json("info", VM)["volumes"] == ["local/hatt-late"]
        popek("start", VM)
        assert guest(VM, "cat /sys/block/vda/size") == str(16 * MiB // 512) + "\n"
        popek("stop", VM)
        popek("storage", "volume", "detach", "local/hatt-late", VM)
        assert popek_json("storage", "volume", "info", "local", "hatt-late")["attached"] == ""
        popek("start", VM)
        assert guest(VM, "ls /sys/block | grep -c vd || true") == "0\n"
        proc = popek("storage", "volume", "detach", "local/hatt-late", VM, check=False)
        assert proc.returncode == NOT_FOUND and "attached: none" in proc.stderr
    finally:
        popek("storage", "volume", "detach", "local/hatt-late", VM, check=False)
        popek("storage", "volume", "delete", "local", "hatt-late", check=False)


def _disks(name: str) -> str:
    return guest(name, "cd /sys/block && for d in vd*; do [ -e $d ] && echo $d $(cat $d/size)"
                       "; done; true")


def test_hot_plug_grow_and_unplug_on_a_running_vm(volume: Path, bare_vm: str) -> None:
    """A volume plugged into the running VM appears as a disk (virtio-blk on a PCIe root
    port), takes writes, grows live (QMP block_resize: the guest sees the new capacity), is
    not shrunk while attached, and unplugs again: the guest loses the disk, the volume is
    free, and what the guest wrote is in its file."""
    popek("storage", "volume", "create", "local", "hatt-hot", "--size", "16MiB")
    f = volume.parent / "hatt-hot.qcow2"
    try:
        assert _disks(VM) == ""
        popek("storage", "volume", "attach", "local/hatt-hot", VM)
        assert popek_json("storage", "volume", "info", "local", "hatt-hot")["attached"] == \
            f"default/{VM}"
        assert _disks(VM) == f"vda {16 * MiB // 512}\n"
        assert guest(VM, "cat /sys/block/vda/serial") == "hatt-hot"
        guest(VM, "printf popek-hot | dd of=/dev/vda bs=512 seek=3 conv=notrunc,fsync")
        popek("storage", "volume", "resize", "local", "hatt-hot", "48MiB")
        assert _disks(VM) == f"vda {48 * MiB // 512}\n"
        assert popek_json("storage", "volume", "info", "local", "hatt-hot")["size"] == 48 * MiB
        proc = popek("storage", "volume", "resize", "local", "hatt-hot", "8MiB",
                     check=False)
        assert proc.returncode != 0 and "cannot shrink" in proc.stderr, proc.stderr
        # a running VM's disk cannot be held still: no snapshot of it (torn otherwise)
        proc = popek("storage", "volume", "snapshot", "local", "hatt-hot", "s", check=False)
        assert proc.returncode != 0 and "detach it first" in proc.stderr, proc.stderr
        assert popek_json("storage", "volume", "info", "local", "hatt-hot")["snapshots"] == []
        popek("storage", "volume", "detach", "local/hatt-hot", VM)
        assert _disks(VM) == ""
        assert popek_json("info", VM)["volumes"] == []
        assert popek_json("storage", "volume", "info", "local", "hatt-hot")["attached"] == ""
        import subprocess

        out = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -v 1536 9", str(f)],
                             check=True, capture_output=True, text=True).stdout
        assert b"popek-hot".hex(" ") in out  # written through the hot-plugged disk, kept
        # plugged in again, the same slot free again: the data is there
        popek("storage", "volume", "attach", "local/hatt-hot", VM)
        assert guest(VM, "dd if=/dev/vda bs=512 skip=3 count=1 2>/dev/null | head -c 9") == \
            "popek-hot"
    finally:
        popek("storage", "volume", "detach", "local/hatt-hot", VM, check=False)
        popek("storage", "volume", "delete", "local", "hatt-hot", check=False)
