"""Operations: long work a front end started and a client polls or waits on.

The REST API answers a launch, a start or a stop with a timeout at once
(``202``) with an operation, runs the request in a worker thread and records
its progress and outcome here, in the state store under
``/popek/operations/ID`` (:mod:`popek.state.schema`).  So an operation
outlives the server that ran it: a finished one stays queryable, and one
whose server died (``kill -9``, a reboot) is marked failed by the next
server's :meth:`Operations.fail_orphans`, since no process carries it on
(the server is known by its pid and start time: a pid reused is not it).

An operation's record::

    {"id": "...", "op": "instance.launch", "target": "web", "project": "default",
     "identity": "root@host",
     "status": "running" | "success" | "failure",
     "progress": ["pulling image", ...], "result": ..., "error": null | {...},
     "created": "...Z", "updated": "...Z", "server": PID, "server_started": TICKS}

State diagram: ``running`` -> ``success`` | ``failure``; nothing leaves a
finished state.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from popek import proc
from popek.errors import InvalidInput, NotFound, PopekError
from popek.state.schema import OPERATIONS_PREFIX, operation_key
from popek.state.store import StateStore

RUNNING, SUCCESS, FAILURE = "running", "success", "failure"
STATUSES = (RUNNING, SUCCESS, FAILURE)
#: the error of an operation whose server stopped before it finished
ORPHANED = "the server stopped while it ran"
#: the most progress messages one record keeps (the oldest go first)
MAX_PROGRESS = 50


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def error_body(exc: BaseException) -> dict[str, Any]:
    """The ``error`` of an operation (and of an API answer) for ``exc``.

    ``code`` is the name of popek's exit code for a :class:`PopekError`
    (``not_found``, ``wrong_state``...), ``internal`` for anything else, whose
    message is never shown (it may hold paths or a traceback's details).
    """
    if isinstance(exc, PopekError):
        return {"code": code_name(exc.exit_code), "message": exc.message,
                "field": getattr(exc, "field", None)}
    return {"code": "internal", "message": "internal error: a bug in popek (see the server's "
            "log)", "field": None}


def code_name(exit_code: int) -> str:
    """The name of one of popek's exit codes: ``not_found``, ``bad_input``..."""
    from popek import errors

    for name in ("FAILURE", "BAD_INPUT", "TAMPERED", "DENIED", "CONFLICT", "UNAVAILABLE",
                 "DAMAGED", "NOT_FOUND", "EXISTS", "WRONG_STATE", "INTERNAL", "INTERRUPTED"):
        if getattr(errors, name) == exit_code:
            return name.lower()
    return "failure"


def check_id(op_id: str) -> str:
    """``op_id`` when it has the form of an operation id (32 hex digits), else InvalidInput."""
    if len(op_id) != 32 or any(c not in "0123456789abcdef" for c in op_id):
        raise InvalidInput(f"invalid operation id {op_id[:40]!r}: an operation id is 32 "
                           "lower-case hex digits")
    return op_id


class Operations:
    """The operations recorded in one state store."""

    def __init__(self, store: StateStore) -> None:
        """Over ``store`` (one per thread: a SQLite store is not shared between threads)."""
        self.store = store

    def create(self, op: str, target: str, project: str = "default",
               identity: str = "") -> dict[str, Any]:
        """Record a new running operation of this process; return its record.

        ``project`` is the one it acts in, ``identity`` who asked (as audit records name it).
        """
        stamp = _now()
        rec: dict[str, Any] = {
            "id": uuid.uuid4().hex, "op": op, "target": target, "project": project,
            "identity": identity, "status": RUNNING,
            "progress": [], "result": None, "error": None, "created": stamp,
            "updated": stamp, "server": os.getpid(),
            "server_started": proc.start_time(os.getpid()) or 0}
        self._write(rec)
        return rec

    def _write(self, rec: dict[str, Any]) -> None:
        self.store.put(operation_key(rec["id"]), json.dumps(rec, default=str).encode())

    def get(self, op_id: str, project: str | None = None) -> dict[str, Any]:
        """The record of operation ``op_id`` (of ``project``, if given); else NotFound."""
        kv = self.store.get(operation_key(check_id(op_id)))
        rec: dict[str, Any] | None = json.loads(kv.value) if kv is not None else None
        if rec is None or (project is not None and rec.get("project") != project):
            raise NotFound(f"operation {op_id} not found")
        return rec

    def all(self, project: str | None = None) -> list[dict[str, Any]]:
        """Every operation recorded (of ``project``, if given), oldest first."""
        recs = [json.loads(kv.value) for kv in self.store.range(OPERATIONS_PREFIX)]
        recs = [r for r in recs if project is None or r.get("project") == project]
        return sorted(recs, key=lambda r: str(r.get("created", "")))

    def progress(self, op_id: str, message: str) -> None:
        """Add a progress message to a running operation."""
        rec = self.get(op_id)
        if rec["status"] != RUNNING:
            return
        rec["progress"] = [*rec["progress"], message][-MAX_PROGRESS:]
        rec["updated"] = _now()
        self._write(rec)

    def finish(self, op_id: str, result: Any = None,
               error: BaseException | dict[str, Any] | None = None) -> dict[str, Any]:
        """Mark a running operation finished: ``success`` with ``result``, else ``failure``."""
        rec = self.get(op_id)
        if rec["status"] != RUNNING:
            return rec
        if error is None:
            rec["status"], rec["result"] = SUCCESS, result
        else:
            rec["status"] = FAILURE
            rec["error"] = error if isinstance(error, dict) else error_body(error)
        rec["updated"] = _now()
        self._write(rec)
        return rec

    def fail_orphans(self) -> list[str]:
        """Mark failed every running operation whose server process is gone; return their ids.

        Called when a server starts: no process carries those on any more.  Those
        of another server still running on this home are left to it.
        """
        return self._fail(lambda rec: not proc.alive(int(rec.get("server", 0)),
                                                     int(rec.get("server_started", -1))))

    def fail_own(self) -> list[str]:
        """Mark failed the running operations of this process (a server that stops)."""
        me = (os.getpid(), proc.start_time(os.getpid()))
        return self._fail(lambda rec: (rec.get("server"), rec.get("server_started")) == me)

    def _fail(self, orphaned: Callable[[dict[str, Any]], bool]) -> list[str]:
        failed = []
        for rec in self.all():
            if rec["status"] == RUNNING and orphaned(rec):
                self.finish(rec["id"], error={"code": "failure", "message": ORPHANED,
                                              "field": None})
                failed.append(rec["id"])
        return failed
