"""Access control decisions of instance operations.

Before an instance starts, joins a network or shares a host directory, the
policy decides (:class:`popek.core.guard.Guard` audits every decision):
may its label run beside the labels already running, use that host
channel, share that network with the labels already on it.  Decisions are
made one at a time on a host (:func:`decision_lock`), and a launch holds the
lock until its record is written, so two instances whose labels conflict
never both pass however their commands interleave.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from popek import paths, proc
from popek.core.guard import Guard
from popek.core.model import Instance, parse_mount
from popek.core.netglue import InstanceNetworks, owner_name, split_network
from popek.core.records import Records
from popek.errors import NotFound
from popek.trust.policy import PolicyDenied


class Access:
    """The policy checks of starts, network attachments and host channels."""

    def __init__(self, guard: Guard, records: Records, nets: InstanceNetworks) -> None:
        """Decide with ``guard`` over the instances of ``records`` and their ports."""
        self.guard, self.records, self.nets = guard, records, nets

    def check_run(self, inst: Instance, networks: list[str],
                  settle: Callable[[list[str]], object] | None = None) -> None:
        """The checks of a start: run beside the others, host channels, networks.

        The labels running are read from the active index, and only when the
        policy has a conflict set for the label (most launches never read
        it).  When the policy denies and ``settle`` is given, the other active
        instances are reconciled (one may have died since its record was
        written) and the decision is made once more on what is left.
        """
        try:
            self._check_run(inst, networks)
            return
        except PolicyDenied:
            if settle is None:
                raise
            others = [a.name for a in self.records.active() if a.name != inst.name]
            if not settle(others):
                raise
            self._check_run(inst, networks)

    def _check_run(self, inst: Instance, networks: list[str]) -> None:
        label = inst.spec.label
        self.guard.check(label, "run", "host", running=self._running(inst.name))
        for m in inst.spec.mounts:
            self.guard.check(label, "channel", f"host-mount:{parse_mount(m)[0]}")
        for net in networks:
            self.check_network(label, split_network(net)[0], inst)

    def _running(self, but: str) -> Iterator[str]:
        """The labels of the active instances but ``but``, read when first asked for."""
        for a in self.records.active():
            if a.name != but:
                yield a.label

    def check_network(self, label: str, network: str, inst: Instance | None = None) -> None:
        """May ``label`` join ``network`` beside the labels whose ports are on it."""
        me = owner_name(inst) if inst else ""
        owners = sorted({p.instance for p in self.nets.all_ports()
                         if p.network == network and p.instance != me})
        sharers = []
        for owner in owners:
            project, _, name = owner.partition("/")
            with contextlib.suppress(NotFound):
                sharers.append(self.records.load(name, project)[0].spec.label)
        self.guard.check(label, "network", network, sharers=sharers)


@contextlib.contextmanager
def decision_lock() -> Iterator[None]:
    """One access control decision at a time on this host (for launch and start).

    A launch holds it from its check until its record (state starting) is
    written; a start writes its intent first.  So two instances whose labels
    conflict can never both pass the check, however their commands interleave.
    """
    path = paths.home() / ".decisions.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with proc.flocked(path):
        yield
