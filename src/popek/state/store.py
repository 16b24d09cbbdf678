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

Durability: a process that wrote calls :func:`checkpoint_open_stores` before it
exits (every ``popek`` command does, in :func:`popek.cli.entry.finish`), which
copies the write-ahead log into ``state.db`` and truncates it, so a command
that reported success has its changes in the database file itself; losing or
garbling ``state.db-wal`` / ``-shm`` afterwards loses nothing.  Damage is
found when the store is opened (the header, the page count against the file's
size, the schema and the revision row) and on every query: it is
:class:`~popek.errors.StoreDamaged` (exit 7) naming the file, which is never
replaced.  Every other ``sqlite3`` error is :class:`~popek.errors.StoreUnavailable`.
The store's files are made mode 0600 (and popek's home 0711) when opened.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import stat
import struct
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Concatenate, Literal, ParamSpec, Protocol, TypeVar

from popek import paths
from popek.errors import StoreDamaged, StoreError, StoreUnavailable, no_space

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


_P = ParamSpec("_P")
_R = TypeVar("_R")
#: primary SQLite result codes that mean the file is not (any more) a sound database
_DAMAGE_CODES = {11: "SQLITE_CORRUPT", 26: "SQLITE_NOTADB"}
_SQLITE_FULL = 13
_HEADER = b"SQLite format 3\x00"
#: every store opened by this process (see :func:`checkpoint_open_stores`)
_OPEN: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()
#: the files this process committed a write to since it last checkpointed them
_WRITTEN: set[Path] = set()
FILE_MODE = 0o600
#: popek's home: root only, but traversable, because unprivileged instance uids
#: reach their own directories below it (swtpm, QEMU's instance directory)
HOME_MODE = 0o711


def damaged(path: Path, what: str) -> StoreDamaged:
    """The error for a damaged store file: one line naming it and what to do."""
    return StoreDamaged(
        f"the state store {path} is damaged ({what}); popek left it as it is: restore a "
        "backup with 'popek admin restore FILE', or move it away to start an empty store")


def _translate(path: Path, exc: sqlite3.Error) -> StoreUnavailable:
    """The :class:`PopekError` for an ``sqlite3`` error on the store at ``path``."""
    code = getattr(exc, "sqlite_errorcode", None)
    text = str(exc)
    if (code is not None and code & 0xFF in _DAMAGE_CODES) or any(
            m in text for m in ("malformed", "not a database", "corrupt")):
        return damaged(path, text)
    full = no_space(exc, path) if code is None or code & 0xFF == _SQLITE_FULL else None
    if full is not None:
        return full
    return StoreUnavailable(f"the state store {path} cannot be used: {text} "
                            "(busy, full disk or no permission?)")


def _guard(method: Callable[Concatenate[SQLiteStore, _P], _R],
           ) -> Callable[Concatenate[SQLiteStore, _P], _R]:
    """Turn every ``sqlite3.Error`` out of ``method`` into a :class:`StoreUnavailable`."""
    def guarded(self: SQLiteStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise _translate(self.path, exc) from exc
    functools.update_wrapper(guarded, method)
    return guarded


def check_header(path: Path) -> None:
    """Raise :class:`StoreDamaged` unless ``path`` starts like a whole SQLite database.

    Reads the 100-byte header only: the magic string, a valid page size, and
    a file at least as long as the page count the header records (a cut file).
    An empty file is damaged too: popek never leaves one (see :func:`_create`).
    """
    problem = header_problem(path)
    if problem:
        raise damaged(path, problem)


#: one read-only descriptor per database file (device, inode) for the header check,
#: opened once per process and never closed.  Closing *any* descriptor of a file
#: drops every POSIX lock the process holds on it, SQLite's included: a header
#: check that opened and closed the file took away the SHARED lock another
#: connection of the same process (a thread of ``popek serve``) held, so another
#: process closing its last connection believed itself alone, checkpointed and
#: removed the WAL under it, and the store came out "malformed" (seen in the suite).
_HEADER_FDS: dict[tuple[int, int], int] = {}
_HEADER_LOCK = threading.Lock()


def _header_fd(path: Path) -> int:
    """This process's descriptor of the file now at ``path`` (see :data:`_HEADER_FDS`)."""
    st = os.stat(path)
    with _HEADER_LOCK:
        fd = _HEADER_FDS.get((st.st_dev, st.st_ino))
        if fd is None:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            opened = os.fstat(fd)  # the file at path may have been replaced meanwhile
            _HEADER_FDS.setdefault((opened.st_dev, opened.st_ino), fd)
        return fd


def header_problem(path: Path) -> str:
    """What :func:`check_header` finds wrong with ``path``, or ``""``.

    Reads through a descriptor it never closes (see :data:`_HEADER_FDS`).
    """
    fd = _header_fd(path)
    header = os.pread(fd, 100, 0)
    size = os.fstat(fd).st_size
    if size == 0:
        return "the file is empty"
    if len(header) < 100 or not header.startswith(_HEADER):
        return "file is not a database: its header is not SQLite's"
    page_size = struct.unpack(">H", header[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        return f"its header gives an impossible page size {page_size}"
    change, pages, valid_for = (struct.unpack(">I", header[o:o + 4])[0] for o in (24, 28, 92))
    if size % page_size:
        return f"its size {size} is not a whole number of {page_size}-byte pages"
    if change == valid_for and size < pages * page_size and not _wal_frames(path):
        return f"it is cut short: {size} bytes of the {pages * page_size} its header records"
    return ""


def _wal_frames(path: Path) -> bool:
    """Whether ``path``'s write-ahead log holds frames.  Then a file shorter than its
    header says is a checkpoint that stopped half-way (a full disk): SQLite reads
    the pages it did not copy from the log, and the next checkpoint copies them."""
    try:
        return os.stat(f"{path}-wal").st_size > 32
    except OSError:
        return False


def _tighten(path: Path, mode: int) -> None:
    """Take away the permission bits beyond ``mode`` from ``path`` (if it exists and is ours)."""
    with contextlib.suppress(FileNotFoundError):
        st = os.stat(path)
        if stat.S_IMODE(st.st_mode) & ~mode and st.st_uid == os.geteuid():
            os.chmod(path, stat.S_IMODE(st.st_mode) & mode)


def secure_files(path: Path) -> None:
    """Make the store at ``path`` and its ``-wal``/``-shm`` files mode 0600.

    popek's own store (:func:`popek.paths.state_db`) also gets its home
    directory down to 0711: nobody else may list or write it, while the
    unprivileged uids of instances can still reach their directories below it.
    """
    for suffix in ("", "-wal", "-shm"):
        _tighten(path.with_name(path.name + suffix), FILE_MODE)
    if path == paths.state_db():
        _tighten(path.parent, HOME_MODE)


def _create(path: Path, timeout: float) -> None:
    """Create an initialised store at ``path`` unless one exists (mode 0600, never empty).

    The store is built beside ``path`` and linked into place, so no other
    process ever sees it half made, and an existing file is never replaced.
    """
    if path.exists():
        return
    tmp = path.with_name(f".{path.name}.new-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE))
    try:
        db = sqlite3.connect(str(tmp), timeout=timeout, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")  # persistent: set once
            db.executescript(_SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION};")
        finally:
            db.close()  # the last connection: SQLite checkpoints and removes the WAL
        with contextlib.suppress(FileExistsError):  # another process made it first
            os.link(tmp, path)
    finally:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp.with_name(tmp.name + suffix))


def integrity_problem(path: Path) -> str:
    """Check a closed store file thoroughly; return what is wrong with it, or ``""``.

    Runs the header check, ``PRAGMA integrity_check`` (every page: tens of
    milliseconds per 10 MiB, which is why opening a store does not) and
    checks that it is a popek store of this schema version.  Reads only.
    """
    try:
        problem = header_problem(path)
        if problem:
            return problem
        db = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True,
                             isolation_level=None)
        try:
            result = [r[0] for r in db.execute("PRAGMA integrity_check").fetchall()]
            if result != ["ok"]:
                return "integrity check: " + "; ".join(map(str, result[:3]))
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                return f"schema version {version}, this popek knows {SCHEMA_VERSION}"
            if db.execute("SELECT value FROM meta WHERE name='revision'").fetchone() is None:
                return "it has no revision"
        finally:
            db.close()
    except (sqlite3.Error, OSError) as exc:
        return str(exc)
    return ""


def checkpoint_open_stores() -> None:
    """Move every change this process committed from the WAL into the database file.

    For each store file written since the last call, runs ``PRAGMA
    wal_checkpoint(TRUNCATE)`` (on an open store of that file, or on a
    connection of its own when they are all closed): SQLite syncs the WAL,
    copies its pages into the file, syncs the file and empties the WAL.
    Afterwards deleting or garbling ``-wal``/``-shm`` loses none of those
    changes.  Call it before a process that wrote exits without closing its
    stores (``os._exit``); ``popek`` commands do in
    :func:`popek.cli.entry.finish`.  Raises :class:`StoreUnavailable` (the
    changes are committed, but only in the WAL) or :class:`StoreDamaged`.
    """
    for path in sorted(_WRITTEN):
        store = next((s for s in list(_OPEN) if s.path == path and s.is_open), None)
        if store is not None:
            store.checkpoint()
            continue
        if not path.exists():  # moved away or restored over: nothing of ours is left to copy
            _WRITTEN.discard(path)
            continue
        try:
            db = sqlite3.connect(path.absolute().as_uri() + "?mode=rw", uri=True, timeout=30.0,
                                 isolation_level=None)
            try:
                done = _checkpoint(db)
            finally:
                db.close()
        except sqlite3.Error as exc:
            raise _translate(path, exc) from exc
        if not done:
            raise _not_checkpointed(path)
        _WRITTEN.discard(path)


#: how long a command's end waits for the checkpoints of other commands to let it in
CHECKPOINT_WAIT_S = 30.0


def _checkpoint(db: sqlite3.Connection, wait: float = CHECKPOINT_WAIT_S) -> bool:
    """Copy the whole WAL into the database file (and empty it); whether that happened.

    Only one connection checkpoints at a time, and SQLite answers busy at once
    to the others (the busy timeout covers writers, not a running
    checkpoint): commands that end together, each checkpointing, would
    report an error though their changes are safe.  So a busy checkpoint is
    tried again; and when another process's checkpoint already copied every
    frame of the WAL into the (synced) file, ours is done too, though the WAL
    was not emptied.
    """
    deadline = time.monotonic() + wait
    pause = 0.002
    while True:
        if not db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]:
            return True
        busy, log, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if not busy and log == copied:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(pause)  # back-off: another process's checkpoint is running
        pause = min(pause * 2, 0.05)


def _not_checkpointed(path: Path) -> StoreUnavailable:
    return StoreUnavailable(
        f"the state store {path} could not be checkpointed: another process kept it busy; "
        f"the changes are committed but only in {path.name}-wal until the next command")


def close_stores_of(path: Path) -> None:
    """Close every store of this process that is open on ``path``."""
    for store in [s for s in list(_OPEN) if s.path == path]:
        store.close()


def checkpoint_at_exit(code: int) -> int:
    """Run :func:`checkpoint_open_stores` as a command ends; return the exit code to use.

    A failure is printed as one ``Error:`` line; a command that had
    succeeded then exits with the error's code (its changes are committed,
    but not yet safe from the loss of the WAL), a failed one keeps its code.
    """
    try:
        checkpoint_open_stores()
    except StoreError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return code or exc.exit_code
    return code


class SQLiteStore:
    """A :class:`StateStore` in one SQLite file (WAL mode)."""

    def __init__(self, path: Path, timeout: float = 30.0, any_thread: bool = False) -> None:
        """Open (and create if needed) the store at ``path``.

        Raises :class:`StoreDamaged` when the file is not a whole popek store
        (it is left as it is) and :class:`StoreUnavailable` when it cannot be
        opened (permissions, a full disk, a lock held for ``timeout`` seconds).
        ``any_thread``: threads may use it one after another (a pool of the API
        server hands it out); by default only the thread that opened it may.
        """
        self.path = path
        #: how long a lock another process holds is waited for (busy timeout, checkpoint)
        self.timeout = timeout
        self.is_open = False
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=HOME_MODE)
            _create(path, timeout)
            check_header(path)
            self._db = sqlite3.connect(str(path), timeout=timeout, isolation_level=None,
                                       check_same_thread=not any_thread)
            self.is_open = True
            st = os.stat(path)
            #: the file this connection reads, (device, inode): see :meth:`reusable`
            self.file = (st.st_dev, st.st_ino)
            self._db.execute("PRAGMA synchronous=NORMAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreUnavailable(f"the state store {path} has schema version {version}, "
                                       f"made by a newer popek; this one knows {SCHEMA_VERSION}")
            if version != SCHEMA_VERSION:
                if self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                    raise damaged(path, f"it has tables but no popek schema version ({version})")
                self._db.execute("PRAGMA journal_mode=WAL")  # persistent: set once
                self._db.executescript(_SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION};")
            self._db.execute("SELECT value FROM meta WHERE name='revision'").fetchone()
            secure_files(path)
        except sqlite3.Error as exc:
            self.close()
            raise _translate(path, exc) from exc
        except OSError as exc:
            self.close()
            raise (no_space(exc, path) or StoreUnavailable(
                f"cannot open the state store {path}: {exc}")) from exc
        except StoreError:
            self.close()
            raise
        _OPEN.add(self)

    def close(self) -> None:
        """Close the database connection, first copying what it wrote into the file.

        The copy is SQLite's ``PASSIVE`` checkpoint: it never waits; when
        another process keeps it from finishing, :func:`checkpoint_open_stores`
        finishes it (the file stays on its list).
        """
        if self.is_open:
            if self.path in _WRITTEN:
                with contextlib.suppress(sqlite3.Error):
                    busy, log, done = self._db.execute(
                        "PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if not busy and log == done:
                        _WRITTEN.discard(self.path)
            self.is_open = False
            with contextlib.suppress(sqlite3.Error):
                self._db.close()

    def reusable(self) -> bool:
        """Whether another request may go on using this connection: it is open, no
        transaction is left in progress, and ``path`` is still the file it opened (not
        moved away or replaced since).  One ``stat``; no query."""
        if not self.is_open or self._db.in_transaction:
            return False
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.file

    @_guard
    def checkpoint(self) -> None:
        """Copy the WAL into the database file, sync it and empty the WAL.

        Raises :class:`StoreUnavailable` when another process kept the store
        busy for the whole timeout (the store's, at most :data:`CHECKPOINT_WAIT_S`;
        the changes stay committed, in the WAL).
        """
        if not _checkpoint(self._db, min(self.timeout, CHECKPOINT_WAIT_S)):
            raise _not_checkpointed(self.path)
        _WRITTEN.discard(self.path)

    @_guard
    def copy_to(self, target: Path) -> int:
        """Write a consistent copy of the store into the new file ``target``; return its revision.

        Uses SQLite's online backup API (other processes may go on writing;
        the copy is one committed state), then checks the copy with ``PRAGMA
        integrity_check``: a damaged store raises :class:`StoreDamaged`.
        """
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE))
        copy = sqlite3.connect(str(target), isolation_level=None)
        try:
            self._db.backup(copy)
            copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        finally:
            copy.close()
        problem = integrity_problem(target)
        if problem:
            raise damaged(self.path, problem)
        return self.revision()

    def _commit(self) -> None:
        self._db.execute("COMMIT")
        _WRITTEN.add(self.path)

    def _rollback(self) -> None:
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):  # the error that got here is the one to tell
                self._db.execute("ROLLBACK")

    # -- reads -----------------------------------------------------------
    def _row(self, row: tuple[str, bytes, int, int, int, int]) -> KeyValue:
        return KeyValue(row[0], bytes(row[1]), row[2], row[3], row[4], row[5])

    @_guard
    def get(self, key: str) -> KeyValue | None:
        """Return one key, or ``None`` when it does not exist."""
        cur = self._db.execute(
            "SELECT key, value, create_revision, mod_revision, version, lease FROM kv WHERE key=?",
            (key,),
        )
        row = cur.fetchone()
        return self._row(row) if row else None

    @_guard
    def range(self, prefix: str) -> list[KeyValue]:
        """Return every key that starts with ``prefix``, sorted by key."""
        cur = self._db.execute(
            "SELECT key, value, create_revision, mod_revision, version, lease FROM kv "
            "WHERE key >= ? AND key < ? ORDER BY key",
            (prefix, _prefix_end(prefix)),
        )
        return [self._row(r) for r in cur.fetchall()]

    @_guard
    def revision(self) -> int:
        """Return the current revision of the store."""
        row = self._db.execute("SELECT value FROM meta WHERE name='revision'").fetchone()
        return int(row[0])

    @_guard
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
            raise _translate(self.path, exc) from exc

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """One write transaction: committed when the block ends; rolled back if the block
        or the commit raises."""
        self._begin()
        try:
            yield
            self._commit()
        except BaseException:
            self._rollback()
            raise

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

    @_guard
    def txn(self, compares: Sequence[Compare], success: Sequence[Op],
            failure: Sequence[Op] = ()) -> TxnResult:
        """Apply ``success`` if every compare holds, else ``failure``, atomically.

        The revision grows by one when the applied branch changed anything.
        Raises :class:`StoreError` when the database fails.
        """
        with self._writing():
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
        return result

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
    @_guard
    def grant_lease(self, ttl: float) -> int:
        """Create a lease that expires ``ttl`` seconds from now; return its id."""
        with self._writing():
            cur = self._db.execute("INSERT INTO leases (ttl, expires) VALUES (?, ?)",
                                   (ttl, time.time() + ttl))
        return int(cur.lastrowid or 0)

    @_guard
    def keepalive(self, lease: int) -> bool:
        """Renew a lease for its full TTL; return ``False`` when it already expired."""
        with self._writing():
            self._expire_locked()
            cur = self._db.execute("UPDATE leases SET expires = ? + ttl WHERE id=?",
                                   (time.time(), lease))
        return cur.rowcount == 1

    @_guard
    def revoke_lease(self, lease: int) -> None:
        """Revoke a lease now, deleting every key attached to it."""
        with self._writing():
            self._db.execute("UPDATE leases SET expires = 0 WHERE id=?", (lease,))
            self._expire_locked()

    @_guard
    def expire_leases(self) -> None:
        """Delete expired leases and their keys."""
        with self._writing():
            self._expire_locked()

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
