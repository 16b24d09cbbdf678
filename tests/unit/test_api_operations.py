"""API operations in the store, the error mapping and the TCP listener's token check.

Operations (:mod:`popek.core.operations`) over a real SQLite store; the API's
application (:func:`popek.api.app.create_app`) through FastAPI's test client
over an empty private POPEK_HOME: no engine runs, nothing needs root.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from popek.api.app import create_app
from popek.api.errors import STATUS, status_of
from popek.core.auth import Tokens
from popek.core.operations import FAILURE, ORPHANED, RUNNING, SUCCESS, Operations, code_name
from popek.errors import (
    EXIT_CODES,
    AlreadyExists,
    InvalidInput,
    NotFound,
    PopekError,
    StateError,
)
from popek.state import SQLiteStore
from popek.state.schema import operation_key


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def ops(home: Path) -> Iterator[Operations]:
    store = SQLiteStore(home / "state.db")
    yield Operations(store)
    store.close()


def test_operation_runs_then_succeeds_and_stays(ops: Operations) -> None:
    rec = ops.create("instance.launch", "web")
    assert rec["status"] == RUNNING and len(rec["id"]) == 32
    ops.progress(rec["id"], "starting")
    done = ops.finish(rec["id"], result={"name": "web"})
    assert done["status"] == SUCCESS and done["result"] == {"name": "web"}
    assert done["progress"] == ["starting"]
    # finished is final: neither a later error nor progress changes it
    assert ops.finish(rec["id"], error=InvalidInput("late"))["status"] == SUCCESS
    ops.progress(rec["id"], "late")
    assert ops.get(rec["id"]) == done


def test_failed_operation_names_the_error_code(ops: Operations) -> None:
    rec = ops.create("instance.stop", "web")
    done = ops.finish(rec["id"], error=NotFound("instance 'web' not found"))
    assert done["status"] == FAILURE
    assert done["error"] == {"code": "not_found", "message": "instance 'web' not found",
                             "field": None}


def test_internal_error_message_is_not_shown(ops: Operations) -> None:
    rec = ops.create("instance.start", "web")
    done = ops.finish(rec["id"], error=RuntimeError("/secret/path exploded"))
    assert done["error"]["code"] == "internal" and "secret" not in done["error"]["message"]


def _of_a_dead_server(ops: Operations, rec: dict[str, object]) -> None:
    """Make ``rec`` look like an operation of a server that died (its pid reused since)."""
    ops.store.put(operation_key(str(rec["id"])),
                  json.dumps({**rec, "server_started": -1}).encode())


def test_orphans_of_a_dead_server_are_failed(ops: Operations) -> None:
    running = ops.create("instance.launch", "a")
    _of_a_dead_server(ops, running)
    finished = ops.finish(ops.create("instance.launch", "b")["id"], result=1)
    mine = ops.create("instance.launch", "c")  # of a server alive (this process)
    assert ops.fail_orphans() == [running["id"]]
    assert ops.get(running["id"])["error"]["message"] == ORPHANED
    assert ops.get(running["id"])["status"] == FAILURE
    assert ops.get(finished["id"]) == finished
    assert ops.get(mine["id"])["status"] == RUNNING
    assert ops.fail_orphans() == []


def test_a_stopping_server_fails_its_own_operations_only(ops: Operations) -> None:
    other = ops.create("instance.launch", "a")
    _of_a_dead_server(ops, other)
    mine = ops.create("instance.start", "b")
    assert ops.fail_own() == [mine["id"]]
    assert ops.get(mine["id"])["error"]["message"] == ORPHANED
    assert ops.get(other["id"])["status"] == RUNNING


def test_operation_ids_are_checked(ops: Operations) -> None:
    with pytest.raises(InvalidInput, match="32 lower-case hex"):
        ops.get("../../popek/instances")
    with pytest.raises(NotFound):
        ops.get("0" * 32)


def test_every_exit_code_has_a_name_and_a_status() -> None:
    names = {code_name(code) for code, _ in EXIT_CODES if code}
    assert len(names) == len(EXIT_CODES) - 1  # each its own, success aside
    for code in STATUS:
        assert 400 <= STATUS[code] < 600
    assert status_of(NotFound("x")) == 404 and status_of(AlreadyExists("x")) == 409
    assert status_of(InvalidInput("x")) == 400
    assert status_of(StateError("web", "stop", "stopped", ("running",))) == 409
    assert status_of(PopekError("engine failed")) == 500


def test_local_app_answers_errors_as_json(home: Path) -> None:
    with TestClient(create_app(local=True), raise_server_exceptions=False) as c:
        assert c.get("/1.0/instances").json() == []
        r = c.get("/1.0/instances/nobody")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = c.get("/1.0/instances/No_Body")
        assert r.status_code == 400 and r.json()["error"]["field"] == "name"
        r = c.put("/1.0/instances/web/state", json={"action": "explode"})
        assert r.status_code == 400
        assert r.json()["error"] == {"code": "bad_input", "field": "action",
                                     "message": r.json()["error"]["message"]}
        r = c.get("/1.0/operations/" + "f" * 32 + "/wait", params={"timeout": -1})
        assert r.status_code == 400 and r.json()["error"]["field"] == "timeout"
        assert c.get("/1.0/nothing").json()["error"]["code"] == "not_found"


def test_tcp_app_needs_a_valid_token(home: Path) -> None:
    store = SQLiteStore(home / "state.db")
    tokens = Tokens(store)
    _, good = tokens.create("default", "viewer")
    revoked, bad = tokens.create("default", "viewer")
    tokens.revoke(revoked.id)
    store.close()
    with TestClient(create_app(local=False), raise_server_exceptions=False) as c:
        for headers in ({}, {"Authorization": "Basic cm9vdDo="},
                        {"Authorization": "Bearer pk1.abc.forged"},
                        {"Authorization": f"Bearer {bad}"}):
            r = c.get("/1.0/instances", headers=headers)
            assert r.status_code == 401, (headers, r.text)
            assert r.json()["error"]["code"] == "unauthenticated"
        r = c.get("/1.0/instances", headers={"Authorization": f"Bearer {good}"})
        assert r.status_code == 200, r.text


def test_events_socket_needs_a_token_on_tcp_and_known_types(home: Path) -> None:
    from starlette.testclient import WebSocketDenialResponse
    from starlette.websockets import WebSocketDisconnect

    with TestClient(create_app(local=False)) as c, pytest.raises(WebSocketDenialResponse) as no, \
            c.websocket_connect("/1.0/events"):
        pass
    assert no.value.status_code == 401
    with TestClient(create_app(local=True)) as c:
        with c.websocket_connect("/1.0/events?types=lifecycle") as ws:
            assert ws.receive_json() == {"type": "hello", "types": ["lifecycle"]}
        with pytest.raises(WebSocketDisconnect) as bad, \
                c.websocket_connect("/1.0/events?types=bogus") as ws:
            ws.receive_text()
        assert bad.value.code == 1008 and "allowed: lifecycle" in bad.value.reason
