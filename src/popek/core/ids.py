"""Host id allocation: each instance gets host uids (and gids) of its own.

A VM's engine process runs as one unprivileged uid from :data:`VMM_UID_BASE`
on; a container gets a whole user namespace range of 65536 ids from
:data:`CONTAINER_UID_BASE` on.  A range is reserved by a key under
``/popek/uids/`` written in the same transaction as the instance record
(see :mod:`popek.core.records`), so two launches never share ids.
"""

from __future__ import annotations

from popek.errors import PopekError
from popek.state.schema import UID_PREFIX
from popek.state.store import StateStore

#: unprivileged uids (and gids) given to engine processes, one per instance
VMM_UID_BASE = 900_000_000
VMM_UID_COUNT = 65536
#: containers: one range of 65536 ids (a user namespace) each, from here up
CONTAINER_UID_BASE = 1_000_000_000
CONTAINER_RANGES = 40_000


def free_uid(store: StateStore, id_range: int) -> int:
    """Return the first id of a free range of ``id_range`` host uids.

    VMs (one id) come from :data:`VMM_UID_BASE`; containers (a 65536-id user
    namespace range each) from :data:`CONTAINER_UID_BASE`.  The caller
    reserves it with a compare-and-swap on its key; a lost race retries.
    """
    used = {int(kv.key[len(UID_PREFIX):]) for kv in store.range(UID_PREFIX)}
    base, count = ((VMM_UID_BASE, VMM_UID_COUNT) if id_range == 1
                   else (CONTAINER_UID_BASE, CONTAINER_RANGES))
    for i in range(count):
        uid = base + i * id_range
        if uid not in used:
            return uid
    raise PopekError(f"no free range of {id_range} host uids left; delete unused instances")
