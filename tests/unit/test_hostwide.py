"""Host uid ranges are allocated host-wide: two homes never hand out the same ids (no root).

Before issue 12 each home chose uids from its own store only: every home's
first VM ran as uid 900000000 and every home's first container from
1000000000, so one home's QEMU could ptrace another's.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from popek.core.ids import CONTAINER_UID_BASE, VMM_UID_BASE
from popek.core.model import InstanceSpec
from popek.core.records import Records
from popek.errors import StoreDamaged
from popek.state import hostwide
from popek.state.hostwide import HostCpus, HostIds
from popek.state.store import SQLiteStore


def _home(root: Path, name: str) -> tuple[Path, Records]:
    home = root / name
    home.mkdir()
    return home, Records(SQLiteStore(home / "state.db"))


def _create(home: Path, records: Records, name: str, id_range: int,
            monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setenv("POPEK_HOME", str(home))
    inst, _ = records.create(name, InstanceSpec(image="minimal"), id_range, "1")
    return inst.uid


@pytest.mark.parametrize(("id_range", "base"), [(1, VMM_UID_BASE), (65536, CONTAINER_UID_BASE)])
def test_two_homes_never_share_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   id_range: int, base: int) -> None:
    a, ra = _home(tmp_path, "a")
    b, rb = _home(tmp_path, "b")
    first = _create(a, ra, "web", id_range, monkeypatch)
    second = _create(b, rb, "web", id_range, monkeypatch)  # the same name, another home
    assert first == base
    assert second == base + id_range  # before: base again, the same host uid(s)
    ranges = HostIds(a).ranges()
    assert [(r.first, r.size, Path(r.home).name) for r in ranges] == [
        (first, id_range, "a"), (second, id_range, "b")]


def test_delete_frees_the_host_wide_range(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    a, ra = _home(tmp_path, "a")
    b, rb = _home(tmp_path, "b")
    _create(a, ra, "web", 1, monkeypatch)
    monkeypatch.setenv("POPEK_HOME", str(a))
    ra.remove(ra.load("web")[0])
    assert HostIds(a).ranges() == []
    assert _create(b, rb, "web", 1, monkeypatch) == VMM_UID_BASE  # free again, for anyone


def test_a_range_taken_between_choice_and_reservation_is_retried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another home reserving the chosen range first: the record is undone, another is chosen."""
    a, ra = _home(tmp_path, "a")
    b, _ = _home(tmp_path, "b")
    real = HostIds.taken
    calls = []

    def stale(self: HostIds, first: int, size: int) -> bool:
        seen = real(self, first, size)
        if not calls:  # the other home reserves right after this home looked
            HostIds(b).reserve(VMM_UID_BASE, 1, "/popek/instances/default/x", dict)
        calls.append(1)
        return seen

    monkeypatch.setattr(HostIds, "taken", stale)
    assert _create(a, ra, "web", 1, monkeypatch) == VMM_UID_BASE + 1
    assert {(r.first, Path(r.home).name) for r in HostIds(a).ranges()} == {
        (VMM_UID_BASE, "b"), (VMM_UID_BASE + 1, "a")}
    assert [kv.key for kv in ra.store.range("/popek/uids/")] == [
        f"/popek/uids/{VMM_UID_BASE + 1}"]


def test_registry_heals_from_the_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A home made before the registry is adopted at its first use of it; the ranges of a
    home that is gone are freed when they stand in the way; a range whose delete died
    before its release is freed when the host is reconciled (heal_host)."""
    a, ra = _home(tmp_path, "a")
    gone, rg = _home(tmp_path, "gone")
    monkeypatch.setattr(hostwide, "HOST_DIR", tmp_path / "fresh-registry")  # a: pre-registry
    _create(a, ra, "old", 1, monkeypatch)
    monkeypatch.setattr(hostwide, "HOST_DIR", tmp_path / "registry")
    HostIds(gone).reserve(VMM_UID_BASE + 1, 1, "stale", dict)
    (gone / "state.db").unlink()  # that home was removed with rm -rf
    # a's first use of this registry adopts its range VMM_UID_BASE; gone's is in the way, freed
    assert _create(a, ra, "new", 1, monkeypatch) == VMM_UID_BASE + 1
    assert {(r.first, Path(r.home).name) for r in HostIds(a).ranges()} == {
        (VMM_UID_BASE, "a"), (VMM_UID_BASE + 1, "a")}
    HostIds(a).reserve(VMM_UID_BASE + 5, 1, "died", dict)  # a delete that died before release
    monkeypatch.setenv("POPEK_HOME", str(a))
    ra.heal_host()
    assert {(r.first, Path(r.home).name) for r in HostIds(a).ranges()} == {
        (VMM_UID_BASE, "a"), (VMM_UID_BASE + 1, "a")}


def test_a_live_home_is_never_healed_away(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Another home's range in the way stays while that home exists: the next slot is used."""
    a, ra = _home(tmp_path, "a")
    b, rb = _home(tmp_path, "b")
    _create(b, rb, "web", 65536, monkeypatch)
    assert not HostIds(a).reserve(CONTAINER_UID_BASE + 100, 1, "x", dict)  # inside b's range
    assert HostIds(a).taken(CONTAINER_UID_BASE + 65535, 1)
    assert not HostIds(a).taken(CONTAINER_UID_BASE + 65536, 1)
    assert not HostIds(b).taken(CONTAINER_UID_BASE, 65536)  # its own range is not "taken"


def test_registry_file_is_private_and_whole(tmp_path: Path) -> None:
    ids = HostIds(tmp_path)
    assert ids.reserve(VMM_UID_BASE, 1, "k", dict)
    path = hostwide.HOST_DIR / hostwide.REGISTRY
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(hostwide.HOST_DIR).st_mode & 0o777 == 0o700
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT first FROM ranges").fetchall() == [(VMM_UID_BASE,)]
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    path.write_bytes(b"{garbage" * 200)
    with pytest.raises(StoreDamaged, match="registry .* is damaged"):
        ids.reserve(VMM_UID_BASE + 1, 1, "k", dict)
    assert path.read_bytes() == b"{garbage" * 200  # left as it is


def test_the_json_registry_of_earlier_versions_is_imported(tmp_path: Path) -> None:
    hostwide.HOST_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    old = hostwide.HOST_DIR / hostwide.LEGACY
    other = tmp_path / "other"
    other.mkdir()
    (other / "state.db").touch()
    old.write_text(json.dumps({"version": 1, "ranges": [
        {"first": VMM_UID_BASE, "size": 1, "home": str(other), "owner": "k"}]}))
    ids = HostIds(tmp_path)
    assert ids.taken(VMM_UID_BASE, 1)  # the first reader imports it
    assert not old.exists() and old.with_name(hostwide.LEGACY + ".imported").exists()
    assert [(r.first, r.home) for r in ids.ranges()] == [(VMM_UID_BASE, str(other))]


def test_a_reservation_reads_nothing_in_proportion_to_the_host(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11 point 7: the JSON registry was read and rewritten whole by each launch.
    Now a reservation after the first asks the home's store nothing (``mine`` is not
    called) and the registry only indexed questions."""
    ids = HostIds(tmp_path)
    calls: list[int] = []

    def mine() -> dict[int, tuple[int, str]]:
        calls.append(1)
        return {}

    for i in range(50):
        assert ids.reserve(VMM_UID_BASE + i, 1, f"k{i}", mine)
    assert calls == [1]  # the first use only
    with sqlite3.connect(hostwide.HOST_DIR / hostwide.REGISTRY) as db:
        plan = " ".join(str(r) for r in db.execute(
            "EXPLAIN QUERY PLAN SELECT first, size, home, owner FROM ranges WHERE first > ? "
            "AND first < ? AND first + size > ? AND home != ?", (0, 1, 0, "x")))
    assert "SEARCH ranges USING INTEGER PRIMARY KEY" in plan, plan


# -- CPU placement across homes ---------------------------------------------------------


def test_placement_counts_the_instances_of_every_home(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, each home placed on its own: both homes pinned their first instance to CPU 0."""
    from popek.core import placement
    from unit.test_core_instances import Env

    monkeypatch.setattr(placement, "host_cpus", lambda: [0, 1, 2])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    envs = {h: Env(tmp_path / h) for h in ("a", "b")}

    def in_home(h: str) -> Any:
        monkeypatch.setenv("POPEK_HOME", str(tmp_path / h / "home"))
        return envs[h].instances()

    def cpus(h: str, name: str) -> list[int]:
        return list(in_home(h).get(name).runtime.details["cpus"])  # type: ignore[union-attr]

    in_home("a").launch("minimal", "web", memory=128 << 20, engine="fake")
    in_home("b").launch("minimal", "web", memory=128 << 20, engine="fake")
    assert cpus("a", "web") == [0]
    assert cpus("b", "web") == [1]  # CPU 0 carries home a's instance
    assert HostCpus(tmp_path / "b" / "home").elsewhere() == [(0,)]
    in_home("a").stop("web")
    assert HostCpus(tmp_path / "b" / "home").elsewhere() == []  # a's stop was published
    in_home("a").launch("minimal", "db", memory=128 << 20, engine="fake")
    assert cpus("a", "db") == [0]
    in_home("b").delete("web", force=True)
    assert HostCpus(tmp_path / "a" / "home").elsewhere() == []
