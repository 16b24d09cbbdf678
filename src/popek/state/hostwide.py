"""Allocations shared by every ``POPEK_HOME`` on this host: uid ranges and CPU placement.

Each home has its own state store, but the kernel has one uid space: two
homes that both hand out uid 900000000 give their QEMUs the same uid, and one
home's QEMU may then ``ptrace`` or ``process_vm_readv`` the other's, and reach
its swtpm.  So a home reserves every uid range here too, host-wide, before
an instance may use it (:meth:`HostIds.reserve`), and gives it back when the
instance is deleted (:meth:`HostIds.release`).

The registry is one SQLite database, ``/var/lib/popek-host/host.db`` (0600 in
a 0700 directory, root only; it lasts across reboots as the files owned by
those uids do), with a rollback journal and full sync, so a crash leaves the
old or the new state and a command that returned has its change on disk.
Each range names its home and instance.  Every question a launch asks of it
is one indexed query (does anything overlap this range, which CPUs carry how
many instances), so a launch costs the same with 10 instances on the host as
with 500; the JSON file it replaces (``uids.json``, imported once) was read
and rewritten whole by every launch.

A home's ranges are made to match its store (:meth:`HostIds.heal`) the first
time the home uses the registry (a home made before it) and when the host is
reconciled (``popek admin boot``): a range its store no longer holds is
freed (a delete that died before its release), one the store holds but the
registry lacks is added.  The ranges of a home whose state store is gone are
freed when they stand in the way of a reservation.

CPU placement (:class:`HostCpus`) is host-wide too: each home publishes the
CPUs each of its active instances is pinned to when its state changes, and a
launch in any home picks the CPUs that carry the fewest instances of *all*
homes; before, two homes each pinned their first instance to CPU 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from popek.errors import StoreDamaged, StoreUnavailable

#: the host-wide registry's directory (tests point it elsewhere)
HOST_DIR = Path("/var/lib/popek-host")
REGISTRY = "host.db"
#: the registry's first form, read once into :data:`REGISTRY` and then renamed
LEGACY = "uids.json"

SCHEMA = """
CREATE TABLE IF NOT EXISTS ranges (first INTEGER PRIMARY KEY, size INTEGER NOT NULL,
                                   home TEXT NOT NULL, owner TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS ranges_home ON ranges (home);
CREATE TABLE IF NOT EXISTS homes (home TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS pinned (home TEXT NOT NULL, owner TEXT NOT NULL, cpus TEXT NOT NULL,
                                   PRIMARY KEY (home, owner));
"""
#: the largest range any home hands out (a container's user namespace)
LARGEST = 65536


@dataclass(frozen=True)
class Range:
    """``size`` host ids from ``first`` on, held by the instance ``owner`` of ``home``."""

    first: int
    size: int
    home: str
    owner: str

    def overlaps(self, first: int, size: int) -> bool:
        """Whether this range shares an id with ``first .. first + size - 1``."""
        return self.first < first + size and first < self.first + self.size


def _home_exists(home: str) -> bool:
    return (Path(home) / "state.db").exists()


@contextlib.contextmanager
def _registry(directory: Path, write: bool) -> Iterator[sqlite3.Connection]:
    """The registry database, in one transaction (``write``: an exclusive one)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / REGISTRY
    if not path.exists():  # private from its first byte; O_EXCL: never an fd of a file
        with contextlib.suppress(FileExistsError):  # SQLite has open (closing it drops locks)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    legacy = (directory / LEGACY).exists()
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("BEGIN IMMEDIATE" if write or legacy else "BEGIN")
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)  # nothing written when the tables exist
        if legacy:
            _import_legacy(db, directory)
        yield db
        db.execute("COMMIT")
        if legacy:  # imported and on disk: set the old file aside
            with contextlib.suppress(FileNotFoundError):
                os.replace(directory / LEGACY, directory / (LEGACY + ".imported"))
    except sqlite3.DatabaseError as exc:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            raise StoreUnavailable(f"the host-wide uid registry {path} stayed locked by another "
                                   "popek command for 30 s; retry when it has finished") from exc
        raise _damaged(path, exc) from exc
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    finally:
        db.close()


def _damaged(path: Path, exc: Exception) -> StoreDamaged:
    return StoreDamaged(f"the host-wide uid registry {path} is damaged ({exc!r:.80}); "
                        "popek left it as it is: move it away (every home re-registers "
                        "its ranges at its next launch)")


def _import_legacy(db: sqlite3.Connection, directory: Path) -> None:
    """Read the JSON registry of earlier versions into the database, once."""
    old = directory / LEGACY
    try:
        doc = json.loads(old.read_bytes())
        rows = [(int(r["first"]), int(r["size"]), str(r["home"]), str(r["owner"]))
                for r in doc["ranges"]]
    except FileNotFoundError:  # another command imported it meanwhile
        return
    except (ValueError, KeyError, TypeError) as exc:
        raise _damaged(old, exc) from exc
    db.executemany("INSERT OR IGNORE INTO ranges VALUES (?, ?, ?, ?)", rows)


class HostIds:
    """The host uid ranges of one home, kept apart from every other home's."""

    def __init__(self, home: Path, directory: Path | None = None) -> None:
        """``home``: this ``POPEK_HOME``; ``directory``: the registry's (:data:`HOST_DIR`)."""
        self.home = str(home.resolve())
        self.dir = directory or HOST_DIR

    # -- reading -------------------------------------------------------------------
    def ranges(self) -> list[Range]:
        """Every range held on this host, by every home."""
        with _registry(self.dir, write=False) as db:
            return [Range(*row) for row in db.execute(
                "SELECT first, size, home, owner FROM ranges ORDER BY first")]

    def taken(self, first: int, size: int) -> bool:
        """Whether another home that still exists holds an id of ``first .. first + size - 1``
        (one indexed query; :meth:`reserve` frees the ranges of homes that are gone)."""
        with _registry(self.dir, write=False) as db:
            return any(_home_exists(r.home) for r in self._overlapping(db, first, size))

    # -- changing ------------------------------------------------------------------
    def reserve(self, first: int, size: int, owner: str,
                mine: Callable[[], dict[int, tuple[int, str]]]) -> bool:
        """Reserve ``size`` ids from ``first`` for ``owner`` of this home; ``False`` when taken.

        ``mine()`` returns the ranges this home's store holds (``{first: (size,
        owner)}``); it is read, under the registry's lock, only the first time
        this home uses the registry (see the module's text).  Ranges of homes
        that are gone do not stand in the way: they are freed here.
        """
        with _registry(self.dir, write=True) as db:
            if db.execute("SELECT 1 FROM homes WHERE home=?", (self.home,)).fetchone() is None:
                self._heal(db, mine())
            clash = self._overlapping(db, first, size)
            gone = {r.home for r in clash if not _home_exists(r.home)}
            for home in gone:
                db.execute("DELETE FROM ranges WHERE home=?", (home,))
                db.execute("DELETE FROM pinned WHERE home=?", (home,))
                db.execute("DELETE FROM homes WHERE home=?", (home,))
            if any(r.home not in gone for r in clash):
                return False
            db.execute("INSERT OR REPLACE INTO ranges VALUES (?, ?, ?, ?)",
                       (first, size, self.home, owner))
            return True

    def release(self, first: int) -> None:
        """Free this home's range that starts at ``first`` (nothing when it holds none)."""
        with _registry(self.dir, write=True) as db:
            db.execute("DELETE FROM ranges WHERE first=? AND home=?", (first, self.home))

    def heal(self, mine: dict[int, tuple[int, str]]) -> None:
        """Make this home's ranges those of ``mine`` (its store's); forget homes that are gone."""
        with _registry(self.dir, write=True) as db:
            self._heal(db, mine)
            for (home,) in db.execute("SELECT home FROM homes").fetchall():
                if not _home_exists(home):
                    for table in ("ranges", "pinned", "homes"):
                        db.execute(f"DELETE FROM {table} WHERE home=?", (home,))

    # -- inside a transaction --------------------------------------------------------
    def _overlapping(self, db: sqlite3.Connection, first: int, size: int) -> list[Range]:
        """Other homes' ranges that share an id with ``first .. first + size - 1``."""
        rows = db.execute(
            "SELECT first, size, home, owner FROM ranges WHERE first > ? AND first < ? "
            "AND first + size > ? AND home != ?",
            (first - LARGEST, first + size, first, self.home))
        return [Range(*row) for row in rows]

    def _heal(self, db: sqlite3.Connection, mine: dict[int, tuple[int, str]]) -> None:
        held = {first for (first,) in db.execute(
            "SELECT first FROM ranges WHERE home=?", (self.home,))}
        for first in held - set(mine):
            db.execute("DELETE FROM ranges WHERE first=? AND home=?", (first, self.home))
        for first, (size, owner) in sorted(mine.items()):
            if first not in held and not self._overlapping(db, first, size):
                db.execute("INSERT OR IGNORE INTO ranges VALUES (?, ?, ?, ?)",
                           (first, size, self.home, owner))
        db.execute("INSERT OR IGNORE INTO homes VALUES (?)", (self.home,))


class HostCpus:
    """The CPUs every home's active instances are pinned to (for placement, not a limit)."""

    def __init__(self, home: Path, directory: Path | None = None) -> None:
        """``home``: this ``POPEK_HOME``; ``directory``: the registry's (:data:`HOST_DIR`)."""
        self.ids = HostIds(home, directory)
        self.home = self.ids.home

    def load(self, but: str = "") -> list[tuple[tuple[int, ...], int]]:
        """``(cpus, how many instances)`` over every home that still exists, without ``but``.

        ``but`` is an instance of this home (``project/name``) left out: the one
        being placed.  One grouped query, however many instances there are.
        """
        with _registry(self.ids.dir, write=False) as db:
            rows = db.execute(
                "SELECT home, cpus, count(*) FROM pinned WHERE NOT (home=? AND owner=?) "
                "GROUP BY home, cpus", (self.home, but)).fetchall()
        homes = {home for home, _, _ in rows}
        alive = {home for home in homes if home == self.home or _home_exists(home)}
        return [(tuple(int(c) for c in cpus.split(",") if c), n)
                for home, cpus, n in rows if home in alive]

    def elsewhere(self) -> list[tuple[int, ...]]:
        """The CPU sets of the active instances of the other homes that still exist."""
        with _registry(self.ids.dir, write=False) as db:
            rows = db.execute("SELECT home, cpus FROM pinned WHERE home != ? ORDER BY home, owner",
                              (self.home,)).fetchall()
        return [tuple(int(c) for c in cpus.split(",") if c)
                for home, cpus in rows if _home_exists(home)]

    def pin(self, owner: str, cpus: tuple[int, ...] | list[int]) -> None:
        """Record that ``owner`` (``project/name``) of this home is pinned to ``cpus``;
        ``()``: it is not (stopped, deleted or unpinned)."""
        with _registry(self.ids.dir, write=True) as db:
            if cpus:
                db.execute("INSERT OR REPLACE INTO pinned VALUES (?, ?, ?)",
                           (self.home, owner, ",".join(str(c) for c in cpus)))
            else:
                db.execute("DELETE FROM pinned WHERE home=? AND owner=?", (self.home, owner))

    def publish(self, mine: dict[str, tuple[int, ...]]) -> None:
        """Make this home's entries exactly ``mine`` (owner -> CPUs): a full resync."""
        with _registry(self.ids.dir, write=True) as db:
            db.execute("DELETE FROM pinned WHERE home=?", (self.home,))
            db.executemany("INSERT INTO pinned VALUES (?, ?, ?)",
                           [(self.home, owner, ",".join(str(c) for c in cpus))
                            for owner, cpus in sorted(mine.items()) if cpus])


def homes(directory: Path | None = None) -> set[str]:
    """Every home the registry knows whose state store still exists (none: no registry)."""
    directory = directory or HOST_DIR
    if not (directory / REGISTRY).exists() and not (directory / LEGACY).exists():
        return set()
    with _registry(directory, write=False) as db:
        found = {row[0] for table in ("homes", "ranges", "pinned")
                 for row in db.execute(f"SELECT DISTINCT home FROM {table}")}
    return {h for h in found if _home_exists(h)}
