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
from collections.abc import Iterator

from popek import paths, proc
from popek.core.guard import Guard
from popek.core.lifecycle import ACTIVE
from popek.core.model import Instance, parse_mount
from popek.core.netglue import InstanceNetworks, owner_name, split_network
from popek.core.records import Records


class Access:
    """The policy checks of starts, network attachments and host channels."""

    def __init__(self, guard: Guard, records: Records, nets: InstanceNetworks) -> None:
        """Decide with ``guard`` over the instances of ``records`` and their ports."""
        self.guard, self.records, self.nets = guard, records, nets

    def check_run(self, inst: Instance, networks: list[str]) -> None:
        """The checks of a start: run beside the others, host channels, networks."""
        label = inst.spec.label
        others = [i for i in self.records.all(None) if i.name != inst.name]  # read once
        running = [i.spec.label for i in others if i.state in ACTIVE]
        self.guard.check(label, "run", "host", running=running)
        for m in inst.spec.mounts:
            self.guard.check(label, "channel", f"host-mount:{parse_mount(m)[0]}")
        for net in networks:
            self.check_network(label, split_network(net)[0], inst, others)

    def check_network(self, label: str, network: str, inst: Instance | None = None,
                      others: list[Instance] | None = None) -> None:
        """May ``label`` join ``network`` beside the labels whose ports are on it."""
        me = owner_name(inst) if inst else ""
        owners = {p.instance for p in self.nets.all_ports()
                  if p.network == network and p.instance != me}
        candidates = self.records.all(None) if others is None else others
        sharers = [i.spec.label for i in candidates if owner_name(i) in owners]
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
