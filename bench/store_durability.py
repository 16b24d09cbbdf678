"""Cost of making the state store's commits land in ``state.db`` itself.

A popek command ends with ``os._exit`` (no close, so SQLite's own checkpoint
on the last close never runs) and the committed pages of its writes stay in
``state.db-wal``: deleting or garbling that file loses them.  This measures,
on this host's disk, what each way of avoiding that costs per *mutating
command* (a fresh connection, ``--txns`` compare-and-swap writes, the end
step, no close) and per write in a loop of ``--loop`` puts:

* ``wal-normal``: WAL, ``synchronous=NORMAL``, nothing at the end (before);
* ``wal-normal+ckpt``: the same, ``PRAGMA wal_checkpoint(TRUNCATE)`` at the end;
* ``wal-full+ckpt``: WAL, ``synchronous=FULL``, the checkpoint at the end;
* ``wal-normal+ckpt-each``: the checkpoint after every transaction;
* ``delete-full`` / ``truncate-full``: a rollback journal, ``synchronous=FULL``.

It also times ``PRAGMA quick_check`` and the cheap open check
(:func:`popek.state.store.SQLiteStore` opening an existing store) on a store
of ``--keys`` keys.  Runs as any user, in ``--dir`` (default ``/var/tmp``:
the disk popek's home is on; ``/tmp`` may be a tmpfs).
Usage: ``.venv/bin/python bench/store_durability.py [--commands 100] [--txns 1]``.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from popek.state.store import Compare, Put, SQLiteStore

MODES = ("wal-normal", "wal-normal+ckpt", "wal-full+ckpt", "wal-normal+ckpt-each",
         "delete-full", "truncate-full")


def _open(path: Path, mode: str) -> SQLiteStore:
    store = SQLiteStore(path)
    db = store._db  # the benchmark sets the pragmas under test
    if mode.startswith("delete"):
        db.execute("PRAGMA journal_mode=DELETE")
    elif mode.startswith("truncate"):
        db.execute("PRAGMA journal_mode=TRUNCATE")
    db.execute("PRAGMA synchronous=" + ("FULL" if "full" in mode else "NORMAL"))
    return store


def _end(store: SQLiteStore, mode: str) -> None:
    if mode.startswith("wal") and "ckpt" in mode:
        store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()


def _write(store: SQLiteStore, mode: str, i: int, j: int) -> None:
    key = f"/popek/bench/{i % 50}/{j}"
    cur = store.get(key)
    store.txn([Compare(key, "mod_revision", "==", cur.mod_revision if cur else 0)],
              [Put(key, b"x" * 600)])
    if mode.endswith("ckpt-each"):
        _end(store, mode)


def commands(base: Path, mode: str, n: int, txns: int) -> list[float]:
    """Milliseconds of each of ``n`` simulated mutating commands."""
    path = base / f"{mode}.db"
    holder = _open(path, mode)  # another process's connection: no checkpoint on close
    kept: list[SQLiteStore] = []  # os._exit: the connections of the commands never close
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        store = _open(path, mode)
        for j in range(txns):
            _write(store, mode, i, j)
        if not mode.endswith("ckpt-each"):
            _end(store, mode)
        times.append((time.perf_counter() - t0) * 1000)
        kept.append(store)
    holder.close()
    return times


def loop(base: Path, mode: str, n: int) -> tuple[float, float]:
    """(ms per put in a loop of ``n``, ms of the end step after the loop)."""
    path = base / f"loop-{mode}.db"
    store = _open(path, mode)
    t0 = time.perf_counter()
    for i in range(n):
        _write(store, mode, i, 0)
    t1 = time.perf_counter()
    _end(store, mode)
    t2 = time.perf_counter()
    return (t1 - t0) * 1000 / n, (t2 - t1) * 1000


def checks(base: Path, keys: int) -> dict[str, float]:
    """Milliseconds of ``quick_check`` and of opening an existing store, on ``keys`` keys."""
    path = base / "check.db"
    store = SQLiteStore(path)
    for i in range(keys):
        store.put(f"/popek/bench/{i}", b"y" * 600)
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    out = {}
    t0 = time.perf_counter()
    for _ in range(10):
        SQLiteStore(path).close()
    out["open (cheap check)"] = (time.perf_counter() - t0) * 100
    t0 = time.perf_counter()
    for _ in range(10):
        db = sqlite3.connect(str(path))
        db.execute("PRAGMA quick_check").fetchall()
        db.close()
    out["quick_check"] = (time.perf_counter() - t0) * 100
    out["db MiB"] = path.stat().st_size / 2**20
    return out


def main() -> None:
    """Run every mode and print the medians."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--commands", type=int, default=100)
    ap.add_argument("--txns", type=int, default=1, help="writes per simulated command")
    ap.add_argument("--loop", type=int, default=200)
    ap.add_argument("--keys", type=int, default=5000)
    ap.add_argument("--dir", default="/var/tmp")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir, prefix="popek-bench-store-") as d:
        base = Path(d)
        print(f"{'mode':<22} {'ms/command':>10} {'p90':>7} {'ms/put(loop)':>13} "
              f"{'end step':>9}")
        for mode in MODES:
            t = commands(base, mode, a.commands, a.txns)
            per_put, end = loop(base, mode, a.loop)
            p90 = statistics.quantiles(t, n=10)[-1]
            print(f"{mode:<22} {statistics.median(t):>10.2f} {p90:>7.2f} {per_put:>13.2f} "
                  f"{end:>9.2f}")
        for name, value in checks(base, a.keys).items():
            print(f"{name:<22} {value:>10.2f}")


if __name__ == "__main__":
    main()
