"""The ``ceph`` storage driver on a real Ceph cluster (issue 15.1/15.2/15.6/15.7).

The session's cluster (tests/framework/ceph.py: 1 mon, 3 BlueStore OSDs on
sparse files, loopback only) holds the RBD pool ``rbd``; popek reaches it as
``client.popek``, whose caps are RBD in that pool only.  What popek did is
checked on the cluster itself, through librbd (images, snapshots, parents,
bytes), never through popek's own records alone.  Crash safety: a real
process is killed with SIGKILL before and after each driver step, then
reconcile must leave the records and the images agreeing.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from framework import popek, popek_json, require_root_and_tools
from framework.ceph import CLIENT, RBD_POOL, CephCluster
from popek.errors import BAD_INPUT, WRONG_STATE, StateError
from popek.state.store import SQLiteStore
from popek.storage.cephpool import CephPool, mon_servers
from popek.storage.service import Storage

require_root_and_tools("qemu-img")

POOL = "cephp"
MiB = 1 << 20
GiB = 1 << 30


def settings(cluster: CephCluster, **changed: str) -> list[str]:
    conf = {"conf": str(cluster.conf), "keyring": str(cluster.keyring), "pool": RBD_POOL,
            "client": CLIENT, **changed}
    return [f"{k}={v}" for k, v in conf.items()]


@pytest.fixture(scope="module")
def pool(popek_home: Path, ceph_cluster: CephCluster) -> Iterator[str]:
    out = popek("storage", "create", POOL, "ceph", *settings(ceph_cluster)).stdout
    assert out.startswith(f"Storage pool {POOL} created (ceph, ceph:{RBD_POOL}, "), out
    assert out.endswith(", HEALTH_OK).\n"), out
    yield POOL
    for vol in sorted(popek_json("storage", "volume", "list", POOL),
                      key=lambda v: not v["origin"]):  # clones first
        popek("storage", "volume", "delete", POOL, vol["name"], check=False)
    popek("storage", "delete", POOL, check=False)


class Rbd:
    """The cluster seen as client.admin through librbd: what is really there."""

    def __init__(self, cluster: CephCluster) -> None:
        import rados
        import rbd

        self.rbd = rbd
        self.cluster = rados.Rados(conffile=str(cluster.conf), rados_id="admin",
                                   conf={"keyring": str(cluster.admin_keyring)})
        self.cluster.connect(timeout=10)
        self.io = self.cluster.open_ioctx(RBD_POOL)

    def images(self, prefix: str) -> list[str]:
        return sorted(n for n in self.rbd.RBD().list(self.io) if n.startswith(prefix + "."))

    def image(self, name: str, snap: str | None = None) -> Any:
        return self.rbd.Image(self.io, name, snapshot=snap)

    def close(self) -> None:
        self.io.close()
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def rbd(ceph_cluster: CephCluster) -> Iterator[Rbd]:
    r = Rbd(ceph_cluster)
    yield r
    r.close()


def prefix_of(pool: str) -> str:
    return str(popek_json("storage", "info", pool)["config"]["prefix"])


def test_a_ceph_pool_shows_its_space_and_health(pool: str, ceph_cluster: CephCluster) -> None:
    info = popek_json("storage", "info", pool)
    assert info["driver"] == "ceph" and info["health"] == "HEALTH_OK"
    assert info["config"]["pool"] == RBD_POOL and info["config"]["client"] == CLIENT
    assert info["config"]["prefix"].startswith("popek-")
    # the cluster's own df: 3 x 10 GiB raw, 3 replicas, so about 10 GiB for the pool
    assert 8 * GiB < info["size"] <= 10 * GiB and 0 < info["free"] <= info["size"]
    row = next(r for r in popek("storage", "list").stdout.splitlines() if r.startswith(pool))
    assert row.split()[1:3] == ["ceph", f"ceph:{RBD_POOL}"] and row.split()[-1] == "HEALTH_OK"
    ceph_cluster.ceph("osd", "set", "noout")  # a warning the cluster raises: info shows it
    try:
        assert popek_json("storage", "info", pool)["health"].startswith(
            "HEALTH_WARN: noout flag(s) set")
    finally:
        ceph_cluster.ceph("osd", "unset", "noout")


@pytest.mark.parametrize(("changed", "said"), [
    ({"pool": "nope"}, "Ceph pool 'nope' does not exist in the Ceph cluster of pool bad "),
    ({"path": "/srv"}, "unknown setting 'path' for a ceph pool; allowed: conf, keyring, pool, "
                       "client"),
    ({"conf": "relative.conf"}, "invalid conf 'relative.conf': give an absolute path"),
    ({"keyring": "/nonexistent/k"}, "keyring file /nonexistent/k does not exist or is not "
                                    "readable"),
    ({"client": "no/pe"}, "invalid ceph client name 'no/pe'"),
])
def test_bad_ceph_pools_are_one_line_and_change_nothing(pool: str, ceph_cluster: CephCluster,
                                                        changed: dict[str, str],
                                                        said: str) -> None:
    r = popek("storage", "create", "bad", "ceph", *settings(ceph_cluster, **changed),
              check=False)
    assert r.returncode == BAD_INPUT and r.stderr.startswith(f"Error: {said}"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "bad" not in {p["name"] for p in popek_json("storage", "list")}


def test_the_same_ceph_pool_is_one_popek_pool(pool: str, ceph_cluster: CephCluster) -> None:
    r = popek("storage", "create", "twice", "ceph", *settings(ceph_cluster), check=False)
    assert r.returncode == BAD_INPUT and f"is already popek pool '{pool}'" in r.stderr, r.stderr


def dead_conf(cluster: CephCluster, where: Path) -> Path:
    """A copy of the cluster's config whose monitor is a port nothing listens on."""
    from framework import free_port

    text = "".join(line if not line.startswith("mon host") else
                   f"mon host = 127.0.0.1:{free_port()}\n"
                   for line in cluster.conf.read_text().splitlines(keepends=True))
    where.write_text(text)
    return where


def test_an_unreachable_cluster_is_a_clear_error_within_seconds(
        pool: str, ceph_cluster: CephCluster, tmp_path: Path) -> None:
    conf = dead_conf(ceph_cluster, tmp_path / "dead.conf")
    t0 = time.monotonic()
    r = popek("storage", "create", "gone", "ceph", *settings(ceph_cluster, conf=str(conf)),
              check=False, timeout=60)
    took = time.monotonic() - t0
    assert r.returncode == BAD_INPUT and took < 15, (took, r.stderr)
    assert "did not answer within 5 s: is it running and reachable from this host?" in \
        r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "gone" not in {p["name"] for p in popek_json("storage", "list")}


def test_a_pool_whose_cluster_went_away_says_so(ceph_cluster: CephCluster, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path))
    storage = Storage(SQLiteStore(tmp_path / "state.db"))
    conf = tmp_path / "ceph.conf"
    conf.write_text(ceph_cluster.conf.read_text())
    storage.create_pool("far", "ceph", dict(s.split("=", 1) for s in
                                            settings(ceph_cluster, conf=str(conf))))
    dead_conf(ceph_cluster, conf)  # the cluster's monitor moved away
    t0 = time.monotonic()
    with pytest.raises(StateError, match="unavailable .*did not answer within 5 s"):
        storage.create_volume("far", "default", "v", 16 * MiB)
    assert time.monotonic() - t0 < 15
    assert storage.volumes("far") == []  # nothing recorded
    info = storage.pool_info("far")
    assert info["health"].startswith("unavailable: ") and time.monotonic() - t0 < 30
    storage.delete_pool("far")


def test_volumes_live_on_the_cluster(pool: str, rbd: Rbd) -> None:
    prefix = prefix_of(pool)
    out = popek("storage", "volume", "create", pool, "data", "--size", "64MiB").stdout
    assert out == f"Volume {pool}/data created (block, 64MiB).\n"
    image = f"{prefix}.default.data"
    assert rbd.images(prefix) == [image]
    with rbd.image(image) as im:
        assert im.size() == 64 * MiB and im.features() & rbd.rbd.RBD_FEATURE_LAYERING
        im.write(b"\xaa" * 65536, 0)
    assert popek("storage", "volume", "resize", pool, "data", "96MiB").stdout == \
        f"Volume {pool}/data resized to 96MiB.\n"
    info = popek_json("storage", "volume", "info", pool, "data")
    assert info["size"] == 96 * MiB and info["used"] == 4 * MiB  # one RBD object written
    with rbd.image(image) as im:
        assert im.size() == 96 * MiB
    popek("storage", "volume", "snapshot", pool, "data", "s1")
    with rbd.image(image) as im:
        assert [s["name"] for s in im.list_snaps()] == ["s1"]
        im.write(b"\xbb" * 65536, 0)
    popek("storage", "volume", "clone", pool, "data", "s1", "copy")
    with rbd.image(f"{prefix}.default.copy") as im:
        assert im.parent_info() == (RBD_POOL, image, "s1") and im.read(0, 4) == b"\xaa" * 4
        im.write(b"\xcc" * 4, 0)  # copy on write: the origin keeps its data
    popek("storage", "volume", "restore", pool, "data", "s1")
    with rbd.image(image) as im:
        assert im.read(0, 4) == b"\xaa" * 4
    r = popek("storage", "volume", "snapshot-delete", pool, "data", "s1", check=False)
    assert r.returncode == WRONG_STATE and "the origin of clone(s) default/copy" in r.stderr
    r = popek("storage", "volume", "delete", pool, "data", check=False)
    assert r.returncode == WRONG_STATE and "the origin of clone(s) default/copy" in r.stderr
    assert rbd.images(prefix) == [f"{prefix}.default.copy", image]  # nothing changed
    popek("storage", "volume", "delete", pool, "copy")
    popek("storage", "volume", "snapshot-delete", pool, "data", "s1")
    with rbd.image(image) as im:
        assert list(im.list_snaps()) == []
    popek("storage", "volume", "delete", pool, "data")
    assert rbd.images(prefix) == [] and popek_json("storage", "volume", "list", pool) == []


def test_a_filesystem_volume_is_refused_in_a_ceph_pool(pool: str) -> None:
    r = popek("storage", "volume", "create", pool, "fs", "--size", "32MiB", "--type",
              "filesystem", check=False)
    assert r.returncode == BAD_INPUT and "is a ceph pool: it holds block volumes" in r.stderr


def test_import_and_export_keep_the_data(pool: str, tmp_path: Path, rbd: Rbd) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(3 * MiB) + bytes(5 * MiB))
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    r = popek("storage", "volume", "import", pool, "imported", str(qcow2))
    assert r.stdout.endswith(f"Volume {pool}/imported imported from {qcow2} (8MiB).\n")
    with rbd.image(f"{prefix_of(pool)}.default.imported") as im:
        assert im.size() == 8 * MiB and im.read(0, 3 * MiB) == raw.read_bytes()[:3 * MiB]
    for fmt in ("raw", "qcow2"):
        out = tmp_path / f"out.{fmt}"
        popek("storage", "volume", "export", pool, "imported", str(out), "--format", fmt)
        back = tmp_path / f"back-{fmt}.raw"
        subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(out), str(back)],
                       check=True)
        assert back.read_bytes() == raw.read_bytes()
    popek("storage", "volume", "delete", pool, "imported")


def test_a_clone_takes_the_same_time_whatever_the_size(
        ceph_cluster: CephCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path))
    storage = Storage(SQLiteStore(tmp_path / "state.db"))
    storage.create_pool("flat", "ceph", dict(s.split("=", 1) for s in settings(ceph_cluster)))
    took: dict[int, float] = {}
    for size in (1 * GiB, 16 * GiB):
        name = f"v{size >> 30}"
        storage.create_volume("flat", "default", name, size)
        storage.snapshot_volume("flat", "default", name, "s")
        times = []
        for i in range(3):
            t0 = time.perf_counter()
            storage.clone_volume("flat", "default", name, "s", f"{name}-c{i}")
            times.append(time.perf_counter() - t0)
        took[size] = statistics.median(times)
    for vol in sorted(storage.volumes("flat"), key=lambda v: not v.origin):
        storage.delete_volume("flat", "default", vol.name)
    assert storage.volumes("flat") == []
    # 16 times the size, about the same time: no data is copied (16 GiB would take minutes)
    assert took[16 * GiB] < max(2 * took[GiB], took[GiB] + 0.25) and took[16 * GiB] < 2, took
    print(f"clone: 1 GiB {took[GiB] * 1000:.0f} ms, 16 GiB {took[16 * GiB] * 1000:.0f} ms")
    storage.delete_pool("flat")


# -- a process killed at each step (issue 15.6) --------------------------------------

_KILLED = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from popek.state.store import SQLiteStore
    from popek.storage import cephpool
    from popek.storage.service import Storage

    step, op = sys.argv[2], sys.argv[3]
    real = getattr(cephpool.CephPool, op)

    def killed(self, *args):  # before the driver acts, or after it acted
        if step == "after":
            real(self, *args)
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(cephpool.CephPool, op, killed)
    storage = Storage(SQLiteStore(Path(sys.argv[1])))
    {
        "create": lambda: storage.create_volume("kp", "default", "n", 16 << 20),
        "import_file": lambda: storage.import_volume("kp", "default", "n", Path(sys.argv[4])),
        "resize": lambda: storage.resize_volume("kp", "default", "v", 48 << 20),
        "delete": lambda: storage.delete_volume("kp", "default", "v"),
        "snapshot": lambda: storage.snapshot_volume("kp", "default", "v", "s2"),
        "restore": lambda: storage.restore_volume("kp", "default", "v", "s1"),
        "clone": lambda: storage.clone_volume("kp", "default", "v", "s1", "n"),
        "delete_snapshot": lambda: storage.delete_snapshot("kp", "default", "v", "s1"),
    }[op]()
""")

#: what reconcile says and leaves, by operation and step: (its word, volumes, v's
#: snapshots, v's size in MiB, the byte v's start reads)
OUTCOMES: dict[tuple[str, str], tuple[str, list[str], list[str], int, int]] = {
    ("create", "before"): ("rolled back", ["v"], ["s1"], 16, 0xbb),
    ("create", "after"): ("rolled back", ["v"], ["s1"], 16, 0xbb),
    ("import_file", "before"): ("rolled back", ["v"], ["s1"], 16, 0xbb),
    ("import_file", "after"): ("rolled back", ["v"], ["s1"], 16, 0xbb),
    ("resize", "before"): ("settled at 16MiB", ["v"], ["s1"], 16, 0xbb),
    ("resize", "after"): ("settled at 48MiB", ["v"], ["s1"], 48, 0xbb),
    ("delete", "before"): ("finished", [], [], 0, 0),
    ("delete", "after"): ("finished", [], [], 0, 0),
    ("snapshot", "before"): ("rolled back", ["v"], ["s1"], 16, 0xbb),
    ("snapshot", "after"): ("finished", ["v"], ["s1", "s2"], 16, 0xbb),
    # a restore is rolled forward: the rollback is done again (a half one is no state)
    ("restore", "before"): ("settled", ["v"], ["s1"], 16, 0xaa),
    ("restore", "after"): ("settled", ["v"], ["s1"], 16, 0xaa),
    ("clone", "before"): ("rolled back", ["v"], ["s1"], 16, 0xbb),
    ("clone", "after"): ("rolled back", ["v"], ["s1"], 16, 0xbb),
    ("delete_snapshot", "before"): ("finished", ["v"], [], 16, 0xbb),
    ("delete_snapshot", "after"): ("finished", ["v"], [], 16, 0xbb),
}


@pytest.mark.parametrize("step", ["before", "after"])
@pytest.mark.parametrize("op", ["create", "import_file", "resize", "delete", "snapshot",
                                "restore", "clone", "delete_snapshot"])
def test_a_ceph_operation_killed_midway_leaves_a_consistent_pool(
        ceph_cluster: CephCluster, rbd: Rbd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        op: str, step: str) -> None:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path))
    storage = Storage(SQLiteStore(tmp_path / "state.db"))
    pool = storage.create_pool("kp", "ceph", dict(s.split("=", 1)
                                                  for s in settings(ceph_cluster)))
    prefix = pool.config["prefix"]
    storage.create_volume("kp", "default", "v", 16 * MiB)
    with rbd.image(f"{prefix}.default.v") as im:
        im.write(b"\xaa" * 65536, 0)
    storage.snapshot_volume("kp", "default", "v", "s1")
    with rbd.image(f"{prefix}.default.v") as im:
        im.write(b"\xbb" * 65536, 0)
    source = tmp_path / "src.raw"
    source.write_bytes(b"\x11" * MiB)
    proc = subprocess.run([sys.executable, "-c", _KILLED, str(tmp_path / "state.db"), step, op,
                           str(source)], capture_output=True, text=True, timeout=120,
                          check=False, env={**os.environ, "POPEK_HOME": str(tmp_path)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    done = storage.reconcile()
    word, vols, snaps, size, byte = OUTCOMES[(op, step)]
    assert len(done) == 1 and word in done[0], done
    assert [v.name for v in storage.volumes("kp")] == vols
    assert rbd.images(prefix) == [f"{prefix}.default.{n}" for n in vols]  # no orphan image
    if vols:
        vol = storage.volume("kp", "default", "v")
        assert vol.state == "ready" and vol.snapshot_names() == snaps
        with rbd.image(f"{prefix}.default.v") as im:
            assert [s["name"] for s in im.list_snaps()] == snaps
            assert im.size() == vol.size == size * MiB and im.read(0, 1)[0] == byte
    assert storage.reconcile() == []
    for v in storage.volumes("kp"):
        storage.delete_volume("kp", "default", v.name)
    assert rbd.images(prefix) == []
    storage.delete_pool("kp")


_KILLED_ENCRYPTED = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from popek.state.store import SQLiteStore
    from popek.storage import dirpool
    from popek.storage.service import Storage

    real = dirpool.run_tool

    def killed(*args, **kw):  # before qemu-img writes the LUKS image, or after (no metadata)
        if sys.argv[2] == "after":
            real(*args, **kw)
        os.kill(os.getpid(), signal.SIGKILL)

    dirpool.run_tool = killed
    storage = Storage(SQLiteStore(Path(sys.argv[1])), lambda project, create: "k" * 32)
    storage.create_volume("kp", "default", "n", 16 << 20, encrypt=True)
""")


@pytest.mark.parametrize("step", ["before", "after"])
def test_an_encrypted_ceph_create_killed_midway_leaves_no_image(
        ceph_cluster: CephCluster, rbd: Rbd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        step: str) -> None:
    """Killed before ``qemu-img create -f luks`` ran, or after it made the image but before
    the header's size was recorded on it: reconcile removes the record and any image."""
    monkeypatch.setenv("POPEK_HOME", str(tmp_path))
    storage = Storage(SQLiteStore(tmp_path / "state.db"))
    pool = storage.create_pool("kp", "ceph", dict(s.split("=", 1)
                                                  for s in settings(ceph_cluster)))
    prefix = pool.config["prefix"]
    proc = subprocess.run([sys.executable, "-c", _KILLED_ENCRYPTED, str(tmp_path / "state.db"),
                           step], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "POPEK_HOME": str(tmp_path)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    made = rbd.images(prefix)
    assert made == ([f"{prefix}.default.n"] if step == "after" else []), made  # it got there
    done = storage.reconcile()
    assert len(done) == 1 and "rolled back" in done[0], done
    assert storage.volumes("kp") == [] and rbd.images(prefix) == []
    assert storage.reconcile() == []
    storage.delete_pool("kp")


def test_reconcile_never_touches_images_of_others(ceph_cluster: CephCluster, rbd: Rbd,
                                                  tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path))
    storage = Storage(SQLiteStore(tmp_path / "state.db"))
    prefix = storage.create_pool("mine", "ceph", dict(
        s.split("=", 1) for s in settings(ceph_cluster))).config["prefix"]
    rbd.rbd.RBD().create(rbd.io, "someone-elses", MiB)
    rbd.rbd.RBD().create(rbd.io, "popek-00000000.default.other-pool", MiB)
    rbd.rbd.RBD().create(rbd.io, f"{prefix}.default.stray", MiB)  # ours, no record
    storage.create_volume("mine", "default", "v", 16 * MiB)
    vol = storage.volume("mine", "default", "v")  # an intent whose process is gone
    from popek.storage.model import Volume, volume_key

    storage.store.put(volume_key("mine", "default", "v"), Volume(
        **{**vol.__dict__, "state": "resizing", "owner": "999999999 1"}).to_json())
    done = storage.reconcile()
    assert sorted(done) == sorted([
        "mine: volume default/v: interrupted resize settled at 16MiB",
        f"mine: removed RBD image {prefix}.default.stray, which no record explains"]), done
    names = set(rbd.rbd.RBD().list(rbd.io))
    assert {"someone-elses", "popek-00000000.default.other-pool"} <= names
    for n in ("someone-elses", "popek-00000000.default.other-pool"):
        rbd.rbd.RBD().remove(rbd.io, n)
    storage.delete_volume("mine", "default", "v")
    assert rbd.images(prefix) == []


def test_the_key_is_read_from_the_keyring_for_qemu(pool: str, ceph_cluster: CephCluster) -> None:
    storage = Storage(SQLiteStore(Path(os.environ["POPEK_HOME"]) / "state.db"))
    popek("storage", "volume", "create", pool, "qk", "--size", "16MiB")
    try:
        disk = storage.rbd_disk(pool, "default", "qk")
        key = json.loads(ceph_cluster.ceph("auth", "get-key", f"client.{CLIENT}",
                                           "--format", "json"))["key"]
        assert disk == {"pool": RBD_POOL, "image": f"{prefix_of(pool)}.default.qk",
                        "user": CLIENT, "servers": mon_servers(CephPool(pool, {
                            "conf": str(ceph_cluster.conf), "keyring": str(ceph_cluster.keyring),
                            "pool": RBD_POOL, "client": CLIENT}).mon_host()), "key": key}
        assert disk["servers"] == [("127.0.0.1", ceph_cluster.conf.read_text().split(
            "v2:127.0.0.1:")[1].split(",")[0])]  # the v2 address of the one monitor
    finally:
        popek("storage", "volume", "delete", pool, "qk")


# -- a VM on a ceph volume (issue 15.3 for ceph; the cluster heals under it) ------------

VM = "hceph-vm"


def guest(name: str, script: str, timeout: float = 180) -> str:
    return popek("exec", name, "--", "sh", "-c", script, timeout=timeout).stdout


@pytest.fixture(scope="module")
def vm_volume(pool: str, minimal_image: str, rbd: Rbd) -> Iterator[str]:
    """The volume, with the host's data at its start, on VM, launched once for the
    module (one TCG boot, not one per test): each test below finds VM running with the
    volume as /dev/vda and leaves it so."""
    popek("storage", "volume", "create", pool, "vmdata", "--size", "64MiB")
    with rbd.image(f"{prefix_of(pool)}.default.vmdata") as im:
        im.write(b"a" * 512, 0)  # the host's data, read by the guest
    popek("launch", minimal_image, VM, "--memory", "256MiB", "--disk", f"{pool}/vmdata")
    yield f"{pool}/vmdata"
    popek("delete", "--force", VM, check=False)
    popek("storage", "volume", "delete", pool, "vmdata", check=False)


def test_the_key_reaches_qemu_on_no_command_line_and_in_no_file(
        vm_volume: str, minimal_image: str, ceph_cluster: CephCluster) -> None:
    """The attack: read the Ceph key where a local user could, from QEMU's command line
    (/proc/PID/cmdline is world-readable) or a file in the instance directory."""
    key = ceph_cluster.keyring.read_text().split("key = ")[1].split()[0]
    assert guest(VM, "head -c 8 /dev/vda") == "aaaaaaaa"  # the key did reach QEMU
    workdir = Path(popek_json("info", VM)["workdir"])
    pid = int((workdir / "qemu.pid").read_text())
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert b'"driver": "rbd"' in cmdline and b"key-secret" in cmdline
    assert key.encode() not in cmdline and b"keyring" not in cmdline
    for f in workdir.rglob("*"):  # the FIFO the key went through is gone
        assert not f.name.startswith("rbd"), f
        if f.is_file():
            assert key.encode() not in f.read_bytes(), f



def test_a_ceph_volume_unplugs_live_and_plugs_in_at_start(vm_volume: str,
                                                          minimal_image: str) -> None:
    assert guest(VM, "head -c 8 /dev/vda") == "aaaaaaaa"
    popek("storage", "volume", "detach", vm_volume, VM)  # live: device_del, node removed
    assert guest(VM, "ls /sys/block | grep -c vd || true") == "0\n"
    popek("stop", VM)  # (live attach: tests/integration/test_storage_ceph_live.py)
    popek("storage", "volume", "attach", vm_volume, VM)
    popek("start", VM)
    assert guest(VM, "head -c 8 /dev/vda") == "aaaaaaaa"


def test_a_vm_keeps_its_ceph_volume_through_an_osd_failure(
        vm_volume: str, minimal_image: str, ceph_cluster: CephCluster, rbd: Rbd,
        pool: str) -> None:
    assert guest(VM, "head -c 8 /dev/vda") == "aaaaaaaa"
    write = ("dd if=/dev/urandom of=/tmp/blob bs=1M count=8 2>/dev/null && "
             "dd if=/tmp/blob of=/dev/vda bs=1M seek={at} conv=fsync 2>/dev/null && "
             "echo 3 > /proc/sys/vm/drop_caches && "
             "md5sum < /tmp/blob && dd if=/dev/vda bs=1M skip={at} count=8 2>/dev/null | md5sum")
    a, b = guest(VM, write.format(at=1)).split("\n")[:2]
    assert a == b  # healthy: written and read back
    ceph_cluster.kill_osd(0)
    from framework import wait_for

    wait_for(lambda: ceph_cluster.osds_up() == 2, 60, "the killed OSD marked down")
    assert ceph_cluster.health() != "HEALTH_OK"
    assert popek_json("storage", "info", pool)["health"].startswith("HEALTH_WARN")
    a, b = guest(VM, write.format(at=16)).split("\n")[:2]  # degraded: 2 of 3 replicas
    assert a == b
    assert guest(VM, "head -c 8 /dev/vda") == "aaaaaaaa"
    ceph_cluster.start_osd(0)
    took = ceph_cluster.wait_healthy()  # recovered: HEALTH_OK, every PG active+clean
    assert popek_json("storage", "info", pool)["health"] == "HEALTH_OK"
    print(f"healed in {took:.1f} s after the OSD returned")
    marker = guest(VM, "dd if=/dev/vda bs=1M skip=16 count=8 2>/dev/null | md5sum")
    popek("stop", VM)  # the image as the cluster has it, read by the host
    with rbd.image(f"{prefix_of(pool)}.default.vmdata") as im:
        import hashlib

        assert hashlib.md5(im.read(16 << 20, 8 << 20)).hexdigest() == marker.split()[0]
    popek("start", VM)
    assert guest(VM, "dd if=/dev/vda bs=1M skip=16 count=8 2>/dev/null | md5sum") == marker


def test_the_api_makes_and_shows_a_ceph_pool(popek_home: Path, ceph_cluster: CephCluster,
                                             pool: str) -> None:
    from starlette.testclient import TestClient

    from popek.api.app import create_app

    auth: dict[str, str] = {}  # the local socket's application: root, the host admin
    config = dict(s.split("=", 1) for s in settings(  # cephp has client.popek's: admin here
        ceph_cluster, client="admin", keyring=str(ceph_cluster.admin_keyring)))
    with TestClient(create_app(local=True)) as client:
        r = client.post("/1.0/storage-pools", headers=auth,
                        json={"name": "hceph-api", "driver": "ceph", "config": config})
        assert r.status_code == 201 and r.json()["health"] == "HEALTH_OK", r.text
        r = client.post("/1.0/storage-pools", headers=auth, json={
            "name": "hceph-bad", "driver": "ceph", "config": {**config, "pool": "nope"}})
        assert r.status_code == 400 and "Ceph pool 'nope' does not exist" in r.text, r.text
        r = client.get("/1.0/storage-pools/hceph-api", headers=auth)
        moving = ("size", "free", "used")  # the cluster's df moves by bytes meanwhile
        assert {k: v for k, v in r.json().items() if k not in moving} == {
            k: v for k, v in popek_json("storage", "info", "hceph-api").items()
            if k not in moving}
        assert client.delete("/1.0/storage-pools/hceph-api", headers=auth).status_code == 200
    assert {p["name"] for p in popek_json("storage", "list")} & {"hceph-api", "hceph-bad"} == \
        set()
