"""The events of a host: lifecycle changes, operations and audit records, as they happen.

Read from the state store's change log (:meth:`StateStore.changes`), so a
watcher sees what any popek process did (the CLI in-process, the command
server, the REST API), not only what one server did:

- a put or delete under ``/popek/instances/`` is a ``lifecycle`` event (the
  instance's state; ``deleted`` when the record went);
- a put under ``/popek/operations/`` is an ``operation`` event (its record);
- a new head of the audit chain (``/popek/audit/head``) brings the records
  appended since as ``audit`` events, read from the log file.

Each event is one JSON object with ``type``, ``time`` and ``revision``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from popek.state.schema import AUDIT_HEAD_KEY, INSTANCES_PREFIX, OPERATIONS_PREFIX
from popek.state.store import Event, StateStore

#: the event types, in the order a watcher may filter them
TYPES = ("lifecycle", "operation", "audit")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class EventReader:
    """Turns the store's changes from one revision on into events; call :meth:`poll`."""

    def __init__(self, store: StateStore, audit_log: Path, start: int | None = None) -> None:
        """Events after the store's current revision (or from ``start``)."""
        self.store = store
        self.next = store.revision() + 1 if start is None else start
        self.audit_log = audit_log
        try:
            self.audit_offset = audit_log.stat().st_size
        except OSError:
            self.audit_offset = 0

    def poll(self) -> list[dict[str, Any]]:
        """The events since the last poll, oldest first (an empty list: none yet)."""
        changes: list[Event] = []
        for prefix in (INSTANCES_PREFIX, OPERATIONS_PREFIX, AUDIT_HEAD_KEY):
            changes += self.store.changes(prefix, self.next)
        changes.sort(key=lambda e: (e.revision, e.key))
        out: list[dict[str, Any]] = []
        for ev in changes:
            self.next = max(self.next, ev.revision + 1)
            out += self._events(ev)
        return out

    def _events(self, ev: Event) -> list[dict[str, Any]]:
        base = {"time": _now(), "revision": ev.revision}
        if ev.key.startswith(INSTANCES_PREFIX):
            project, _, name = ev.key[len(INSTANCES_PREFIX):].partition("/")
            state = "deleted"
            if ev.kind == "put" and ev.value is not None:
                try:
                    state = str(json.loads(ev.value).get("state", "?"))
                except ValueError:
                    state = "?"
            return [{"type": "lifecycle", **base, "project": project, "name": name,
                     "state": state}]
        if ev.key.startswith(OPERATIONS_PREFIX):
            if ev.kind != "put" or ev.value is None:
                return []
            return [{"type": "operation", **base, "operation": json.loads(ev.value)}]
        return [{"type": "audit", **base, "record": r} for r in self._audit_records()]

    def _audit_records(self) -> list[dict[str, Any]]:
        """The whole lines appended to the audit log since the last read."""
        try:
            with self.audit_log.open("rb") as f:
                f.seek(self.audit_offset)
                data = f.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1
        self.audit_offset += end
        records = []
        for line in data[:end].splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records


def project_of(event: dict[str, Any]) -> str | None:
    """The project an event is about (``None``: host-wide or not said)."""
    if event.get("type") == "lifecycle":
        return str(event.get("project"))
    inner = event.get("operation") or event.get("record") or {}
    project = inner.get("project") if isinstance(inner, dict) else None
    return str(project) if project else None
