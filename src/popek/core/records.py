"""Instance records and intents in the state store.

Every mutating operation follows one pattern: check the transition, write
the intent (``starting``, ``stopping``, ``deleting``) together with an owner
key naming the popek process that carries it out, act, then write the
outcome and drop the owner key.  Each write is a compare-and-swap on the
record's ``mod_revision``: a lost compare raises
:class:`~popek.errors.ConflictError` and changes nothing.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime

from popek import paths
from popek.core.ids import free_uid, held, next_uid_op
from popek.core.lifecycle import ACTIVE, State, transition
from popek.core.model import DEFAULT_PROJECT, Instance, InstanceSpec
from popek.errors import AlreadyExists, ConflictError, NotFound, PopekError
from popek.names import validate_name
from popek.state.hostwide import HostCpus, HostIds
from popek.state.owners import Owner, live_owner
from popek.state.schema import (
    ACTIVE_INDEX_KEY,
    ACTIVE_PREFIX,
    active_key,
    instance_key,
    instances_prefix,
    owner_key,
    uid_key,
)
from popek.state.store import Compare, Delete, KeyValue, Op, Put, StateStore

#: events kept in an instance's history
HISTORY = 20


def now() -> str:
    """The current UTC time as recorded in histories."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def _conflict(name: str) -> ConflictError:
    return ConflictError(f"instance {name!r} was changed by another operation at the same "
                         "time; look at popek info and retry")


def owner_of(inst: Instance) -> str:
    """The owner key of ``inst``'s intents."""
    return owner_key(inst.project, inst.name)


@dataclass(frozen=True)
class Active:
    """An active instance as the active index keeps it: what a launch decides on."""

    name: str
    project: str
    label: str
    cpus: tuple[int, ...]


def _index_ops(inst: Instance) -> list[Op]:
    """The writes that keep ``inst``'s entry of the active index in step with its record."""
    key = active_key(inst.project, inst.name)
    if inst.state not in ACTIVE:
        return [Delete(key)]
    cpus = inst.runtime.details.get("cpus", []) if inst.runtime else []
    return [Put(key, json.dumps({"label": inst.spec.label, "cpus": list(cpus)}).encode())]


#: ``project`` of a read: the project of the :class:`Records` (no project is named ".")
MINE = "."


class Records:
    """Reads and compare-and-swap writes of instance records (names are of ``project``)."""

    def __init__(self, store: StateStore, project: str = DEFAULT_PROJECT) -> None:
        """Work on ``store``, on the instances of ``project``."""
        self.store = store
        self.project = project

    def _which(self, project: str | None) -> str | None:
        return self.project if project == MINE else project

    def find(self, name: str, project: str = MINE) -> tuple[Instance, int] | None:
        """Return instance ``name`` and its revision, or ``None`` when it has no record."""
        kv = self.store.get(instance_key(self._which(project) or self.project, name))
        return (Instance.from_json(kv.value), kv.mod_revision) if kv else None

    def load(self, name: str, project: str = MINE) -> tuple[Instance, int]:
        """Return instance ``name`` and its revision; raise :class:`NotFound`, or
        :class:`popek.errors.InvalidInput` for a name no instance can have."""
        found = self.find(name, project)
        if found is None:
            validate_name(name)  # bad input (exit 2) rather than "not found"
            names = [i.name for i in self.all(project)]
            known = ", ".join(names) if names else "none"
            which = self._which(project)
            where = "" if which == DEFAULT_PROJECT else f" in project {which!r}"
            raise NotFound(f"instance {name!r} not found{where}; existing instances: {known}")
        return found

    def all(self, project: str | None = MINE) -> list[Instance]:
        """Return every instance (of ``project``; ``None``: of every one), sorted by name."""
        prefix = instances_prefix(self._which(project))
        return [Instance.from_json(kv.value) for kv in self.store.range(prefix)]

    def all_with_revisions(self, project: str | None = None) -> list[tuple[Instance, int]]:
        """Every instance (of ``project``) with its record's ``mod_revision``."""
        return [(Instance.from_json(kv.value), kv.mod_revision)
                for kv in self.store.range(instances_prefix(project))]

    def exists(self, name: str, project: str = MINE) -> bool:
        """Whether instance ``name`` has a record."""
        return self.store.get(instance_key(self._which(project) or self.project, name)) is not None

    def owner(self, inst: Instance) -> KeyValue | None:
        """The owner key of ``inst``'s intent in progress, if any."""
        return self.store.get(owner_of(inst))

    def save(self, inst: Instance, revision: int, event: str) -> int:
        """Write ``inst`` (with ``event`` in its history) if unchanged since ``revision``."""
        inst.history = [*inst.history, {"time": now(), "event": event}][-HISTORY:]
        res = self.store.txn([Compare(inst.key, "mod_revision", "==", revision)],
                             [Put(inst.key, inst.to_json()), *_index_ops(inst)])
        if not res.succeeded:
            raise _conflict(inst.name)
        self.publish_cpus(inst)
        return res.revision

    def intent(self, name: str, operation: str) -> tuple[Instance, int]:
        """Check and record the intent of ``operation`` on ``name``; return it with its revision."""
        inst, rev = self.load(name)
        inst.state = transition(name, inst.state, operation)
        inst.reason = ""
        owner = Owner.me()
        inst.history = [*inst.history, {"time": now(), "event": f"{operation} requested",
                                        "owner": str(owner.pid)}][-HISTORY:]
        res = self.store.txn([Compare(inst.key, "mod_revision", "==", rev)],
                             [Put(inst.key, inst.to_json()), *_index_ops(inst),
                              Put(owner_of(inst), owner.to_bytes())])
        if not res.succeeded:
            raise _conflict(name)
        return inst, res.revision

    def claim(self, inst: Instance, revision: int) -> bool:
        """Take over ``inst``'s settled intent for this process, if nobody changed it.

        Succeeds only when the record is still at ``revision`` and its owner
        key is the one read with it (or none): a reconcile acts on an
        instance only after this, so a launch that finished in between is
        never undone.
        """
        current = self.store.get(owner_of(inst))
        holder = live_owner(current)
        if holder is not None and holder != Owner.me():
            return False  # another process is settling it (or acting on it) now
        guard = [Compare(inst.key, "mod_revision", "==", revision)]
        guard.append(Compare(owner_of(inst), "mod_revision", "==", current.mod_revision)
                     if current else Compare(owner_of(inst), "version", "==", 0))
        return self.store.txn(guard, [Put(owner_of(inst), Owner.me().to_bytes())]).succeeded

    def release(self, inst: Instance) -> None:
        """Drop this process's claim on ``inst`` without changing the record."""
        key = owner_of(inst)
        self.store.txn([Compare(key, "value", "==", Owner.me().to_bytes())], [Delete(key)])

    def finish(self, inst: Instance, revision: int, state: State, event: str,
               reason: str = "") -> int:
        """Write the outcome of an intent and drop its owner key."""
        inst.state = state
        inst.reason = reason
        inst.history = [*inst.history, {"time": now(), "event": event}][-HISTORY:]
        res = self.store.txn([Compare(inst.key, "mod_revision", "==", revision)],
                             [Put(inst.key, inst.to_json()), *_index_ops(inst),
                              Delete(owner_of(inst))])
        if not res.succeeded:
            raise _conflict(inst.name)
        self.publish_cpus(inst)
        return res.revision

    def create(self, name: str, spec: InstanceSpec, id_range: int,
               image_version: str) -> tuple[Instance, int]:
        """Write the new instance (state starting) with its own uid range, in one transaction."""
        owner = Owner.me()
        key = instance_key(self.project, name)
        host = self.host_ids()
        for _ in range(10):
            uid = free_uid(self.store, id_range, host.taken)
            inst = Instance(name=name, project=self.project, spec=spec, state=State.STARTING,
                            uid=uid, created=now(),
                            image_version=image_version,
                            history=[{"time": now(), "event": "launch requested",
                                      "owner": str(owner.pid)}])
            res = self.store.txn(
                [Compare(key, "version", "==", 0), Compare(uid_key(uid), "version", "==", 0)],
                [Put(key, inst.to_json()), Put(uid_key(uid), key.encode()),
                 *_index_ops(inst), Put(owner_of(inst), owner.to_bytes()),
                 next_uid_op(uid, id_range)],
            )
            if res.succeeded:
                try:  # then host-wide: no other home on this host may hold these ids
                    if host.reserve(uid, id_range, key, lambda: held(self.store)):
                        return inst, res.revision
                except BaseException:
                    self.remove(inst, host_wide=False)
                    raise
                self.remove(inst, host_wide=False)  # another home took them meanwhile: retry
                continue
            if self.store.get(key) is not None:
                raise AlreadyExists(f"instance {name!r} already exists; pick another name "
                                    "or delete it first")
        raise ConflictError("could not allocate a uid for the instance; retry")

    def remove(self, inst: Instance, host_wide: bool = True) -> None:
        """Delete the record, its uid reservation (here and host-wide) and its owner key.

        A host-wide release that fails is finished by the next launch of this home
        (:mod:`popek.state.hostwide` heals the registry from the store).
        """
        self.store.txn([], [Delete(inst.key), Delete(uid_key(inst.uid)),
                            Delete(active_key(inst.project, inst.name)),
                            Delete(owner_of(inst))])
        if host_wide:
            with contextlib.suppress(OSError, PopekError):
                self.host_ids().release(inst.uid)
            self.publish_cpus(inst, gone=True)

    def publish_cpus(self, inst: Instance, gone: bool = False) -> None:
        """Tell every home on this host which CPUs ``inst`` is pinned to (none unless active;
        ``gone``: deleted).

        Best effort: placement only; :meth:`heal_host` publishes every instance.
        """
        cpus = inst.runtime.details.get("cpus", []) if inst.runtime else []
        with contextlib.suppress(OSError, PopekError):
            HostCpus(paths.home()).pin(f"{inst.project}/{inst.name}",
                                       tuple(cpus) if inst.state in ACTIVE and not gone else ())

    def heal_host(self) -> None:
        """Make the host-wide registry hold exactly this home's uid ranges and CPU pins.

        Run when the host is reconciled (``popek admin boot``) and by tests; each
        launch and delete keeps the registry in step on its own.
        """
        self.host_ids().heal(held(self.store))
        HostCpus(paths.home()).publish(
            {f"{a.project}/{a.name}": a.cpus for a in self.active()})

    @staticmethod
    def host_ids() -> HostIds:
        """The host-wide uid registry, as this home sees it."""
        return HostIds(paths.home())

    def active(self) -> list[Active]:
        """Every active instance (starting, running, paused, stopping), from the index.

        Reads one small key per active instance instead of every record; a
        store written before the index existed is indexed once, here.
        """
        if self.store.get(ACTIVE_INDEX_KEY) is None:
            self._build_index()
        out = []
        for kv in self.store.range(ACTIVE_PREFIX):
            project, _, name = kv.key[len(ACTIVE_PREFIX):].partition("/")
            doc = json.loads(kv.value)
            out.append(Active(name, project, str(doc["label"]),
                              tuple(int(c) for c in doc["cpus"])))
        return out

    def _build_index(self) -> None:
        ops: list[Op] = [Delete(ACTIVE_PREFIX, prefix=True)]
        for inst in self.all(None):
            if inst.state in ACTIVE:
                ops += _index_ops(inst)
        self.store.txn([Compare(ACTIVE_INDEX_KEY, "version", "==", 0)],
                       [*ops, Put(ACTIVE_INDEX_KEY, b"1")])
