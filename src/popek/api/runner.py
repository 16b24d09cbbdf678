"""Operations of the API: long requests run in worker threads, recorded in the store.

:meth:`Runner.submit` records a running operation
(:class:`popek.core.operations.Operations`), starts a thread that opens its
own :class:`~popek.core.service.Core` (a SQLite store is used by the thread
that opened it only) and runs the work there, its progress messages and
outcome written to the operation's record.  ``wait`` sleeps on an event until
the thread ends; an operation of an earlier server is already finished
(:meth:`~popek.core.operations.Operations.fail_orphans` ran at start).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from fastapi.responses import JSONResponse

from popek.core.auth import Identity
from popek.core.operations import Operations
from popek.core.service import Core

log = logging.getLogger("popek.api")

#: the work of an operation: given its core and a progress callback, it returns the result
Work = Callable[[Core, Callable[[str], None]], Any]


@contextlib.contextmanager
def session(identity: Identity | None = None, project: str | None = None) -> Iterator[Core]:
    """A core for the current thread, as ``identity`` in ``project``; its store closed after.

    ``None``: the host admin, in the identity's own project (``default`` for the
    host admin).  A project other than ``default`` must exist (NotFound).
    """
    core = Core(identity=identity, project=project)
    try:
        if project is not None and project != "default":
            from popek.core.projects import Projects

            Projects(core.store).require(project)
        yield core
    finally:
        close = getattr(core.store, "close", None)
        if close is not None:
            close()


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
        """At server stop: mark failed this server's operations still running."""
        with session() as core:
            return Operations(core.store).fail_own()

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
