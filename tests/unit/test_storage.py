"""Storage pools and volumes of the ``dir`` driver, with real files (issue 15.1/15.2/15.6).

Real ``qemu-img`` and e2fsprogs on files under the test's directory, a real
SQLite store; processes killed with SIGKILL at each step of a change leave
records :meth:`Storage.reconcile` settles.  No root.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from popek.errors import AlreadyExists, EngineError, InvalidInput, NotFound, StateError
from popek.state.store import SQLiteStore
from popek.storage.dirpool import DirPool
from popek.storage.model import Volume, volume_key
from popek.storage.service import Storage, storage_dir

MiB = 1 << 20


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


@pytest.fixture
def storage(home: Path) -> Iterator[Storage]:
    store = SQLiteStore(home / "state.db")
    yield Storage(store)
    store.close()


def qemu_img_info(path: Path) -> dict[str, object]:
    out = subprocess.run(["qemu-img", "info", "--output", "json", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out))


def is_ext4(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(1024 + 0x38)
        return f.read(2) == b"\x53\xef"


def test_the_local_pool_exists_from_the_first_use(storage: Storage, home: Path) -> None:
    [pool] = storage.pools()
    assert (pool.name, pool.driver, pool.config) == ("local", "dir",
                                                     {"path": str(home / "storage" / "local")})
    assert (home / "storage" / "local").is_dir()
    info = storage.pool_info("local")
    assert info["size"] > 0 and 0 < info["free"] <= info["size"] and info["used"] == 0
    assert info["health"] == "ok" and info["volumes"] == 0


def test_pools_are_made_and_deleted(storage: Storage, tmp_path: Path) -> None:
    made = storage.create_pool("fast", "dir", {})
    assert Path(made.config["path"]) == storage_dir() / "fast"
    given = tmp_path / "disk"
    given.mkdir()
    assert storage.create_pool("disk", "dir", {"path": str(given)}).config == {"path": str(given)}
    assert [p.name for p in storage.pools()] == ["disk", "fast", "local"]
    storage.delete_pool("fast")
    assert not (storage_dir() / "fast").exists()
    storage.delete_pool("disk")
    assert given.is_dir()  # the operator's directory stays
    with pytest.raises(NotFound, match="pools: local"):
        storage.pool("fast")


@pytest.mark.parametrize(("driver", "config", "message"), [
    ("zfs", {}, "unknown storage driver 'zfs'; available: dir, ceph"),
    ("dir", {"size": "1GiB"}, "unknown setting 'size' for a dir pool; allowed: path"),
    ("dir", {"path": "relative/dir"}, "give an absolute path"),
    ("dir", {"path": "/nonexistent/popek-pool"}, "does not exist"),
])
def test_bad_pools_are_refused_and_change_nothing(storage: Storage, driver: str,
                                                  config: dict[str, str], message: str) -> None:
    before = storage.pools()
    with pytest.raises(InvalidInput, match=message):
        storage.create_pool("bad", driver, config)
    assert storage.pools() == before


def test_a_pool_name_is_taken_once_and_a_directory_by_one_pool(storage: Storage,
                                                                tmp_path: Path) -> None:
    storage.create_pool("one", "dir", {})
    with pytest.raises(AlreadyExists):
        storage.create_pool("one", "dir", {})
    full = tmp_path / "full"
    full.mkdir()
    (full / "data").write_text("x")
    with pytest.raises(InvalidInput, match="not empty"):
        storage.create_pool("two", "dir", {"path": str(full)})
    with pytest.raises(InvalidInput, match="invalid storage pool name"):
        storage.create_pool("Bad_Name", "dir", {})


def test_block_volumes_are_thin_qcow2_files(storage: Storage) -> None:
    vol = storage.create_volume("local", "default", "data", 64 * MiB)
    assert (vol.state, vol.size, vol.type, vol.owner) == ("ready", 64 * MiB, "block", "")
    f = storage_dir() / "local" / "default" / "data.qcow2"
    info = qemu_img_info(f)
    assert info["format"] == "qcow2" and info["virtual-size"] == 64 * MiB
    assert oct(f.stat().st_mode & 0o777) == "0o600"
    assert storage.volume_info("local", "default", "data")["used"] < 4 * MiB  # thin
    assert storage.pool_info("local")["provisioned"] == 64 * MiB
    with pytest.raises(AlreadyExists):
        storage.create_volume("local", "default", "data", 64 * MiB)


def test_filesystem_volumes_hold_an_ext4_filesystem(storage: Storage) -> None:
    storage.create_volume("local", "default", "files", 32 * MiB, "filesystem")
    f = storage_dir() / "local" / "default" / "files.ext4"
    assert is_ext4(f) and f.stat().st_size == 32 * MiB
    assert f.stat().st_blocks * 512 < 32 * MiB  # sparse


def test_resize_grows_both_types_and_shrinks_a_filesystem_only(storage: Storage) -> None:
    storage.create_volume("local", "default", "blk", 16 * MiB)
    storage.create_volume("local", "default", "fs", 32 * MiB, "filesystem")
    assert storage.resize_volume("local", "default", "blk", 48 * MiB).size == 48 * MiB
    assert qemu_img_info(storage_dir() / "local/default/blk.qcow2")["virtual-size"] == 48 * MiB
    with pytest.raises(InvalidInput, match="cannot shrink block volume blk"):
        storage.resize_volume("local", "default", "blk", 16 * MiB)
    fs = storage_dir() / "local" / "default" / "fs.ext4"
    assert storage.resize_volume("local", "default", "fs", 64 * MiB).size == 64 * MiB
    assert fs.stat().st_size == 64 * MiB and is_ext4(fs)
    assert storage.resize_volume("local", "default", "fs", 24 * MiB).size == 24 * MiB
    assert fs.stat().st_size == 24 * MiB and is_ext4(fs)
    check = subprocess.run(["e2fsck", "-f", "-n", str(fs)], capture_output=True, text=True,
                           check=False)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize(("size", "kind", "message"), [
    (1000, "block", "a block volume takes 1MiB to 64TiB"),
    (1 << 50, "block", "a block volume takes"),
    (8 * MiB, "filesystem", "a filesystem volume takes 16MiB"),
    (8 * MiB, "tape", "invalid volume type 'tape'; allowed: block, filesystem"),
])
def test_bad_volumes_are_refused_and_change_nothing(storage: Storage, size: int, kind: str,
                                                    message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        storage.create_volume("local", "default", "v", size, kind)
    assert storage.volumes() == []
    assert DirPool(storage_dir() / "local").files() == []


def test_unknown_pools_and_volumes_are_named(storage: Storage) -> None:
    with pytest.raises(NotFound, match="storage pool 'nosuch' not found; pools: local"):
        storage.create_volume("nosuch", "default", "v", 16 * MiB)
    storage.create_volume("local", "default", "here", 16 * MiB)
    with pytest.raises(NotFound, match="volume 'gone' not found .* volumes there: here"):
        storage.delete_volume("local", "default", "gone")


def test_delete_removes_the_file_and_a_pool_with_volumes_is_kept(storage: Storage) -> None:
    storage.create_pool("p", "dir", {})
    storage.create_volume("p", "default", "a", 16 * MiB)
    storage.create_volume("p", "lab", "b", 16 * MiB)
    with pytest.raises(StateError, match=r"holding 2 volume\(s\) \(default/a, lab/b\)"):
        storage.delete_pool("p")
    storage.delete_volume("p", "default", "a")
    assert not (storage_dir() / "p" / "default" / "a.qcow2").exists()
    assert [v.name for v in storage.volumes("p")] == ["b"]


def test_an_attached_volume_is_not_deleted_nor_shrunk(storage: Storage) -> None:
    storage.create_volume("local", "default", "used", 32 * MiB, "filesystem")
    key = volume_key("local", "default", "used")
    vol = storage.volume("local", "default", "used")
    vol.attached = "default/web"
    storage.store.put(key, vol.to_json())
    with pytest.raises(StateError, match="attached to default/web"):
        storage.delete_volume("local", "default", "used")
    with pytest.raises(StateError, match="an attached volume only grows"):
        storage.resize_volume("local", "default", "used", 16 * MiB)
    assert (storage_dir() / "local" / "default" / "used.ext4").exists()


# -- a process killed at each step (issue 15.6) --------------------------------------

_KILLED = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from popek.state.store import SQLiteStore
    from popek.storage import dirpool
    from popek.storage.service import Storage

    step, op = sys.argv[2], sys.argv[3]
    real = getattr(dirpool.DirPool, op)

    def killed(self, *args):  # before the driver acts, or after it acted
        if step == "after":
            real(self, *args)
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(dirpool.DirPool, op, killed)
    storage = Storage(SQLiteStore(Path(sys.argv[1])))
    if op == "create":
        storage.create_volume("local", "default", "v", 16 << 20, "filesystem")
    elif op == "resize":
        storage.resize_volume("local", "default", "v", 48 << 20)
    else:
        storage.delete_volume("local", "default", "v")
""")


def killed(home: Path, step: str, op: str) -> None:
    proc = subprocess.run([sys.executable, "-c", _KILLED, str(home / "state.db"), step, op],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "POPEK_HOME": str(home)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def files(storage: Storage) -> list[tuple[str, str, str]]:
    return DirPool(storage_dir() / "local").files()


@pytest.mark.parametrize("step", ["before", "after"])
def test_a_create_killed_midway_is_rolled_back(storage: Storage, home: Path, step: str) -> None:
    storage.pools()
    killed(home, step, "create")
    assert storage.volume("local", "default", "v").state == "creating"  # the intent is there
    done = storage.reconcile()
    assert done == ["local: volume default/v: interrupted create rolled back"], done
    assert storage.volumes() == [] and files(storage) == []


@pytest.mark.parametrize("step", ["before", "after"])
def test_a_resize_killed_midway_keeps_the_size_the_file_has(storage: Storage, home: Path,
                                                             step: str) -> None:
    storage.create_volume("local", "default", "v", 16 * MiB, "filesystem")
    killed(home, step, "resize")
    assert storage.volume("local", "default", "v").state == "resizing"
    storage.reconcile()
    vol = storage.volume("local", "default", "v")
    on_disk = (storage_dir() / "local" / "default" / "v.ext4").stat().st_size
    assert vol.state == "ready" and vol.size == on_disk == (48 * MiB if step == "after"
                                                              else 16 * MiB)


@pytest.mark.parametrize("step", ["before", "after"])
def test_a_delete_killed_midway_is_finished(storage: Storage, home: Path, step: str) -> None:
    storage.create_volume("local", "default", "v", 16 * MiB, "filesystem")
    killed(home, step, "delete")
    assert storage.volume("local", "default", "v").state == "deleting"
    assert storage.reconcile() == ["local: volume default/v: interrupted delete finished"]
    assert storage.volumes() == [] and files(storage) == []


def test_files_no_record_explains_are_removed(storage: Storage) -> None:
    storage.create_volume("local", "default", "kept", 16 * MiB)
    d = storage_dir() / "local" / "default"
    (d / "stray.qcow2").write_bytes(b"x")
    (d / ".half.ext4.new").write_bytes(b"x")
    done = storage.reconcile()
    assert sorted(done) == ["local: removed the block volume file default/stray, which no "
                            "record explains",
                            "local: removed the unfinished file of default/half"], done
    assert files(storage) == [("default", "kept", "block")]


def test_a_live_owners_intent_is_left_alone(storage: Storage) -> None:
    storage.create_volume("local", "default", "v", 16 * MiB)
    key = volume_key("local", "default", "v")
    vol = storage.volume("local", "default", "v")
    busy = Volume(**{**vol.__dict__, "state": "deleting",
                     "owner": f"{os.getpid()} {_start_time()}"})
    storage.store.put(key, busy.to_json())
    assert storage.reconcile() == []
    assert storage.volume("local", "default", "v").state == "deleting"


def _start_time() -> int:
    from popek import proc

    return proc.start_time(os.getpid()) or 0


# -- snapshots and clones of block volumes (issue 15.2) ------------------------------


def qio(f: Path, command: str) -> bool:
    """Run one qemu-io command on the qcow2 file ``f`` (its backing chain read as QEMU
    reads it); whether it succeeded (a read -P checks the pattern)."""
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(f)], capture_output=True,
                       text=True, check=False)
    return r.returncode == 0 and "failed" not in r.stdout + r.stderr


def active(name: str) -> Path:
    return storage_dir() / "local" / "default" / f"{name}.qcow2"


def test_snapshots_restore_and_clones_keep_the_data_they_were_taken_with(
        storage: Storage) -> None:
    storage.create_volume("local", "default", "v", 16 * MiB)
    assert qio(active("v"), "write -P 0xaa 0 64k")
    storage.snapshot_volume("local", "default", "v", "s1")
    assert qio(active("v"), "write -P 0xbb 0 64k")
    storage.snapshot_volume("local", "default", "v", "s2")
    assert qio(active("v"), "write -P 0xcc 0 64k")
    assert storage.volume("local", "default", "v").snapshot_names() == ["s1", "s2"]
    clone = storage.clone_volume("local", "default", "v", "s2", "c")
    assert (clone.origin, clone.size, clone.state) == ("default/v@s2", 16 * MiB, "ready")
    assert qio(active("c"), "read -P 0xbb 0 64k")
    assert active("c").stat().st_blocks * 512 < MiB  # copy on write: nothing copied
    storage.restore_volume("local", "default", "v", "s1")
    assert qio(active("v"), "read -P 0xaa 0 64k")
    assert qio(active("c"), "read -P 0xbb 0 64k")  # the clone is its own
    # s1 backs v (restored) and s2: deleting it merges it into both
    storage.delete_snapshot("local", "default", "v", "s1")
    assert not (storage_dir() / "local" / "default" / "v@s1.qcow2").exists()
    assert qio(active("v"), "read -P 0xaa 0 64k")
    assert qio(active("c"), "read -P 0xbb 0 64k")
    assert storage.volume("local", "default", "v").snapshot_names() == ["s2"]
    assert storage.reconcile() == []  # every file is explained


def test_a_clone_takes_the_same_time_whatever_the_size(storage: Storage) -> None:
    """Metadata only: a clone of 64 GiB volume is a file of a few hundred KiB."""
    storage.create_volume("local", "default", "big", 64 << 30)
    storage.snapshot_volume("local", "default", "big", "s")
    storage.clone_volume("local", "default", "big", "s", "big2")
    assert active("big2").stat().st_blocks * 512 < MiB
    assert storage.volume("local", "default", "big2").size == 64 << 30


def test_an_origin_is_kept_while_its_clones_live(storage: Storage) -> None:
    storage.create_volume("local", "default", "o", 16 * MiB)
    storage.snapshot_volume("local", "default", "o", "s")
    storage.clone_volume("local", "default", "o", "s", "k")
    with pytest.raises(StateError, match=r"the origin of clone\(s\) default/k"):
        storage.delete_volume("local", "default", "o")
    with pytest.raises(StateError, match=r"the origin of clone\(s\) default/k"):
        storage.delete_snapshot("local", "default", "o", "s")
    storage.delete_volume("local", "default", "k")
    storage.delete_volume("local", "default", "o")
    assert DirPool(storage_dir() / "local").files() == []


def test_snapshot_mistakes_are_named(storage: Storage) -> None:
    storage.create_volume("local", "default", "v", 16 * MiB)
    storage.create_volume("local", "default", "fs", 16 * MiB, "filesystem")
    storage.snapshot_volume("local", "default", "v", "s")
    with pytest.raises(AlreadyExists, match="snapshot 's' of volume 'v' already exists"):
        storage.snapshot_volume("local", "default", "v", "s")
    with pytest.raises(NotFound, match="snapshot 'nope' of volume 'v' not found; snapshots: s"):
        storage.restore_volume("local", "default", "v", "nope")
    with pytest.raises(InvalidInput, match="cannot export filesystem volume fs: export takes "
                                           "block volumes"):
        storage.export_volume("local", "default", "fs", storage_dir() / "out.raw", "raw")
    with pytest.raises(InvalidInput, match="invalid snapshot name"):
        storage.snapshot_volume("local", "default", "v", "Bad@Name")
    with pytest.raises(AlreadyExists):
        storage.clone_volume("local", "default", "v", "s", "fs")


_KILLED_SNAPSHOT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from popek.state.store import SQLiteStore
    from popek.storage import dirpool
    from popek.storage.service import Storage

    step, op = sys.argv[2], sys.argv[3]
    real = getattr(dirpool.DirPool, op)

    def killed(self, *args):
        if step == "after":
            real(self, *args)
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(dirpool.DirPool, op, killed)
    storage = Storage(SQLiteStore(Path(sys.argv[1])))
    if op == "snapshot":
        storage.snapshot_volume("local", "default", "v", "s2")
    elif op == "restore":
        storage.restore_volume("local", "default", "v", "s1")
    elif op == "clone":
        storage.clone_volume("local", "default", "v", "s1", "c")
    else:
        storage.delete_snapshot("local", "default", "v", "s1")
""")


@pytest.mark.parametrize("step", ["before", "after"])
@pytest.mark.parametrize(("op", "outcome"), [
    ("snapshot", {"before": (["s1"], "rolled back"), "after": (["s1", "s2"], "finished")}),
    ("delete_snapshot", {"before": ([], "finished"), "after": ([], "finished")}),
    ("restore", {"before": (["s1"], "settled"), "after": (["s1"], "settled")}),
    ("clone", {"before": (["s1"], "rolled back"), "after": (["s1"], "rolled back")}),
])
def test_a_snapshot_operation_killed_midway_leaves_a_consistent_pool(
        storage: Storage, home: Path, step: str, op: str,
        outcome: dict[str, tuple[list[str], str]]) -> None:
    storage.create_volume("local", "default", "v", 16 * MiB)
    assert qio(active("v"), "write -P 0xaa 0 64k")
    storage.snapshot_volume("local", "default", "v", "s1")
    assert qio(active("v"), "write -P 0xbb 0 64k")
    proc = subprocess.run([sys.executable, "-c", _KILLED_SNAPSHOT, str(home / "state.db"), step,
                           op], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "POPEK_HOME": str(home)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    done = storage.reconcile()
    snaps, word = outcome[step]
    assert len(done) == 1 and word in done[0], done
    vol = storage.volume("local", "default", "v")
    assert vol.state == "ready" and vol.snapshot_names() == snaps
    assert [v.name for v in storage.volumes()] == ["v"]  # a clone killed midway is gone
    expected = "0xaa" if op == "restore" and step == "after" else "0xbb"
    assert qio(active("v"), f"read -P {expected} 0 64k")  # the data as the outcome says
    assert storage.reconcile() == []
    storage.delete_volume("local", "default", "v")
    assert DirPool(storage_dir() / "local").files() == []


# -- import and export (issue 15.2) --------------------------------------------------


def test_import_and_export_keep_the_data_in_both_formats(storage: Storage,
                                                         tmp_path: Path) -> None:
    raw = tmp_path / "disk.img"
    with raw.open("wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(b"\xab" * 65536)
    steps: list[int] = []
    vol = storage.import_volume("local", "default", "imp", raw, steps.append)
    assert (vol.size, vol.state, vol.config) == (8 * MiB, "ready", {"imported": "raw"})
    assert steps and steps[-1] == 100 and steps == sorted(steps)
    assert qio(active("imp"), "read -P 0xab 1M 64k")
    storage.snapshot_volume("local", "default", "imp", "s")  # exported flattened
    assert qio(active("imp"), "write -P 0xcd 2M 64k")
    for fmt in ("qcow2", "raw"):
        out = tmp_path / f"out.{fmt}"
        storage.export_volume("local", "default", "imp", out, fmt)
        assert qemu_img_info(out)["format"] == fmt and "backing-filename" not in \
            qemu_img_info(out)
        again = storage.import_volume("local", "default", f"back-{fmt}", out)
        assert again.config == {"imported": fmt}
        assert qio(active(f"back-{fmt}"), "read -P 0xab 1M 64k")
        assert qio(active(f"back-{fmt}"), "read -P 0xcd 2M 64k")
    with pytest.raises(AlreadyExists, match="popek does not overwrite a file"):
        storage.export_volume("local", "default", "imp", tmp_path / "out.raw", "raw")


def test_an_image_naming_another_file_is_refused(storage: Storage, tmp_path: Path) -> None:
    """A qcow2 with a backing file would make QEMU open a host file of the image's choosing
    (here /etc/shadow): refused before anything is made."""
    evil = tmp_path / "evil.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/shadow", "-F", "raw",
                    str(evil), "1M"], check=True)
    assert qemu_img_info(evil)["backing-filename"] == "/etc/shadow"  # the attack is real
    with pytest.raises(InvalidInput, match="names another file"):
        storage.import_volume("local", "default", "evil", evil)
    assert storage.volumes() == [] and files(storage) == []


def test_an_import_that_fails_leaves_nothing(storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot read"):
        storage.import_volume("local", "default", "gone", tmp_path / "missing.img")
    broken = tmp_path / "broken.qcow2"
    broken.write_bytes(b"QFI\xfb" + b"\0" * 100)  # a qcow2 magic, then nothing sane
    with pytest.raises(EngineError):
        storage.import_volume("local", "default", "broken", broken)
    assert storage.volumes() == [] and files(storage) == []


def test_a_pool_whose_directory_is_gone_says_so_and_records_nothing(storage: Storage,
                                                                    tmp_path: Path) -> None:
    """Before: FileNotFoundError reached the user as an internal error (exit 70)."""
    d = tmp_path / "gone"
    d.mkdir()
    storage.create_pool("gone", "dir", {"path": str(d)})
    d.rmdir()
    with pytest.raises(StateError, match="storage pool gone: it is unavailable .*does not "
                                         "exist.*make its directory again"):
        storage.create_volume("gone", "default", "v", 16 * MiB)
    assert storage.volumes() == []
    assert storage.pool_info("gone")["health"].startswith("unavailable: ")
    storage.delete_pool("gone")  # it can still go


# -- attach (issue 15.3: VMs at launch) ----------------------------------------------


def test_a_volume_is_attached_to_one_instance_at_a_time(storage: Storage) -> None:
    storage.create_volume("local", "default", "v", 16 * MiB)
    storage.create_volume("local", "default", "fs", 16 * MiB, "filesystem")
    assert storage.attach("local", "default", "v", "default/a").attached == "default/a"
    assert storage.attach("local", "default", "v", "default/a").attached == "default/a"
    with pytest.raises(StateError, match="attached to default/a"):
        storage.attach("local", "default", "v", "default/b")
    for refused in (lambda: storage.snapshot_volume("local", "default", "v", "s"),
                    lambda: storage.delete_volume("local", "default", "v")):
        with pytest.raises(StateError, match="detach it first: popek storage volume detach "
                                             "local/v a"):
            refused()
    grown: list[int] = []  # grown under its running instance: by the function given
    assert storage.resize_volume("local", "default", "v", 32 * MiB, grown.append).size == \
        32 * MiB
    assert grown == [32 * MiB]
    from popek.storage.dirpool import DirPool

    # the file was not touched: growing it is the running VM's (QMP block_resize)
    assert DirPool(storage_dir() / "local").virtual_size("default", "v", "block") == 16 * MiB
    storage.detach("local", "default", "v", "default/b")  # not b's: nothing
    assert storage.volume("local", "default", "v").attached == "default/a"
    storage.detach("local", "default", "v", "default/a")
    assert storage.volume("local", "default", "v").attached == ""


def test_the_files_of_a_volume_are_its_chain_in_the_pool(storage: Storage) -> None:
    storage.create_volume("local", "default", "v", 16 * MiB)
    storage.snapshot_volume("local", "default", "v", "s1")
    storage.snapshot_volume("local", "default", "v", "s2")
    storage.clone_volume("local", "default", "v", "s2", "c")
    d = storage_dir() / "local" / "default"
    assert storage.files_of("local", "default", "c") == [d / "c.qcow2", d / "v@s2.qcow2",
                                                         d / "v@s1.qcow2"]
    evil = d / "evil.qcow2"  # a header naming a file outside the pool is never opened
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/shadow", "-F", "raw",
                    "-u", str(evil), "1M"], check=True)
    storage.store.put(volume_key("local", "default", "evil"), Volume(
        "local", "default", "evil", MiB, "block", "now").to_json())
    with pytest.raises(EngineError, match="outside its pool"):
        storage.files_of("local", "default", "evil")


@pytest.mark.parametrize("ref", ["data", "/data", "local/", "local/a/b"])
def test_a_volume_is_named_pool_slash_volume(ref: str) -> None:
    with pytest.raises(InvalidInput, match="name it as POOL/VOLUME"):
        Storage.parse_ref(ref)


def test_a_change_made_since_the_read_is_never_overwritten(storage: Storage,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """A delete decides on the record it read; a VM that attached the volume meanwhile
    (another process: here between the checks and the intent) makes the delete fail.
    Before, the intent compared against a revision read again after the checks, so the
    attached volume was deleted under its VM."""
    storage.create_volume("local", "default", "v", 16 * MiB)
    other = Storage(storage.store)
    checked = Storage._detached

    def attached_meanwhile(vol: Volume, operation: str) -> None:
        checked(vol, operation)
        other.attach("local", "default", "v", "default/vm")

    monkeypatch.setattr(Storage, "_detached", staticmethod(attached_meanwhile))
    with pytest.raises(StateError, match="changed meanwhile"):
        storage.delete_volume("local", "default", "v")
    vol = storage.volume("local", "default", "v")
    assert (vol.state, vol.attached) == ("ready", "default/vm")
    assert active("v").exists()
    assert "revision" not in json.loads(vol.to_json())  # read-side only, never stored


def test_a_volumes_io_limits_are_its_config(storage: Storage) -> None:
    """``popek storage volume set``: I/O limits in the volume's config, all keys or none."""
    from popek.iolimits import IoLimits

    storage.create_volume("local", "default", "lim", 16 << 20, "block")
    vol = storage.set_config("local", "default", "lim", {"limits.disk.write_bps": "10MiB",
                                                         "limits.disk.read_iops": "100"})
    assert storage.io_limits_of(vol) == IoLimits(write_bps=10 << 20, read_iops=100)
    assert storage.volume_info("local", "default", "lim")["config"] == {
        "limits.disk.write_bps": "10MiB", "limits.disk.read_iops": "100"}
    with pytest.raises(InvalidInput, match="invalid limits.disk.read_bps 'x'"):
        storage.set_config("local", "default", "lim", {"limits.disk.write_bps": "0",
                                                       "limits.disk.read_bps": "x"})
    with pytest.raises(InvalidInput, match="unknown key 'size'"):
        storage.set_config("local", "default", "lim", {"size": "1GiB"})
    assert storage.io_limits_of(storage.volume("local", "default", "lim")) == IoLimits(
        write_bps=10 << 20, read_iops=100)  # nothing changed
    storage.set_config("local", "default", "lim", {"limits.disk.write_bps": "0"})
    assert storage.volume("local", "default", "lim").config == {"limits.disk.read_iops": "100"}
