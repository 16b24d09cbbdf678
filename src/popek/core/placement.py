"""Where an instance's vCPUs run: pinning to the host CPUs that carry the fewest instances.

An instance with fewer vCPUs than the host has CPUs is pinned to that many
host CPUs, those with the fewest instances already pinned to them (ties to
the lowest number).  A guest that spins all its vCPUs then competes only on
its own CPUs: without pinning, a CPU quota of N CPUs is spent on every CPU
of the host in turn, and each neighbour loses a share of its CPU for part of
every period.  An instance with as many vCPUs as the host has CPUs is not
pinned.  The choice is recorded with the runtime (``cpus``) and made again at
each start.
"""

from __future__ import annotations

import os
from collections.abc import Iterable


def host_cpus() -> list[int]:
    """The CPUs popek may use (its own affinity)."""
    return sorted(os.sched_getaffinity(0))


def choose(vcpus: int, busy: Iterable[Iterable[int]], cpus: list[int] | None = None
           ) -> tuple[int, ...]:
    """The CPUs to pin ``vcpus`` vCPUs to, given the CPU sets of running instances.

    Returns ``()`` (no pinning) when the instance needs every CPU.
    """
    cpus = host_cpus() if cpus is None else cpus
    if vcpus >= len(cpus):
        return ()
    load = dict.fromkeys(cpus, 0)
    for taken in busy:
        for c in set(taken):
            if c in load:
                load[c] += 1
    return tuple(sorted(sorted(cpus, key=lambda c: (load[c], c))[:vcpus]))


def cpu_list(cpus: Iterable[int]) -> str:
    """``(0, 2, 3)`` -> ``"0,2,3"`` (the form taskset and the OCI spec take)."""
    return ",".join(str(c) for c in cpus)
