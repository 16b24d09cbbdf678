"""The SQLite state store keeps etcd's semantics: revisions, CAS, prefix ranges, watch, leases."""

from __future__ import annotations

import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from popek.state.store import Compare, Delete, Put, SQLiteStore


def test_revisions_and_versions(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "s.db")
    assert s.revision() == 0
    r1 = s.put("/a", b"1")
    r2 = s.put("/a", b"2")
    assert (r1, r2) == (1, 2)
    kv = s.get("/a")
    assert kv is not None
    assert (kv.value, kv.create_revision, kv.mod_revision, kv.version) == (b"2", 1, 2, 2)
    assert s.delete("/a") == 1
    assert s.get("/a") is None
    assert s.revision() == 3
    assert s.delete("/a") == 0
    assert s.revision() == 3  # deleting nothing changes nothing


def test_prefix_range_is_sorted_and_bounded(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "s.db")
    for k in ["/x/b", "/x/a", "/xy", "/x/c/d", "/w"]:
        s.put(k, b"v")
    assert [kv.key for kv in s.range("/x/")] == ["/x/a", "/x/b", "/x/c/d"]
    assert s.delete("/x/", prefix=True) == 3
    assert [kv.key for kv in s.range("/")] == ["/w", "/xy"]


def test_compare_and_swap(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "s.db")
    assert s.create("/k", b"a")
    assert not s.create("/k", b"b")  # exists: refused
    kv = s.get("/k")
    assert kv is not None
    assert s.update("/k", b"c", kv.mod_revision)
    assert not s.update("/k", b"d", kv.mod_revision)  # stale revision: refused
    assert s.get("/k").value == b"c"  # type: ignore[union-attr]


def test_txn_is_atomic_and_runs_failure_branch(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "s.db")
    s.put("/a", b"1")
    res = s.txn([Compare("/a", "value", "==", b"2")], [Put("/b", b"x")], [Put("/c", b"y")])
    assert not res.succeeded
    assert s.get("/b") is None and s.get("/c") is not None
    res = s.txn([Compare("/a", "value", "==", b"1")], [Put("/b", b"x"), Delete("/a")])
    assert res.succeeded and res.deleted == 1
    assert s.get("/a") is None and s.get("/b") is not None


def test_two_connections_see_each_other(tmp_path: Path) -> None:
    a = SQLiteStore(tmp_path / "s.db")
    b = SQLiteStore(tmp_path / "s.db")
    a.put("/k", b"1")
    assert b.get("/k").value == b"1"  # type: ignore[union-attr]
    kv = b.get("/k")
    assert kv is not None
    assert a.update("/k", b"2", kv.mod_revision)
    assert not b.update("/k", b"3", kv.mod_revision)


def test_changes_replay_from_revision(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "s.db")
    s.put("/i/a", b"1")
    rev = s.put("/i/b", b"2")
    s.put("/other", b"3")
    s.delete("/i/a")
    events = s.changes("/i/", rev)
    assert [(e.kind, e.key, e.value) for e in events] == [("put", "/i/b", b"2"),
                                                          ("delete", "/i/a", None)]
    assert list(s.watch("/i/", rev, timeout=0.05)) == events


def test_lease_expiry_deletes_keys(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "s.db")
    lease = s.grant_lease(0.2)
    s.put("/leased", b"v", lease=lease)
    s.put("/kept", b"v")
    assert s.keepalive(lease)
    # not synchronisation: the lease's TTL elapsing is the behaviour under test (the store
    # reads the wall clock; a sleep never returns early, so 0.3 s always passes 0.2 s)
    time.sleep(0.3)
    s.expire_leases()
    assert s.get("/leased") is None
    assert s.get("/kept") is not None
    assert not s.keepalive(lease)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["/a", "/b", "/c/d"]), st.binary(max_size=8)),
                max_size=20))
def test_model_matches_dict(tmp_path_factory: object, ops: list[tuple[str, bytes]]) -> None:
    """A sequence of puts and deletes leaves the same content as a plain dict."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        s = SQLiteStore(Path(d) / "s.db")
        model: dict[str, bytes] = {}
        for key, value in ops:
            if value:
                s.put(key, value)
                model[key] = value
            else:
                s.delete(key)
                model.pop(key, None)
        assert {kv.key: kv.value for kv in s.range("/")} == model
