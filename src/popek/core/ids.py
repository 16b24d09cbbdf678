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

from collections.abc import Callable

from popek.errors import PopekError
from popek.state.schema import UID_NEXT_PREFIX, UID_PREFIX
from popek.state.store import Put, StateStore

#: unprivileged uids (and gids) given to engine processes, one per instance
VMM_UID_BASE = 900_000_000
VMM_UID_COUNT = 65536
#: containers: one range of 65536 ids (a user namespace) each, from here up
CONTAINER_UID_BASE = 1_000_000_000
CONTAINER_RANGES = 40_000


def free_uid(store: StateStore, id_range: int,
             taken: Callable[[int, int], bool] = lambda _first, _size: False) -> int:
    """Return the first id of a free range of ``id_range`` host uids.

    VMs (one id) come from :data:`VMM_UID_BASE`; containers (a 65536-id user
    namespace range each) from :data:`CONTAINER_UID_BASE`.  The search starts
    at the slot after the last one handed out (``/popek/uid-next/SIZE``) and
    goes round: a range this home's store holds, or one that ``taken`` says
    another home holds (:meth:`popek.state.hostwide.HostIds.taken`), is
    skipped.  So a launch reads one or two keys however many instances there
    are, and a freed range is not handed out again at once (files its old
    owner left are not given to the next instance straight away).  The caller
    reserves it with a compare-and-swap on its key and then host-wide; a lost
    race retries.
    """
    base, count = _slots(id_range)
    hint = store.get(UID_NEXT_PREFIX + str(id_range))
    start = int(hint.value) % count if hint else 0
    for step in range(count):
        uid = base + (start + step) % count * id_range
        if store.get(UID_PREFIX + str(uid)) is None and not taken(uid, id_range):
            return uid
    raise PopekError(f"no free range of {id_range} host uids left; delete unused instances")


def next_uid_op(uid: int, id_range: int) -> Put:
    """The write that makes the next search for ``id_range`` ids start after ``uid``."""
    base, _count = _slots(id_range)
    return Put(UID_NEXT_PREFIX + str(id_range), str((uid - base) // id_range + 1).encode())


def _slots(id_range: int) -> tuple[int, int]:
    return ((VMM_UID_BASE, VMM_UID_COUNT) if id_range == 1
            else (CONTAINER_UID_BASE, CONTAINER_RANGES))


def size_of(uid: int) -> int:
    """How many host ids the range that starts at ``uid`` holds (1 for a VM's)."""
    return 1 if uid < CONTAINER_UID_BASE else 65536


def held(store: StateStore) -> dict[int, tuple[int, str]]:
    """The ranges this home's store holds: ``{first: (size, instance key)}``."""
    return {int(kv.key[len(UID_PREFIX):]): (size_of(int(kv.key[len(UID_PREFIX):])),
                                            kv.value.decode())
            for kv in store.range(UID_PREFIX)}
