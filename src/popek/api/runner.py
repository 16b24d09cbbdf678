"""Operations of the API: long requests run in worker threads, recorded in the store.

:meth:`Runner.submit` records a running operation
(:class:`popek.core.operations.Operations`), starts a thread that makes its
own :class:`~popek.core.service.Core` (on a store of :data:`STORES`, the pool
every request of the server takes its store from) and runs the work there,
its progress messages and outcome written to the operation's record.
``wait`` sleeps on an event until the thread ends; an operation of an earlier
server is already finished (:meth:`~popek.core.operations.Operations.fail_orphans`
ran at start).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse, Response

from popek import paths
from popek.core.auth import Identity
from popek.core.listings import Listings
from popek.core.operations import Operations
from popek.core.service import Core
from popek.errors import PopekError, StoreError
from popek.state import open_store
from popek.state.store import StateStore

log = logging.getLogger("popek.api")

#: the work of an operation: given its core and a progress callback, it returns the result
Work = Callable[[Core, Callable[[str], None]], Any]


class StorePool:
    """Open state stores the requests of this server take in turn, instead of opening one each.

    Opening the store (the file, its header, the schema check) cost about as
    much as a whole read request.  A store is used by one request at a time
    (:func:`session` takes it and gives it back); one that a request left in a
    transaction, that failed, or whose file was moved away or replaced since
    (:meth:`popek.state.store.SQLiteStore.reusable`) is closed, not kept.  Closing
    a store closes SQLite's connection, whose descriptors SQLite closes only
    once no connection of the process holds a lock on the file (the hazard of
    1d4f644 is a descriptor SQLite does not know about).  Stores of another
    ``POPEK_HOME`` (unit tests switch homes) are closed when the home changes.
    """

    #: the stores kept idle at most (anyio runs at most 40 handlers at once)
    KEEP = 16

    def __init__(self) -> None:
        """No store yet."""
        self._idle: list[StateStore] = []
        self._path: Path | None = None
        self._lock = threading.Lock()

    def take(self) -> StateStore:
        """An open store of this ``POPEK_HOME`` for the calling thread, until :meth:`give`."""
        path = paths.state_db()
        stale: list[StateStore] = []
        with self._lock:
            if path != self._path:
                stale, self._idle, self._path = self._idle, [], path
            store = self._idle.pop() if self._idle else None
        for old in stale:
            _close(old)
        while store is not None and not _reusable(store):
            _close(store)
            with self._lock:
                store = self._idle.pop() if self._idle and path == self._path else None
        return store if store is not None else open_store(any_thread=True)

    def give(self, store: StateStore) -> None:
        """``store`` is free again: kept for the next request if it may be, else closed."""
        with self._lock:
            keep = (_reusable(store) and getattr(store, "path", None) == self._path
                    and len(self._idle) < self.KEEP)
            if keep:
                self._idle.append(store)
        if not keep:
            _close(store)

    def close(self) -> None:
        """Close every idle store (at server stop)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for store in idle:
            _close(store)


def _reusable(store: StateStore) -> bool:
    check = getattr(store, "reusable", None)
    return bool(check()) if check is not None else False


def _close(store: StateStore) -> None:
    close = getattr(store, "close", None)
    if close is not None:
        close()


#: the stores of this process's requests and operations
STORES = StorePool()
#: the instance listings this process keeps (:mod:`popek.core.listings`)
LISTINGS = Listings()


@contextlib.contextmanager
def session(identity: Identity | None = None, project: str | None = None) -> Iterator[Core]:
    """A core for the current thread, as ``identity`` in ``project``, on a store of
    :data:`STORES` (given back after; closed when the request failed in the store),
    with the listings of :data:`LISTINGS`.

    ``None``: the host admin, in the identity's own project (``default`` for the
    host admin).  A project other than ``default`` must exist (NotFound).
    """
    store = STORES.take()
    try:
        core = Core(store=store, identity=identity, project=project, listings=LISTINGS)
        if project is not None and project != "default":
            from popek.core.projects import Projects

            Projects(core.store).require(project)
        yield core
    except StoreError:
        _close(store)  # damaged, busy or gone: the next request opens its own
        raise
    finally:
        STORES.give(store)


def json_body(data: Any) -> bytes:
    """``data`` as the body of a JSON answer, encoded as FastAPI's :class:`JSONResponse`
    encodes it (compact, UTF-8)."""
    return json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def json_response(body: bytes) -> Response:
    """A ``200`` JSON answer of an encoded ``body`` (:func:`json_body`).

    A handler that reads in one hop to a worker thread and answers with this
    skips FastAPI's validation of what it returns, run in a thread of its own
    for a handler that is not ``async``: a hop and a second encoding per request.
    """
    return Response(body, media_type="application/json")


def accepted(rec: dict[str, Any]) -> JSONResponse:
    """The ``202`` answer with operation ``rec``, its URL in ``Location``."""
    return JSONResponse(rec, status_code=202,
                        headers={"Location": f"/1.0/operations/{rec['id']}"})


class Runner:
    """The operations this server runs, and the events their threads set when done."""

    def __init__(self) -> None:
        """No operation yet."""
        self._done: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self) -> list[str]:
        """At server start: mark failed the operations a dead server left running."""
        with session() as core:
            return Operations(core.store).fail_orphans()

    def stop(self) -> list[str]:
        """At server stop: mark failed this server's operations still running, and audit
        the refused credentials still only counted (:mod:`popek.core.refusals`)."""
        from popek.core import authn

        try:
            with session() as core:
                with contextlib.suppress(OSError, PopekError):  # a warning would go nowhere
                    authn.write_summaries(core, authn.REFUSALS.flush())
                return Operations(core.store).fail_own()
        finally:
            STORES.close()

    def submit(self, op: str, target: str, work: Work, identity: Identity | None = None,
               project: str | None = None) -> dict[str, Any]:
        """Record operation ``op`` on ``target``, run ``work`` in a thread; return the record.

        The thread's core acts as ``identity`` in ``project`` (see :func:`session`).
        """
        with session(identity, project) as core:
            rec = Operations(core.store).create(op, target, core.project,
                                                core.identity.label())
        done = threading.Event()
        with self._lock:
            self._done[rec["id"]] = done
        threading.Thread(target=self._run, args=(rec["id"], work, done, identity, project),
                         name=f"op-{rec['id'][:8]}", daemon=True).start()
        return rec

    def _run(self, op_id: str, work: Work, done: threading.Event, identity: Identity | None,
             project: str | None) -> None:
        try:
            with session(identity, project) as core:
                ops = Operations(core.store)

                def progress(message: str) -> None:
                    with contextlib.suppress(Exception):
                        ops.progress(op_id, message)

                try:
                    result = work(core, progress)
                except Exception as exc:
                    if not hasattr(exc, "exit_code"):
                        log.error("operation %s failed", op_id, exc_info=exc)
                    ops.finish(op_id, error=exc)
                else:
                    ops.finish(op_id, result=result)
        except Exception:  # the store itself failed: the record says running until restart
            log.exception("operation %s could not be recorded", op_id)
        finally:
            done.set()

    def wait(self, op_id: str, timeout: float) -> None:
        """Block until operation ``op_id`` of this server ends, or ``timeout`` seconds pass."""
        with self._lock:
            done = self._done.get(op_id)
        if done is not None:
            done.wait(timeout)
