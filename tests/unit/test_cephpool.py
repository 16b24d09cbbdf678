"""The pure parts of the ``ceph`` driver and of QEMU's rbd disks (issue 15.1/15.3).

Keyring and ``mon_host`` parsing, the settings a ceph pool takes, the QEMU
arguments of an RBD disk and the FIFO its key goes through (a real FIFO, a
real reader thread).  What needs a cluster is in
tests/integration/test_storage_ceph.py, on a real one.  No root.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from popek.engines.base import RbdDisk
from popek.engines.qemu.cmdline import disk_args, rbd_key_path
from popek.engines.qemu.keyfifo import KeyFifo
from popek.errors import EngineError, InvalidInput
from popek.state.store import SQLiteStore
from popek.storage import cephpool
from popek.storage.service import Storage

KEY = "AQBxB1BnAAAAABAAk4UFs1B3GdAq3vxk0xf+Yw=="


def test_the_key_of_a_client_is_read_from_its_keyring_section() -> None:
    text = f"[client.admin]\n\tkey = AQAAAA==\n\tcaps mon = \"allow *\"\n" \
           f"[client.popek]\n\tkey = {KEY}\n"
    assert cephpool.parse_key(text, "popek") == KEY
    assert cephpool.parse_key(text, "admin") == "AQAAAA=="
    with pytest.raises(EngineError, match=r"k holds no key for client\.other"):
        cephpool.parse_key(text, "other", "k")


def test_the_settings_of_a_ceph_pool_are_checked(tmp_path: Path) -> None:
    conf, keyring = tmp_path / "ceph.conf", tmp_path / "k"
    conf.write_text("[global]\n")
    keyring.write_text("")
    ok = {"conf": str(conf), "keyring": str(keyring), "pool": "rbd"}
    assert cephpool.check_config(ok) == {**ok, "client": "admin"}
    assert cephpool.check_config({**ok, "client": "client.popek"})["client"] == "popek"
    for bad, said in [
        ({"pool": ""}, "a ceph pool needs pool=: conf=CEPH.CONF keyring=KEYRING pool=RBD_POOL"),
        ({"conf": "ceph.conf"}, "invalid conf 'ceph.conf': give an absolute path"),
        ({"conf": f"{conf}:x"}, "without ':' or '@'"),
        ({"keyring": str(tmp_path / "none")}, "does not exist or is not readable"),
        ({"pool": "a/b"}, "invalid ceph pool name 'a/b'"),
        ({"client": "me@x"}, "invalid ceph client name 'me@x'"),
    ]:
        with pytest.raises(InvalidInput, match=said.replace("(", r"\(")):
            cephpool.check_config({**ok, **bad})


def test_a_ceph_pool_with_a_bad_setting_is_refused_before_any_connection(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path))
    storage = Storage(SQLiteStore(tmp_path / "state.db"))
    with pytest.raises(InvalidInput, match="unknown setting 'path' for a ceph pool; allowed: "
                                           "conf, keyring, pool, client"):
        storage.create_pool("c", "ceph", {"path": "/srv"})
    with pytest.raises(InvalidInput, match="a ceph pool needs conf=, keyring=, pool="):
        storage.create_pool("c", "ceph", {})
    assert [p.name for p in storage.pools()] == ["local"]


@pytest.mark.parametrize(("mon_host", "servers"), [
    ("[v2:127.0.0.1:3300,v1:127.0.0.1:6789]", [("127.0.0.1", "3300")]),
    ("[v1:10.0.0.1:6789/0]", [("10.0.0.1", "6789")]),
    ("[v2:10.0.0.1:3300/0,v1:10.0.0.1:6789/0] [v2:10.0.0.2:3300/0,v1:10.0.0.2:6789/0]",
     [("10.0.0.1", "3300"), ("10.0.0.2", "3300")]),
    ("10.0.0.1,10.0.0.2:6790", [("10.0.0.1", "6789"), ("10.0.0.2", "6790")]),
    ("mon1.example;mon2.example", [("mon1.example", "6789"), ("mon2.example", "6789")]),
    ("[v2:[::1]:3300,v1:[::1]:6789]", [("::1", "3300")]),
    ("[::1]:6789", [("::1", "6789")]),
])
def test_the_monitors_of_mon_host_are_qemus_servers(mon_host: str,
                                                    servers: list[tuple[str, str]]) -> None:
    assert cephpool.mon_servers(mon_host) == servers


def test_no_monitor_is_an_error() -> None:
    with pytest.raises(EngineError, match="no monitor address in mon_host ''"):
        cephpool.mon_servers("")


def test_images_are_named_by_the_pools_prefix() -> None:
    prefix = cephpool.new_prefix()
    assert prefix.startswith("popek-") and len(prefix) == 14 and prefix != cephpool.new_prefix()
    assert cephpool.image_name(prefix, "proj", "data") == f"{prefix}.proj.data"
    assert cephpool.rbd_spec("rbd", "i", "popek", "/c", "/k") == \
        "rbd:rbd/i:id=popek:conf=/c:keyring=/k"


def test_an_rbd_disk_is_opened_by_qemu_with_a_secret_from_a_pipe(tmp_path: Path) -> None:
    disk = RbdDisk("cp/data", "rbd", "popek-1.default.data", "popek",
                   (("127.0.0.1", "3300"), ("10.0.0.2", "6789")), KEY)
    assert KEY not in repr(disk)
    argv = disk_args([("local/v", [7])], ["rp1"], [(disk, rbd_key_path(tmp_path, 0), "rp2")])
    assert KEY not in " ".join(argv)
    i = next(n for n, a in enumerate(argv) if a.startswith("secret,"))
    assert argv[i - 1] == "-object"
    assert argv[i] == f"secret,id=vol1-0-key,format=base64,file={tmp_path}/rbd0.key"
    node = json.loads(argv[i + 2])
    assert node == {"driver": "rbd", "node-name": "vol1-0", "pool": "rbd",
                    "image": "popek-1.default.data", "user": "popek",
                    "key-secret": "vol1-0-key", "auth-client-required": ["cephx"],
                    "server": [{"host": "127.0.0.1", "port": "3300"},
                               {"host": "10.0.0.2", "port": "6789"}]}
    # under the I/O limits' throttle filters (engines/qemu/cmdline.disk_throttles)
    throttles = [json.loads(argv[n + 1]) for n in range(i + 3, len(argv) - 1)
                 if argv[n] == "-blockdev"]
    assert [(t["node-name"], t["file"]) for t in throttles] == [
        ("vol1-limit", "vol1-0"), ("vol1-shared", "vol1-limit")]
    assert argv[-2] == "-device" and json.loads(argv[-1]) == {
        "driver": "virtio-blk-pci", "drive": "vol1-shared", "id": "disk1", "serial": "data",
        "bus": "rp2"}
    assert disk_args([("local/v", [7])], ["rp1"]) == argv[:i - 1]  # a dir disk as before



def test_an_encrypted_rbd_disk_is_luks_over_the_image_under_its_own_limits(
        tmp_path: Path) -> None:
    """QEMU's LUKS node over the rbd node, its key from a pipe of its own; the volume's
    I/O limits on its own throttle group (the disks with files come first)."""
    from popek.iolimits import IoLimits

    luks = "volume-key-0123456789"
    disk = RbdDisk("cp/sec", "rbd", "popek-1.default.sec", "popek",
                   (("127.0.0.1", "3300"),), KEY, luks)
    assert luks not in repr(disk)
    argv = disk_args([("local/v", [7])], ["rp1"], [(disk, rbd_key_path(tmp_path, 0), "rp2")],
                     limits=[IoLimits(), IoLimits(write_bps=1 << 20)])
    assert KEY not in " ".join(argv) and luks not in " ".join(argv)
    objects = [a for n, a in enumerate(argv) if n and argv[n - 1] == "-object"]
    assert f"secret,id=vol1-0-key,format=base64,file={tmp_path}/rbd0.key" in objects
    assert f"secret,id=vol1-key,file={tmp_path}/disk1.key" in objects
    nodes = {n["node-name"]: n for n in (json.loads(a) for i, a in enumerate(argv)
                                         if i and argv[i - 1] == "-blockdev")}
    assert nodes["vol1-0-file"]["driver"] == "rbd"
    assert nodes["vol1-0"] == {"driver": "luks", "node-name": "vol1-0",
                               "file": "vol1-0-file", "key-secret": "vol1-key"}
    assert nodes["vol1-limit"]["file"] == "vol1-0"
    groups = {o["id"]: o for o in (json.loads(a) for a in objects if a.startswith("{"))}
    assert groups["tg-vol1"]["limits"] == {"bps-write": 1 << 20}
    assert groups["tg-vol0"]["limits"] == {}

def test_the_key_goes_through_a_fifo_read_once(tmp_path: Path) -> None:
    """The Ceph key takes the way of the volume keys (engines/qemu/keyfifo.py)."""
    pipe = rbd_key_path(tmp_path, 0)
    fifo = KeyFifo(pipe, KEY, os.getuid(), os.getgid())
    st = pipe.stat()
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert pipe.read_bytes() == KEY.encode()  # as QEMU does: open, read to the end
    fifo.close()
    assert fifo.read and not pipe.exists()
