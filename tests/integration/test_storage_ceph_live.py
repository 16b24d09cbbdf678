"""Ceph volumes on a running VM: live attach and detach, librbd encryption at rest and a
volume's own I/O limits (issue 15.3, 15.4 and 15.5 for ``ceph``).

One guest serves the whole module (booting one costs a minute under TCG): the tests
plug their own volumes into it and take them out again, so they do not disturb each
other; the one that stops and starts it comes last.  What popek did is checked where
it happened: in the guest, in QEMU (QMP: its objects and throttle groups) and on the
cluster itself (librados, as client.admin: every object of an image's data).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from framework import popek, popek_json, require_root_and_tools
from framework.ceph import CLIENT, RBD_POOL, CephCluster
from popek.engines.qemu import qmp

require_root_and_tools("qemu-img")

POOL = "cephlive"
VM = "hcl-vm"
MARK = "popek-ceph2-known-string-0123456789"


@pytest.fixture(scope="module")
def pool(popek_home: Path, ceph_cluster: CephCluster) -> Iterator[str]:
    popek("storage", "create", POOL, "ceph", f"conf={ceph_cluster.conf}",
          f"keyring={ceph_cluster.keyring}", f"pool={RBD_POOL}", f"client={CLIENT}")
    yield POOL
    popek("delete", "--force", VM, check=False)
    for vol in sorted(popek_json("storage", "volume", "list", POOL),
                      key=lambda v: not v["origin"]):  # clones first
        popek("storage", "volume", "delete", POOL, vol["name"], check=False)
    popek("storage", "delete", POOL, check=False)


@pytest.fixture(scope="module")
def vm(pool: str, minimal_image: str) -> str:
    popek("launch", minimal_image, VM, "--memory", "256MiB")
    return VM


@pytest.fixture(scope="module")
def admin(ceph_cluster: CephCluster) -> Iterator[Any]:
    """The RBD pool seen as client.admin through librados: what is really stored."""
    import rados

    cluster = rados.Rados(conffile=str(ceph_cluster.conf), rados_id="admin",
                          conf={"keyring": str(ceph_cluster.admin_keyring)})
    cluster.connect(timeout=10)
    io = cluster.open_ioctx(RBD_POOL)
    yield io
    io.close()
    cluster.shutdown()


def guest(script: str, timeout: float = 180) -> str:
    return popek("exec", VM, "--", "sh", "-c", script, timeout=timeout).stdout


def dev(name: str) -> str:
    """The guest's device of volume ``name`` (its serial), '' when it has none."""
    return guest(f'for d in /sys/block/vd*; do [ "$(cat $d/serial 2>/dev/null)" = {name} ] '
                 '&& echo /dev/${d##*/}; done; true').strip()


def objects() -> set[str]:
    """The ids of the QOM objects of the VM's QEMU (secrets, throttle groups...)."""
    sock = Path(popek_json("info", VM)["workdir"]) / "qmp.sock"
    return {o["name"] for o in qmp.execute(sock, "qom-list", {"path": "/objects"})}


def qmp_of(cmd: str, args: dict[str, object]) -> Any:
    return qmp.execute(Path(popek_json("info", VM)["workdir"]) / "qmp.sock", cmd, args)


def image_bytes(io: Any, name: str) -> bytes:
    """Every object of the data of RBD image ``name`` (its ``block_name_prefix``), read
    whole: what the OSDs hold."""
    import rbd

    with rbd.Image(io, f"{prefix_of()}.default.{name}", read_only=True) as im:
        data_prefix = im.stat()["block_name_prefix"]
    out = []
    for obj in io.list_objects():
        if obj.key.startswith(data_prefix + "."):
            out.append(io.read(obj.key, 8 << 20))
    assert out, f"image {name} has no data objects"
    return b"".join(out)


def prefix_of() -> str:
    return str(popek_json("storage", "info", POOL)["config"]["prefix"])


def write_mark(name: str, at_mib: int = 1) -> None:
    d = dev(name)
    assert d, f"the guest has no disk {name}"
    guest(f"yes {MARK} | head -c 1048576 > /tmp/m && "
          f"dd if=/tmp/m of={d} bs=1M seek={at_mib} conv=fsync 2>/dev/null")


def read_mark(name: str, at_mib: int = 1) -> str:
    d = dev(name)
    assert d, f"the guest has no disk {name}"
    return guest(f"echo 3 > /proc/sys/vm/drop_caches; "
                 f"dd if={d} bs=1M skip={at_mib} count=1 2>/dev/null | head -c {len(MARK)}")


# -- live attach and detach ---------------------------------------------------------------

def test_a_ceph_volume_plugs_in_live_and_keeps_its_data(vm: str, pool: str) -> None:
    popek("storage", "volume", "create", pool, "live1", "--size", "64MiB")
    before = objects()
    popek("storage", "volume", "attach", f"{pool}/live1", vm)  # running: hot-plug
    assert popek_json("info", vm)["volumes"] == [f"{pool}/live1"]
    added = objects() - before
    assert any(o.endswith("-0-key") for o in added), added  # the client key, a secret
    write_mark("live1")
    assert read_mark("live1") == MARK
    popek("storage", "volume", "detach", f"{pool}/live1", vm)  # live: device_del
    assert dev("live1") == ""
    assert objects() == before  # device, nodes, throttle group and the secret all gone
    popek("storage", "volume", "attach", f"{pool}/live1", vm)
    assert read_mark("live1") == MARK  # written, detached, attached again: still there
    popek("storage", "volume", "detach", f"{pool}/live1", vm)


def test_the_hot_plugged_key_is_on_no_command_line(vm: str, pool: str,
                                                   ceph_cluster: CephCluster) -> None:
    """The attack: read the Ceph key from QEMU's command line (world-readable in /proc)
    or from a file of the instance after a hot-plug."""
    key = ceph_cluster.keyring.read_text().split("key = ")[1].split()[0]
    popek("storage", "volume", "create", pool, "live2", "--size", "64MiB")
    popek("storage", "volume", "attach", f"{pool}/live2", vm)
    try:
        workdir = Path(popek_json("info", vm)["workdir"])
        pid = int((workdir / "qemu.pid").read_text())
        assert key.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        for f in workdir.rglob("*"):
            if f.is_file():
                assert key.encode() not in f.read_bytes(), f
        assert dev("live2")  # the key did reach QEMU: the disk is there
    finally:
        popek("storage", "volume", "detach", f"{pool}/live2", vm)


# -- encryption at rest -------------------------------------------------------------------

def test_an_encrypted_ceph_volume_keeps_no_plain_data_on_the_osds(vm: str, pool: str,
                                                                   admin: Any) -> None:
    popek("storage", "volume", "create", pool, "plainv", "--size", "64MiB")
    popek("storage", "volume", "create", pool, "encv", "--size", "64MiB", "--encrypt")
    info = popek_json("storage", "volume", "info", pool, "encv")
    assert info["size"] == 64 << 20
    for name in ("plainv", "encv"):
        popek("storage", "volume", "attach", f"{pool}/{name}", vm)
        # the guest sees the volume's size, the LUKS header not counted
        assert guest(f"blockdev --getsize64 {dev(name)}").strip() == str(64 << 20)
        write_mark(name)
        assert read_mark(name) == MARK
        popek("storage", "volume", "detach", f"{pool}/{name}", vm)
    assert MARK.encode() in image_bytes(admin, "plainv")  # the search finds plain data
    stored = image_bytes(admin, "encv")
    assert MARK.encode() not in stored
    assert stored.startswith(b"LUKS\xba\xbe")  # librbd's LUKS2 header, then ciphertext


def test_a_clone_of_an_encrypted_ceph_volume_opens_and_grows_live(vm: str, pool: str) -> None:
    if not any(v["name"] == "encv" for v in popek_json("storage", "volume", "list", pool)):
        pytest.fail("needs the volume of test_an_encrypted_ceph_volume_keeps_no_plain_data")
    popek("storage", "volume", "snapshot", pool, "encv", "s1")
    popek("storage", "volume", "clone", pool, "encv", "s1", "encc")
    assert popek_json("storage", "volume", "info", pool, "encc")["size"] == 64 << 20
    popek("storage", "volume", "attach", f"{pool}/encc", vm)
    assert read_mark("encc") == MARK  # the parent's data, through the same key
    # grown live: QEMU's luks node adds its header, the guest sees exactly the new size
    popek("storage", "volume", "resize", pool, "encc", "96MiB")
    assert guest(f"blockdev --getsize64 {dev('encc')}").strip() == str(96 << 20)
    assert read_mark("encc") == MARK
    popek("storage", "volume", "detach", f"{pool}/encc", vm)
    assert popek_json("storage", "volume", "info", pool, "encc")["size"] == 96 << 20


def test_an_encrypted_ceph_volume_cannot_be_exported_in_clear(pool: str,
                                                              tmp_path: Path) -> None:
    popek("storage", "volume", "create", pool, "encx", "--size", "16MiB", "--encrypt")
    r = popek("storage", "volume", "export", pool, "encx", str(tmp_path / "x.raw"),
              check=False)
    assert r.returncode != 0 and "would leave in clear" in r.stderr, r.stderr
    assert not (tmp_path / "x.raw").exists()
    popek("storage", "volume", "delete", pool, "encx")


# -- I/O limits ---------------------------------------------------------------------------

def test_a_ceph_volume_gets_its_own_io_limits_live(vm: str, pool: str) -> None:
    popek("storage", "volume", "create", pool, "slow", "--size", "64MiB")
    popek("storage", "volume", "attach", f"{pool}/slow", vm)
    try:
        d = dev("slow")
        write = f"dd if=/dev/zero of={d} bs=64K count=64 oflag=direct 2>/dev/null"
        t0 = time.monotonic()
        guest(write)
        free_s = time.monotonic() - t0
        popek("storage", "volume", "set", pool, "slow", "limits.disk.write_bps=1MiB")
        groups = [o for o in objects() if o.startswith("tg-vol")]
        limits = [qmp_of("qom-get", {"path": f"/objects/{g}", "property": "limits"})
                  for g in groups]
        assert any(lim.get("bps-write") == 1 << 20 for lim in limits), limits
        t0 = time.monotonic()
        guest(write)  # 4 MiB at 1 MiB/s: about 3.5 s or more (a burst of 1/10 s allowed)
        limited_s = time.monotonic() - t0
        assert limited_s > 2.5 and limited_s > free_s, (free_s, limited_s)
        popek("storage", "volume", "set", pool, "slow", "limits.disk.write_bps=0")
        limits = [qmp_of("qom-get", {"path": f"/objects/{g}", "property": "limits"})
                  for g in groups]
        assert all(not lim.get("bps-write") for lim in limits), limits
    finally:
        popek("storage", "volume", "detach", f"{pool}/slow", vm)


# -- last: the guest stops and starts -----------------------------------------------------

def test_encrypted_and_limited_ceph_volumes_open_at_start(vm: str, pool: str) -> None:
    if not any(v["name"] == "encv" for v in popek_json("storage", "volume", "list", pool)):
        pytest.fail("needs the volume of test_an_encrypted_ceph_volume_keeps_no_plain_data")
    popek("storage", "volume", "set", pool, "encv", "limits.disk.read_iops=500")
    popek("storage", "volume", "attach", f"{pool}/encv", vm)
    assert read_mark("encv") == MARK
    popek("stop", vm)
    popek("start", vm)  # plugged in at start: both keys through FIFOs, limits on its group
    assert read_mark("encv") == MARK
    workdir = Path(popek_json("info", vm)["workdir"])
    assert not [f for f in workdir.iterdir() if f.name.endswith(".key")]  # FIFOs gone
    groups = [o for o in objects() if o.startswith("tg-vol")]
    limits = [qmp_of("qom-get", {"path": f"/objects/{g}", "property": "limits"})
              for g in groups]
    assert any(lim.get("iops-read") == 500 for lim in limits), limits
    popek("storage", "volume", "detach", f"{pool}/encv", vm)
