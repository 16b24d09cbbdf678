"""Host id allocation: each instance gets host uids (and gids) of its own.

A VM's engine process runs as one unprivileged uid from :data:`VMM_UID_BASE`
on; a container gets a whole user namespace range of 65536 ids from
:data:`CONTAINER_UID_BASE` on.  A range is reserved by a key under
``/popek/uids/`` written in the same transaction as the instance record
(see :mod:`popek.core.records`), so two launches never share ids, and in
the host-wide registry of :mod:`popek.state.hostwide`, so two homes on one host
never do either.
"""

from __future__ import annotations

from collections.abc import Iterable

from popek.errors import PopekError
from popek.state.hostwide import Range
from popek.state.schema import UID_PREFIX
from popek.state.store import StateStore

#: unprivileged uids (and gids) given to engine processes, one per instance
VMM_UID_BASE = 900_000_000
VMM_UID_COUNT = 65536
#: containers: one range of 65536 ids (a user namespace) each, from here up
CONTAINER_UID_BASE = 1_000_000_000
CONTAINER_RANGES = 40_000


def free_uid(store: StateStore, id_range: int, elsewhere: Iterable[Range] = ()) -> int:
    """Return the first id of a free range of ``id_range`` host uids.

    VMs (one id) come from :data:`VMM_UID_BASE`; containers (a 65536-id user
    namespace range each) from :data:`CONTAINER_UID_BASE`.  A range this
    home's store holds, or one that ``elsewhere`` (the ranges of the host's
    other homes, :class:`popek.state.hostwide.HostIds`) overlaps, is skipped.
    The caller reserves it with a compare-and-swap on its key and then
    host-wide; a lost race retries.
    """
    used = {int(kv.key[len(UID_PREFIX):]) for kv in store.range(UID_PREFIX)}
    others = list(elsewhere)
    base, count = ((VMM_UID_BASE, VMM_UID_COUNT) if id_range == 1
                   else (CONTAINER_UID_BASE, CONTAINER_RANGES))
    for i in range(count):
        uid = base + i * id_range
        if uid not in used and not any(r.overlaps(uid, id_range) for r in others):
            return uid
    raise PopekError(f"no free range of {id_range} host uids left; delete unused instances")


def size_of(uid: int) -> int:
    """How many host ids the range that starts at ``uid`` holds (1 for a VM's)."""
    return 1 if uid < CONTAINER_UID_BASE else 65536


def held(store: StateStore) -> dict[int, tuple[int, str]]:
    """The ranges this home's store holds: ``{first: (size, instance key)}``."""
    return {int(kv.key[len(UID_PREFIX):]): (size_of(int(kv.key[len(UID_PREFIX):])),
                                            kv.value.decode())
            for kv in store.range(UID_PREFIX)}
