"""Reconcile: settle instance records with what the host says.

An engine process that died marks its instance ``stopped`` with the reason;
an intent whose popek process died is completed (delete) or rolled back
(start) or settled by what the engine says (stop, start that got as far as
a live guest).  It runs as an explicit step, once per command, on the
instances the command touches (:meth:`Reconciler.run` with names) or on
every instance when the command reads them all.

Before it changes anything, a reconcile *claims* the record
(:meth:`popek.core.records.Records.claim`): a compare-and-swap on the
revision it read.  A launch or stop that finishes in between changes that
revision, the claim fails, and the finished operation is left alone: a
stale copy of a record never causes a cleanup.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from popek.core.lifecycle import ACTIVE, State
from popek.core.model import Instance
from popek.core.records import Records, owner_of
from popek.engines import Engine, LaunchSpec
from popek.errors import ConflictError
from popek.state.owners import live_owner
from popek.state.schema import OWNERS_PREFIX
from popek.state.store import KeyValue

#: the states a reconcile looks at: an active instance, or an intent to delete
WATCHED = (*ACTIVE, State.DELETING)


class Reconciler:
    """Settles records of instances whose engine process or owning popek process died."""

    def __init__(self, records: Records, engine_for: Callable[[Instance], Engine],
                 spec_for: Callable[[Instance, bool], LaunchSpec],
                 purge: Callable[[Instance], None], kill: Callable[[Instance], None],
                 settled: Callable[[Instance, str], None] | None = None) -> None:
        """``spec_for(inst, full)`` builds a launch spec (``full=False``: no image, no ports);
        ``purge`` removes what an instance left; ``kill`` ends its engine process;
        ``settled(inst, what)`` is told each change made (core audits it: the outcome
        of an operation whose popek process died)."""
        self.records, self.engine_for, self.spec_for = records, engine_for, spec_for
        self.purge, self.kill = purge, kill
        self.settled = settled

    def run(self, names: Iterable[str] | None = None) -> list[str]:
        """Settle ``names`` (every instance when ``None``); return a line per change made."""
        owners: dict[str, KeyValue] | None = None
        if names is None:
            pairs = self.records.all_with_revisions(None)
            owners = {kv.key: kv for kv in self.records.store.range(OWNERS_PREFIX)}
        else:
            pairs = [found for name in names if (found := self.records.find(name))]
        return [change for inst, rev in pairs if (change := self.one(inst, rev, owners))]

    def settled_all(self, project: str | None) -> list[Instance]:
        """Every instance (of ``project``) after a reconcile, reading the records once.

        A record that reconcile left alone is returned as read; the few it
        changed (or that changed meanwhile) are read again.
        """
        pairs = self.records.all_with_revisions(project)
        owners = {kv.key: kv for kv in self.records.store.range(OWNERS_PREFIX)}
        out = []
        for inst, rev in pairs:
            before = (inst.state, inst.reason, inst.runtime is None)
            if self.one(inst, rev, owners) or before != (inst.state, inst.reason,
                                                          inst.runtime is None):
                found = self.records.find(inst.name, inst.project)
                if found is None:
                    continue  # an interrupted delete was finished
                inst = found[0]
            out.append(inst)
        return out

    def one(self, inst: Instance, rev: int, owners: dict[str, KeyValue] | None = None) -> str:
        """Settle one record read at ``rev``; return what was done ("" for nothing).

        ``owners``: every owner key, read once for a reconcile of all instances.
        """
        if self.settled_already(inst, owners):
            return ""
        eng = self.engine_for(inst)
        if not self.records.claim(inst, rev):
            return ""  # changed since it was read: whoever changed it settled it
        try:
            done = self._settle(inst, rev, eng)
        except ConflictError:
            return ""
        if done and self.settled is not None:
            self.settled(inst, done)
        return done

    def settled_already(self, inst: Instance, owners: dict[str, KeyValue] | None = None,
                        spec: LaunchSpec | None = None) -> bool:
        """Whether :meth:`one` would leave ``inst`` as it is: not active, an operation of a
        live popek process in progress, or running (paused) with its engine process alive.

        ``owners`` as for :meth:`one`; ``spec``: its spec without images and ports when
        the caller has it (``spec_for(inst, False)``: built here otherwise).
        """
        if inst.state not in WATCHED:
            return True
        owner = owners.get(owner_of(inst)) if owners is not None else self.records.owner(inst)
        if live_owner(owner) is not None:
            return True  # an operation is in progress in another popek process
        return inst.state in (State.RUNNING, State.PAUSED) and inst.runtime is not None and \
            self.engine_for(inst).liveness(spec or self.spec_for(inst, False),
                                           inst.runtime).alive  # decided without images, ports

    def _settle(self, inst: Instance, rev: int, eng: Engine) -> str:
        spec = self.spec_for(inst, True)
        if inst.state == State.DELETING:
            if inst.runtime:
                self.kill(inst)
            self.purge(inst)
            return f"{inst.name}: finished an interrupted delete"
        if inst.runtime is None and not spec.workdir.exists():
            # a launch that made nothing yet, or whose roll-back removed its files but
            # could not drop the record (a full disk): nothing is left to start
            self.purge(inst)
            return f"{inst.name}: finished an interrupted launch"
        if inst.runtime is None:
            eng.cleanup(spec)
            self.records.finish(inst, rev, State.STOPPED, "start interrupted",
                                "the start was interrupted (popek exited before the guest "
                                "was ready)")
            return f"{inst.name}: interrupted start rolled back"
        live = eng.liveness(spec, inst.runtime)
        if live.alive:
            if inst.state in (State.STARTING, State.STOPPING):
                self.records.finish(inst, rev, State.RUNNING, f"{inst.state.value} interrupted")
                return f"{inst.name}: interrupted operation settled as running"
            self.records.release(inst)
            return ""
        reason = "stopped on request" if inst.state == State.STOPPING else live.reason
        eng.cleanup(spec)
        inst.runtime = None
        self.records.finish(inst, rev, State.STOPPED, "engine exited", reason)
        return f"{inst.name}: stopped ({reason})"
