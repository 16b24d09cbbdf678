"""The last instance listing of each project, kept by a long-running front end (the API server).

A listing (:meth:`popek.core.instances.Instances.summaries`, what ``popek
list`` shows) reads and parses every instance record and settles each with
reality (:meth:`popek.core.reconcile.Reconciler.settled_all`).  The records,
their ports and the owners of operations in progress change only with the
store's revision; reality (an engine process that died, a popek process that
left an operation half done) does not move it.  So a kept listing is given
again only while the revision is the one it was read at and
:meth:`~popek.core.reconcile.Reconciler.settled_already` holds for every
instance: the very test the full path makes before it changes anything.
Otherwise the full path runs (and settles what needs it), and its listing is
kept when the revision did not move while it ran.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from popek.core.lifecycle import State
from popek.state.schema import OWNERS_PREFIX

if TYPE_CHECKING:
    from popek.core.model import Instance
    from popek.core.reconcile import Reconciler
    from popek.engines import LaunchSpec
    from popek.state.store import KeyValue, StateStore

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class Listing:
    """One project's listing as read at ``revision``, with what checking it again needs."""

    revision: int
    insts: list[Instance]
    #: the owner keys at ``revision``
    owners: dict[str, KeyValue]
    #: the specs (no images, no ports) of the instances that run, by name
    specs: dict[str, LaunchSpec]
    rows: Rows


class Listings:
    """The kept listings of one process, by store file and project; shared by its threads."""

    def __init__(self) -> None:
        """Nothing kept yet."""
        self._kept: dict[tuple[object, str | None], Listing] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(store: StateStore, project: str | None) -> tuple[object, str | None] | None:
        file = getattr(store, "file", None)  # a store without one is never kept
        return None if file is None else ((getattr(store, "path", None), file), project)

    def fresh(self, store: StateStore, project: str | None, reconciler: Reconciler) -> Rows | None:
        """The kept rows of ``project`` (``None``: every project) if they still hold, else
        ``None``: the store's revision is the same and no instance needs settling."""
        key = self._key(store, project)
        with self._lock:
            kept = self._kept.get(key) if key is not None else None
        if kept is None or store.revision() != kept.revision:
            return None
        for inst in kept.insts:
            if not reconciler.settled_already(inst, kept.owners, kept.specs.get(inst.name)):
                return None
        return kept.rows

    def keep(self, store: StateStore, project: str | None, revision: int,
             insts: list[Instance], reconciler: Reconciler, rows: Rows) -> None:
        """Keep the listing read from ``revision`` on, unless the store moved on meanwhile."""
        key = self._key(store, project)
        if key is None:
            return
        owners = {kv.key: kv for kv in store.range(OWNERS_PREFIX)}
        if store.revision() != revision:
            return  # written while it was read (by a settle too): not a listing of one revision
        specs = {i.name: reconciler.spec_for(i, False) for i in insts
                 if i.state in (State.RUNNING, State.PAUSED) and i.runtime is not None}
        with self._lock:
            self._kept[key] = Listing(revision, insts, owners, specs, rows)
