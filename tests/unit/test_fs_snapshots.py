"""Snapshots, restores and clones of filesystem volumes (issue 15.2): copies of the raw
ext4 file (``cp --reflink=auto --sparse=always``), each made under a temporary name.

Real files: the ext4 is made by mkfs.ext4 and read and written with debugfs (e2fsprogs,
no mount, so no root); a real process is SIGKILLed before and after each copy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from popek.errors import StateError
from popek.state.store import SQLiteStore
from popek.storage.dirpool import DirPool
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


def ext4(name: str) -> Path:
    return storage_dir() / "local" / "default" / f"{name}.ext4"


def put(f: Path, text: str, tmp: Path) -> None:
    """Write ``text`` as /note in the ext4 file ``f`` (replacing it)."""
    src = tmp / "note.src"
    src.write_text(text)
    subprocess.run(["debugfs", "-w", "-R", "rm /note", str(f)], capture_output=True,
                   check=False)
    subprocess.run(["debugfs", "-w", "-R", f"write {src} /note", str(f)], capture_output=True,
                   check=True)


def read(f: Path) -> str:
    return subprocess.run(["debugfs", "-R", "cat /note", str(f)], capture_output=True,
                          text=True, check=True).stdout


def test_snapshot_restore_and_clone_keep_the_data_they_were_taken_with(
        storage: Storage, tmp_path: Path) -> None:
    storage.create_volume("local", "default", "fs", 32 * MiB, "filesystem")
    put(ext4("fs"), "first\n", tmp_path)
    vol = storage.snapshot_volume("local", "default", "fs", "s1")
    assert vol.snapshot_names() == ["s1"]
    frozen = ext4("fs@s1")
    assert frozen.stat().st_mode & 0o777 == 0o400
    assert frozen.stat().st_blocks * 512 < 32 * MiB  # sparse: the data, not the size
    put(ext4("fs"), "second\n", tmp_path)
    assert read(frozen) == "first\n"  # the snapshot did not move with the volume
    clone = storage.clone_volume("local", "default", "fs", "s1", "copy")
    assert (clone.type, clone.size, clone.origin) == ("filesystem", 32 * MiB,
                                                      "default/fs@s1")
    assert read(ext4("copy")) == "first\n"
    restored = storage.restore_volume("local", "default", "fs", "s1")
    assert (restored.size, restored.snapshot_names()) == (32 * MiB, ["s1"])
    assert read(ext4("fs")) == "first\n"
    subprocess.run(["e2fsck", "-fn", str(ext4("fs"))], capture_output=True, check=True)
    with pytest.raises(StateError, match="the origin of clone"):
        storage.delete_snapshot("local", "default", "fs", "s1")
    storage.delete_volume("local", "default", "copy")
    assert storage.delete_snapshot("local", "default", "fs", "s1").snapshot_names() == []
    assert not frozen.exists()
    storage.snapshot_volume("local", "default", "fs", "s2")
    storage.delete_volume("local", "default", "fs")  # its snapshots go with it
    assert DirPool(storage_dir() / "local").files() == []


def test_an_attached_volume_is_copied_only_while_held_still(storage: Storage) -> None:
    """Without a way to hold it still (``quiesce``: core gives one when its holders are
    stopped or containers whose file system it freezes) an attached volume is refused (a
    container writing during the copy would leave a torn copy); with one, the copy is
    made inside it.  Its snapshot is a copy: deleting it is fine while attached."""
    storage.create_volume("local", "default", "fs", 16 * MiB, "filesystem")
    storage.attach("local", "default", "fs", "default/ct")
    with pytest.raises(StateError, match="attached to default/ct.*detach it first"):
        storage.snapshot_volume("local", "default", "fs", "s")
    assert storage.volume("local", "default", "fs").snapshot_names() == []
    assert not ext4("fs@s").exists()
    held = []

    @contextlib.contextmanager
    def still() -> Iterator[None]:
        held.append("in")
        yield
        assert ext4("fs@s").exists()  # the copy was made while held
        held.append("out")

    storage.snapshot_volume("local", "default", "fs", "s", still())
    assert held == ["in", "out"]
    assert storage.volume("local", "default", "fs").snapshot_names() == ["s"]
    storage.delete_snapshot("local", "default", "fs", "s")
    assert not ext4("fs@s").exists()


_KILLED = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from popek.state.store import SQLiteStore
    from popek.storage import dirpool
    from popek.storage.service import Storage

    step, op = sys.argv[2], sys.argv[3]
    real = dirpool.DirPool.copy

    def killed(self, source, target):  # as the copy starts (a temporary file), or after
        if step == "after":
            real(self, source, target)
        else:
            dirpool.made(target).__enter__().write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGKILL)

    dirpool.DirPool.copy = killed
    storage = Storage(SQLiteStore(Path(sys.argv[1])))
    if op == "snapshot":
        storage.snapshot_volume("local", "default", "fs", "s2")
    elif op == "restore":
        storage.restore_volume("local", "default", "fs", "s1")
    else:
        storage.clone_volume("local", "default", "fs", "s1", "c")
""")


@pytest.mark.parametrize("step", ["before", "after"])
@pytest.mark.parametrize(("op", "outcome"), [
    ("snapshot", {"before": (["s1"], "rolled back"), "after": (["s1", "s2"], "finished")}),
    ("restore", {"before": (["s1"], "settled"), "after": (["s1"], "settled")}),
    ("clone", {"before": (["s1"], "rolled back"), "after": (["s1"], "rolled back")}),
])
def test_a_copy_killed_midway_leaves_a_consistent_pool(
        storage: Storage, home: Path, tmp_path: Path, step: str, op: str,
        outcome: dict[str, tuple[list[str], str]]) -> None:
    storage.create_volume("local", "default", "fs", 16 * MiB, "filesystem")
    put(ext4("fs"), "first\n", tmp_path)
    storage.snapshot_volume("local", "default", "fs", "s1")
    put(ext4("fs"), "second\n", tmp_path)
    proc = subprocess.run([sys.executable, "-c", _KILLED, str(home / "state.db"), step, op],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "POPEK_HOME": str(home)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    done = storage.reconcile()
    snaps, word = outcome[step]
    assert any(word in line for line in done), done
    vol = storage.volume("local", "default", "fs")
    assert vol.state == "ready" and vol.snapshot_names() == snaps
    assert [v.name for v in storage.volumes()] == ["fs"]  # a clone killed midway is gone
    assert read(ext4("fs")) == ("first\n" if op == "restore" and step == "after"
                                else "second\n")
    if snaps == ["s1", "s2"]:
        assert read(ext4("fs@s2")) == "second\n"
    assert storage.reconcile() == []
    names = {n for _p, n, _k in DirPool(storage_dir() / "local").files()}
    assert names == {"fs", *(f"fs@{s}" for s in snaps)}  # no temporary file left
