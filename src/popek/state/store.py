"""The state store: a key-value store with etcd v3 semantics, on SQLite.

Keys are strings, values bytes.  Every write bumps one global revision;
each key keeps ``create_revision``, ``mod_revision`` and ``version`` as etcd
does.  :meth:`SQLiteStore.txn` applies a list of operations only when every
comparison holds (compare-and-swap on a key's revision), atomically.  A change
log records every put and delete so that :meth:`SQLiteStore.watch` can replay
changes from a revision.  Leases attach keys to a time to live; keys of an
expired lease are deleted the next time the store is written or
:meth:`SQLiteStore.expire_leases` runs.

The database is in WAL mode and every write transaction is ``BEGIN
IMMEDIATE``, so several popek processes (CLI invocations, the API server) can
share one store safely.  A cluster replaces this class by an etcd-backed one
with the same interface (see :class:`StateStore`).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from popek.errors import StoreError, StoreUnavailable

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    create_revision INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL,
    version INTEGER NOT NULL,
    lease INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS changes (
    revision INTEGER NOT NULL,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    value BLOB,
    PRIMARY KEY (revision, key)
);
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ttl REAL NOT NULL,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0);
"""


@dataclass(frozen=True)
class KeyValue:
    """One key with its value and etcd-style revision metadata."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


@dataclass(frozen=True)
class Event:
    """One change seen by a watch: a put (with the new value) or a delete."""

    kind: Literal["put", "delete"]
    key: str
    value: bytes | None
    revision: int


@dataclass(frozen=True)
class Compare:
    """A transaction guard on one key.

    ``target`` is what is compared: ``mod_revision``, ``create_revision``,
    ``version`` (0 for a missing key) or ``value``.  ``op`` is ``==``, ``!=``,
    ``<`` or ``>``.
    """

    key: str
    target: Literal["mod_revision", "create_revision", "version", "value"]
    op: Literal["==", "!=", "<", ">"]
    operand: int | bytes


@dataclass(frozen=True)
class Put:
    """A put operation inside a transaction."""

    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    """A delete operation inside a transaction (one key, or a whole prefix)."""

    key: str
    prefix: bool = False


@dataclass
class TxnResult:
    """The outcome of :meth:`StateStore.txn`."""

    succeeded: bool
    revision: int
    deleted: int = 0
    responses: list[KeyValue] = field(default_factory=list)


Op = Put | Delete


class StateStore(Protocol):
    """The interface ``core`` uses; implemented on SQLite here, on etcd in a cluster."""

    def get(self, key: str) -> KeyValue | None:
        """Return one key, or ``None``."""
        ...

    def range(self, prefix: str) -> list[KeyValue]:
        """Return every key that starts with ``prefix``, sorted by key."""
        ...

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Write one key; return the new revision."""
        ...

    def delete(self, key: str, prefix: bool = False) -> int:
        """Delete one key (or a prefix); return how many keys went."""
        ...

    def txn(self, compares: Sequence[Compare], success: Sequence[Op],
            failure: Sequence[Op] = ()) -> TxnResult:
        """Apply ``success`` if every compare holds, else ``failure``, atomically."""
        ...

    def revision(self) -> int:
        """Return the current revision of the store."""
        ...

    def changes(self, prefix: str, start_revision: int) -> list[Event]:
        """Return the changes under ``prefix`` since ``start_revision`` (inclusive)."""
        ...


def _compare_holds(current: KeyValue | None, cmp: Compare) -> bool:
    if cmp.target == "value":
        if current is None:
            return cmp.op == "!="
        left: int | bytes = current.value
    elif current is None:
        left = 0
    else:
        left = getattr(current, cmp.target)
    right = cmp.operand
    if isinstance(left, bytes) != isinstance(right, bytes):
        raise StoreError(f"compare on {cmp.target} of {cmp.key!r}: operand has the wrong type")
    if cmp.op == "==":
        return left == right
    if cmp.op == "!=":
        return left != right
    if cmp.op == "<":
        return left < right  # type: ignore[operator]
    return left > right  # type: ignore[operator]


def _prefix_end(prefix: str) -> str:
    """Return the smallest string greater than every string starting with ``prefix``."""
    return prefix + "\U0010ffff"


class SQLiteStore:
    """A :class:`StateStore` in one SQLite file (WAL mode)."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        """Open (and create if needed) the store at ``path``."""
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), timeout=timeout, isolation_level=None)
            self._db.execute("PRAGMA synchronous=NORMAL")
            if self._db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                self._db.execute("PRAGMA journal_mode=WAL")  # persistent: set once
                self._db.executescript(_SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION};")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open the state store {path}: {exc}") from exc

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

    # -- reads -----------------------------------------------------------
    def _row(self, row: tuple[str, bytes, int, int, int, int]) -> KeyValue:
        return KeyValue(row[0], bytes(row[1]), row[2], row[3], row[4], row[5])

    def get(self, key: str) -> KeyValue | None:
        """Return one key, or ``None`` when it does not exist."""
        cur = self._db.execute(
            "SELECT key, value, create_revision, mod_revision, version, lease FROM kv WHERE key=?",
            (key,),
        )
        row = cur.fetchone()
        return self._row(row) if row else None

    def range(self, prefix: str) -> list[KeyValue]:
        """Return every key that starts with ``prefix``, sorted by key."""
        cur = self._db.execute(
            "SELECT key, value, create_revision, mod_revision, version, lease FROM kv "
            "WHERE key >= ? AND key < ? ORDER BY key",
            (prefix, _prefix_end(prefix)),
        )
        return [self._row(r) for r in cur.fetchall()]

    def revision(self) -> int:
        """Return the current revision of the store."""
        row = self._db.execute("SELECT value FROM meta WHERE name='revision'").fetchone()
        return int(row[0])

    def changes(self, prefix: str, start_revision: int) -> list[Event]:
        """Return the changes under ``prefix`` from ``start_revision`` on, oldest first."""
        cur = self._db.execute(
            "SELECT revision, key, kind, value FROM changes WHERE revision >= ? "
            "AND key >= ? AND key < ? ORDER BY revision, key",
            (start_revision, prefix, _prefix_end(prefix)),
        )
        return [
            Event(kind, key, bytes(value) if value is not None else None, rev)
            for rev, key, kind, value in cur.fetchall()
        ]

    def watch(self, prefix: str, start_revision: int, poll: float = 0.1,
              timeout: float | None = None) -> Iterator[Event]:
        """Yield changes under ``prefix`` from ``start_revision`` on, as they happen.

        Stops after ``timeout`` seconds without a change (forever when ``None``).
        """
        next_rev = start_revision
        idle_since = time.monotonic()
        while True:
            events = self.changes(prefix, next_rev)
            for ev in events:
                yield ev
                next_rev = ev.revision + 1
            if events:
                idle_since = time.monotonic()
            elif timeout is not None and time.monotonic() - idle_since >= timeout:
                return
            else:
                time.sleep(poll)

    # -- writes ----------------------------------------------------------
    def _begin(self) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"state store {self.path} is busy or broken: {exc}") from exc

    def _apply(self, op: Op, rev: int) -> tuple[int, KeyValue | None]:
        if isinstance(op, Put):
            if op.lease and not self._db.execute(
                    "SELECT 1 FROM leases WHERE id=?", (op.lease,)).fetchone():
                raise StoreError(f"lease {op.lease} does not exist")
            cur = self.get(op.key)
            create = cur.create_revision if cur else rev
            version = cur.version + 1 if cur else 1
            self._db.execute(
                "INSERT OR REPLACE INTO kv (key, value, create_revision, mod_revision, version,"
                " lease) VALUES (?, ?, ?, ?, ?, ?)",
                (op.key, op.value, create, rev, version, op.lease),
            )
            self._db.execute(
                "INSERT OR REPLACE INTO changes (revision, key, kind, value) "
                "VALUES (?, ?, 'put', ?)",
                (rev, op.key, op.value),
            )
            return 0, KeyValue(op.key, op.value, create, rev, version, op.lease)
        if op.prefix:
            keys = [kv.key for kv in self.range(op.key)]
        else:
            keys = [op.key] if self.get(op.key) else []
        for key in keys:
            self._db.execute("DELETE FROM kv WHERE key=?", (key,))
            self._db.execute(
                "INSERT OR REPLACE INTO changes (revision, key, kind, value) "
                "VALUES (?, ?, 'delete', NULL)",
                (rev, key),
            )
        return len(keys), None

    def txn(self, compares: Sequence[Compare], success: Sequence[Op],
            failure: Sequence[Op] = ()) -> TxnResult:
        """Apply ``success`` if every compare holds, else ``failure``, atomically.

        The revision grows by one when the applied branch changed anything.
        Raises :class:`StoreError` when the database fails.
        """
        self._begin()
        try:
            self._expire_locked()
            ok = all(_compare_holds(self.get(c.key), c) for c in compares)
            ops = success if ok else failure
            rev = self.revision()
            result = TxnResult(succeeded=ok, revision=rev)
            if ops:
                new_rev = rev + 1
                deleted = 0
                for op in ops:
                    n, kv = self._apply(op, new_rev)
                    deleted += n
                    if kv:
                        result.responses.append(kv)
                changed = deleted > 0 or any(isinstance(o, Put) for o in ops)
                if changed:
                    self._db.execute("UPDATE meta SET value=? WHERE name='revision'", (new_rev,))
                    result.revision = new_rev
                result.deleted = deleted
            self._db.execute("COMMIT")
            return result
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Write one key unconditionally; return the new revision."""
        return self.txn([], [Put(key, value, lease)]).revision

    def delete(self, key: str, prefix: bool = False) -> int:
        """Delete one key, or every key under a prefix; return how many went."""
        return self.txn([], [Delete(key, prefix)]).deleted

    def create(self, key: str, value: bytes) -> bool:
        """Write ``key`` only when it does not exist yet; return whether it was written."""
        return self.txn([Compare(key, "version", "==", 0)], [Put(key, value)]).succeeded

    def update(self, key: str, value: bytes, mod_revision: int) -> bool:
        """Write ``key`` only if nobody changed it since ``mod_revision`` (CAS)."""
        return self.txn([Compare(key, "mod_revision", "==", mod_revision)],
                        [Put(key, value)]).succeeded

    # -- leases ----------------------------------------------------------
    def grant_lease(self, ttl: float) -> int:
        """Create a lease that expires ``ttl`` seconds from now; return its id."""
        self._begin()
        try:
            cur = self._db.execute("INSERT INTO leases (ttl, expires) VALUES (?, ?)",
                                   (ttl, time.time() + ttl))
            self._db.execute("COMMIT")
            return int(cur.lastrowid or 0)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def keepalive(self, lease: int) -> bool:
        """Renew a lease for its full TTL; return ``False`` when it already expired."""
        self._begin()
        try:
            self._expire_locked()
            cur = self._db.execute("UPDATE leases SET expires = ? + ttl WHERE id=?",
                                   (time.time(), lease))
            self._db.execute("COMMIT")
            return cur.rowcount == 1
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def revoke_lease(self, lease: int) -> None:
        """Revoke a lease now, deleting every key attached to it."""
        self._begin()
        try:
            self._db.execute("UPDATE leases SET expires = 0 WHERE id=?", (lease,))
            self._expire_locked()
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def expire_leases(self) -> None:
        """Delete expired leases and their keys."""
        self._begin()
        try:
            self._expire_locked()
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _expire_locked(self) -> None:
        expired = [r[0] for r in self._db.execute(
            "SELECT id FROM leases WHERE expires <= ?", (time.time(),)).fetchall()]
        if not expired:
            return
        marks = ",".join("?" * len(expired))
        keys = [r[0] for r in self._db.execute(
            f"SELECT key FROM kv WHERE lease IN ({marks})", expired).fetchall()]
        if keys:
            rev = self.revision() + 1
            for key in keys:
                self._apply(Delete(key), rev)
            self._db.execute("UPDATE meta SET value=? WHERE name='revision'", (rev,))
        self._db.execute(f"DELETE FROM leases WHERE id IN ({marks})", expired)
