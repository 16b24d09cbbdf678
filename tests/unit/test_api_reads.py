"""What makes the API's reads cheap keeps them true (no root).

``popek serve`` takes its stores from a pool instead of opening one per
request (:class:`popek.api.runner.StorePool`), gives a listing again while it
still holds (:mod:`popek.core.listings`), asks about processes through pidfds
kept open (:func:`popek.proc.keep_pidfds`) and reads a container's status
from its cgroup instead of running ``runc state``.  Each must answer what the
slow way answers: the instance core here is the one of test_core_instances (a
fake engine whose processes are flags, a real store).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.responses import JSONResponse

from popek import proc
from popek.api import runner
from popek.api.runner import StorePool, json_body, session
from popek.core.lifecycle import State
from popek.core.listings import Listings
from popek.engines.container import cgroups
from popek.errors import StoreUnavailable
from popek.state.owners import Owner
from popek.state.store import SQLiteStore
from unit.test_core_instances import Env, force_state, launch, set_owner
from unit.test_store_locks import _lock_state


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    e = Env(tmp_path)
    yield e
    e.store.close()


def _listing(env: Env, listings: Listings | None) -> list[dict[str, object]]:
    insts = env.instances()
    insts.listings = listings
    return insts.summaries()


# -- listings kept ---------------------------------------------------------------------
def test_a_kept_listing_is_the_listing_read_anew(env: Env) -> None:
    launch(env, "a")
    launch(env, "b")
    kept = Listings()
    first = _listing(env, kept)
    again = _listing(env, kept)
    assert again is first  # given again, not read again
    assert again == _listing(env, None)
    launch(env, "c")  # a write: the revision moved
    after = _listing(env, kept)
    assert after is not first and [r["name"] for r in after] == ["a", "b", "c"]
    assert after == _listing(env, None)


def test_an_engine_process_that_died_is_settled_not_hidden(env: Env) -> None:
    launch(env, "a")
    launch(env, "b")
    kept = Listings()
    first = _listing(env, kept)
    assert {r["state"] for r in first} == {"running"}
    env.engine.alive["a"] = False  # the process died: nothing in the store moved
    rows = {r["name"]: r for r in _listing(env, kept)}
    assert rows["a"]["state"] == "stopped" and rows["a"]["reason"] == "the fake process exited"
    assert rows["b"]["state"] == "running"
    assert list(rows.values()) == _listing(env, None)


def test_an_operation_whose_popek_process_died_is_settled(env: Env) -> None:
    launch(env, "a")
    force_state(env, "a", State.STOPPING)
    me = Owner(os.getpid(), proc.start_time(os.getpid()) or 0)
    set_owner(env, "a", me)  # an operation of a live popek process: left alone
    kept = Listings()
    assert _listing(env, kept)[0]["state"] == "stopping"
    assert _listing(env, kept)[0]["state"] == "stopping"
    env.engine.alive["a"] = False
    set_owner(env, "a", Owner(os.getpid(), 1))  # its process gone (a write: read anew)
    assert _listing(env, kept)[0]["state"] == "stopped"


def test_a_store_without_a_file_identity_is_never_kept(env: Env) -> None:
    launch(env, "a")
    kept = Listings()
    del env.store.file  # a store of another kind (etcd) has none
    assert _listing(env, kept) is not _listing(env, kept)


# -- the pool of stores ------------------------------------------------------------------
@pytest.fixture
def pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StorePool]:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    p = StorePool()
    yield p
    p.close()


def test_a_store_given_back_serves_the_next_request_in_any_thread(pool: StorePool) -> None:
    store = pool.take()
    store.put("/k", b"v")
    pool.give(store)
    got: list[object] = []

    def request() -> None:
        s = pool.take()
        got.append((s, s.get("/k")))
        pool.give(s)

    t = threading.Thread(target=request)
    t.start()
    t.join()
    assert got[0][0] is store and got[0][1] is not None  # type: ignore[index]


def test_a_store_left_in_a_transaction_or_moved_away_is_closed(
        pool: StorePool, tmp_path: Path) -> None:
    busy = pool.take()
    assert isinstance(busy, SQLiteStore)
    busy._db.execute("BEGIN")
    pool.give(busy)
    assert not busy.is_open
    store = pool.take()
    assert store is not busy
    pool.give(store)
    path = tmp_path / "home" / "state.db"
    os.rename(path, tmp_path / "moved.db")  # moved away ("start an empty store")
    SQLiteStore(path).close()
    fresh = pool.take()
    assert fresh is not store and not store.is_open  # type: ignore[attr-defined]
    assert fresh.get("/k") is None
    pool.give(fresh)


def test_a_new_home_closes_the_stores_of_the_old(pool: StorePool, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    old = pool.take()
    pool.give(old)
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "other"))
    new = pool.take()
    assert new is not old and not old.is_open  # type: ignore[attr-defined]
    assert new.path == tmp_path / "other" / "state.db"  # type: ignore[attr-defined]
    pool.give(new)


def test_a_request_that_failed_in_the_store_does_not_give_it_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(runner, "STORES", StorePool())
    with pytest.raises(StoreUnavailable), session() as core:
        first = core.store
        raise StoreUnavailable("the disk went away")
    with session() as core:
        assert core.store is not first
    runner.STORES.close()


def test_the_pool_keeps_the_locks_of_other_connections(pool: StorePool, tmp_path: Path) -> None:
    """The hazard of 1d4f644: closing a descriptor of state.db drops every POSIX lock of
    the process on it.  The pool closes stores (left in a transaction, of a file moved,
    of another home, at server stop) only through SQLite, which keeps those locks."""
    path = tmp_path / "home" / "state.db"
    other = SQLiteStore(path)  # another thread's connection, as in popek serve
    try:
        other.put("/k", b"v")
        assert _lock_state(path) == "held"
        stores = [pool.take() for _ in range(3)]
        stores[0]._db.execute("BEGIN")  # type: ignore[attr-defined]
        for s in stores:
            pool.give(s)
        pool.close()
        assert _lock_state(path) == "held"
    finally:
        other.close()
    assert _lock_state(path) == "free"


# -- liveness through pidfds ---------------------------------------------------------------
@pytest.fixture
def pidfds(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[tuple[int, int], int]]:
    table: dict[tuple[int, int], int] = {}
    monkeypatch.setattr(proc, "_PIDFDS", table)
    yield table
    for fd in table.values():
        os.close(fd)


def test_a_pidfd_answers_as_proc_does(pidfds: dict[tuple[int, int], int]) -> None:
    child = subprocess.Popen(["sleep", "60"])
    try:
        started = proc.start_time(child.pid)
        assert started is not None
        assert not proc.alive(child.pid, started + 1)  # another process's start time
        assert pidfds == {}
        assert proc.alive(child.pid, started) and proc.alive(child.pid, started)
        assert list(pidfds) == [(child.pid, started)]
        child.kill()
        # not reaped yet: a zombie, which /proc counts as gone too
        assert proc.wait_until(lambda: not proc.alive(child.pid, started), 5.0)
        assert proc.start_time(child.pid) is None
        assert pidfds == {}  # closed once found exited
    finally:
        child.kill()
        child.wait()


def test_the_table_of_pidfds_is_swept(pidfds: dict[tuple[int, int], int],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proc, "MAX_PIDFDS", 2)
    children = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    try:
        starts = [proc.start_time(c.pid) or 0 for c in children]
        assert proc.alive(children[0].pid, starts[0])
        children[0].kill()
        children[0].wait()
        assert proc.alive(children[1].pid, starts[1])
        assert proc.alive(children[2].pid, starts[2])  # full: the exited one swept out
        assert sorted(pidfds) == sorted(zip([c.pid for c in children[1:]], starts[1:],
                                            strict=True))
    finally:
        for c in children:
            c.kill()
            c.wait()


# -- a container's status from its cgroup ---------------------------------------------------
def test_frozen_reads_the_freezer_of_v1_and_v2(tmp_path: Path) -> None:
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    state = v1 / "freezer" / "popek" / "c1" / "freezer.state"
    state.parent.mkdir(parents=True)
    state.write_text("THAWED\n")
    assert cgroups.frozen("/popek/c1", v1) is False
    state.write_text("FROZEN\n")
    assert cgroups.frozen("/popek/c1", v1) is True
    assert cgroups.frozen("/popek/gone", v1) is None
    v2 = tmp_path / "v2"
    events = v2 / "popek" / "c1" / "cgroup.events"
    events.parent.mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("cpu memory pids\n")
    events.write_text("populated 1\nfrozen 0\n")
    assert cgroups.frozen("/popek/c1", v2) is False
    events.write_text("populated 1\nfrozen 1\n")
    assert cgroups.frozen("/popek/c1", v2) is True


# -- the encoded answers ---------------------------------------------------------------------
def test_a_read_is_encoded_as_fastapi_encodes_it() -> None:
    data = [{"name": "é", "memory": 1 << 40, "ports": [], "pid": None, "x": 1.5}]
    assert json_body(data) == JSONResponse(data).body
    assert json.loads(json_body(data)) == data


def test_uvicorn_parses_http_with_httptools() -> None:
    """httptools is a dependency so that uvicorn's ``auto`` picks its parser in C, about a
    quarter of a read's time less than h11's in Python (bench/api.py)."""
    from uvicorn.config import Config

    config = Config(lambda *_: None, lifespan="off")
    config.load()
    assert config.http_protocol_class.__module__ == "uvicorn.protocols.http.httptools_impl"


# -- what the server answers on its event loop, with no thread hop ------------------------
def test_a_kept_listing_is_offered_only_while_it_holds(env: Env) -> None:
    launch(env, "a")
    insts = env.instances()
    insts.listings = Listings()
    assert insts.kept_summaries() is None  # none read yet: the server reads in a thread
    rows = insts.summaries()
    assert insts.kept_summaries() is rows
    env.engine.alive["a"] = False  # reality moved, the store did not: not offered
    assert insts.kept_summaries() is None
    assert insts.summaries()[0]["state"] == "stopped"  # the thread's read settles it
    launch(env, "b")  # a write
    assert insts.kept_summaries() is None


def test_quick_info_only_when_nothing_needs_settling_or_an_engine_process(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from popek.core import instances as core_instances

    launch(env, "a")
    insts = env.instances()
    assert not insts.quick_info("a")  # running on an engine that is not read from files
    monkeypatch.setattr(core_instances, "QUICK_INFO_ENGINES", frozenset({"fake"}))
    assert insts.quick_info("a")
    env.engine.alive["a"] = False  # its process died: the thread reconciles first
    assert not insts.quick_info("a")
    insts.reconcile(["a"])
    monkeypatch.setattr(core_instances, "QUICK_INFO_ENGINES", frozenset())
    assert insts.quick_info("a")  # stopped: nothing to settle, nothing to ask
