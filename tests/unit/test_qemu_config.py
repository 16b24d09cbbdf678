"""QEMU command line and accelerator choice (no QEMU is started here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from popek.engines.base import LaunchSpec
from popek.engines.qemu import accel
from popek.engines.qemu.cmdline import SANDBOX, build_argv
from popek.errors import InvalidInput
from popek.images import ImageStore


def _spec(tmp_path: Path) -> LaunchSpec:
    from unit.test_images_manifest import make_image_dir

    make_image_dir(tmp_path / "images")
    image = ImageStore(root=tmp_path / "images", cache=tmp_path / "cache").get("minimal")
    return LaunchSpec("vm1", tmp_path, 2, 256 << 20, 900000000, 900000000, image,
                      "console=ttyS0")


def test_argv_is_hardened(tmp_path: Path) -> None:
    argv = build_argv(_spec(tmp_path), "tcg", "/usr/bin/qemu-system-x86_64")
    joined = " ".join(argv)
    assert argv[argv.index("-sandbox") + 1] == SANDBOX
    for flag in ("-nodefaults", "-no-user-config"):
        assert flag in argv
    assert "accel=tcg" in joined and "-smp 2" in joined and "-m 256M" in joined
    # QEMU boots from the verified copies in the instance directory, never the image files
    assert argv[argv.index("-kernel") + 1] == str(tmp_path / "kernel.verified")
    assert argv[argv.index("-initrd") + 1] == str(tmp_path / "initrd.verified")
    # no host channels: no shared folders, USB, host devices, spice, vnc
    for forbidden in ("virtfs", "virtio-9p", "vhost-user-fs", "usb", "vfio", "spice", "vnc",
                      "-daemonize", "-runas"):
        assert forbidden not in joined


def _fake_sys(tmp_path: Path, module: str) -> Path:
    (tmp_path / "sys" / module).mkdir(parents=True)
    return tmp_path / "sys"


def test_software_kvm_is_not_used(tmp_path: Path) -> None:
    # kvm_pvm (software-backed) must give tcg even though /dev/kvm answers
    assert accel.detect(Path("/dev/kvm"), _fake_sys(tmp_path, "kvm_pvm")) == "tcg"


def test_hardware_kvm_is_used_when_it_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    # Mocked: this machine has no hardware KVM; the ioctl probe is replaced.
    monkeypatch.setattr(accel, "kvm_answers", lambda dev=None: True)
    assert accel.detect(Path("/dev/kvm"), _fake_sys(tmp_path, "kvm_intel")) == "kvm"
    monkeypatch.setattr(accel, "kvm_answers", lambda dev=None: False)
    assert accel.detect(Path("/dev/kvm"), tmp_path / "sys") == "tcg"


def test_no_kvm_module_means_tcg(tmp_path: Path) -> None:
    assert accel.detect(tmp_path / "nokvm", tmp_path) == "tcg"


def test_this_host_chooses_tcg() -> None:
    if not Path("/sys/module/kvm_pvm").exists():
        pytest.skip("this host does not have the software-backed KVM")
    assert accel.choose("auto") == "tcg"


def test_invalid_accel() -> None:
    with pytest.raises(InvalidInput, match="allowed: auto, kvm, tcg"):
        accel.choose("xen")


def test_a_volume_is_descriptors_and_its_backing_chain_is_built_by_popek() -> None:
    """No volume path in the argv (the jail holds none): fd sets; each backing node is
    declared before the node it backs and named explicitly, the last with none, so QEMU
    never follows a file name from an image header."""
    import json

    from popek.engines.qemu.cmdline import disk_args

    argv = disk_args([("local/data", [10, 11, 12])], ["rp1"])
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "-add-fd"] == [
        "fd=10,set=1", "fd=11,set=2", "fd=12,set=3"]
    nodes = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]
    files = {n["node-name"]: n for n in nodes if n["driver"] == "file"}
    qcow2 = [n for n in nodes if n["driver"] == "qcow2"]
    assert [n["node-name"] for n in qcow2] == ["vol0-2", "vol0-1", "vol0-0"]
    assert [n["backing"] for n in qcow2] == [None, "vol0-2", "vol0-1"]
    assert [n["read-only"] for n in qcow2] == [True, True, False]
    assert files["vol0-0-file"]["filename"] == "/dev/fdset/1"
    assert files["vol0-2-file"]["filename"] == "/dev/fdset/3"
    assert not files["vol0-0-file"]["read-only"] and files["vol0-2-file"]["read-only"]
    # on a root port of its own, so that it can be unplugged while the VM runs
    assert argv[-2] == "-device" and json.loads(argv[-1]) == {
        "driver": "virtio-blk-pci", "drive": "vol0-shared", "id": "disk0", "serial": "data",
        "bus": "rp1"}


def test_every_disk_is_under_its_volume_group_and_the_instance_group() -> None:
    """Above each volume's top node: a throttle filter of the volume's own group, then one
    of the group all the instance's disks share; the groups carry the limits set (QEMU's
    names), and exist unlimited too, so a later limit is one qom-set."""
    import json

    from popek.engines.qemu.cmdline import disk_args, throttle_limits
    from popek.iolimits import IoLimits

    argv = disk_args([("local/a", [10]), ("local/b", [11])], ["rp1", "rp2"],
                     limits=[IoLimits(write_bps=10 << 20)], shared=IoLimits(read_iops=300))
    groups = {o["id"]: o["limits"] for o in
              (json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-object")}
    assert groups == {"tg-all": {"iops-read": 300}, "tg-vol0": {"bps-write": 10 << 20},
                      "tg-vol1": {}}
    throttles = {n["node-name"]: (n["throttle-group"], n["file"]) for n in
                 (json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev")
                 if n["driver"] == "throttle"}
    assert throttles == {"vol0-limit": ("tg-vol0", "vol0-0"),
                         "vol0-shared": ("tg-all", "vol0-limit"),
                         "vol1-limit": ("tg-vol1", "vol1-0"),
                         "vol1-shared": ("tg-all", "vol1-limit")}
    devices = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-device"]
    assert [d["drive"] for d in devices] == ["vol0-shared", "vol1-shared"]
    # a live change names every kind: QEMU keeps the old value of a kind left out
    assert throttle_limits(IoLimits(write_bps=1 << 20), every=True) == {
        "bps-read": 0, "bps-write": 1 << 20, "iops-read": 0, "iops-write": 0}
    # the instance's group exists without disks too: a disk plugged in later joins it
    assert disk_args([]) == ["-object", json.dumps(
        {"qom-type": "throttle-group", "id": "tg-all", "limits": {}})]
