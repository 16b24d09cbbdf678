"""Shared volumes: the rules of a volume several instances hold at once (pure).

A volume is held by one instance at a time unless its config says
``security.shared=true``.  Only a filesystem volume may be marked so: the
kernel mounts one ext4 superblock for every container that holds it (they
share one loop device: see :mod:`popek.engines.container.volumes`), so their
writes meet in one cache and one journal.  A block volume may not: a qcow2
file opened read-write by two QEMUs has its metadata (refcounts, L2 tables)
rewritten by both, which corrupts it (QEMU's image locking refuses the second
open for that reason); an RBD image could be opened by two QEMUs without the
exclusive lock, but popek does not plug Ceph disks that way yet.

The record keeps the first holder in ``attached`` (every check of "is it
attached" reads that) and the others in ``shared_with``; when the first one
lets go, the next takes its place.  These functions decide, the service
stores.
"""

from __future__ import annotations

from dataclasses import replace

from popek.errors import InvalidInput, StateError
from popek.storage.model import SHARED, Volume

#: the values ``security.shared`` takes
VALUES = ("true", "false")


def parse(value: str) -> bool:
    """``security.shared``'s ``value`` as a bool; InvalidInput for any other word."""
    word = value.strip().lower()
    if word not in VALUES:
        raise InvalidInput(f"invalid {SHARED} {value!r}: allowed: {', '.join(VALUES)}")
    return word == "true"


def check_mark(vol: Volume, shared: bool, driver: str) -> None:
    """Raise unless ``vol`` (in a pool of ``driver``) may be marked ``shared`` (or
    unmarked): a block volume is never shared (why, and what is), and a volume held by
    several instances is not unmarked (they are named)."""
    if shared and vol.type == "block":
        why = ("an RBD image is plugged into one VM at a time for now (shared RBD disks are "
               "to come)" if driver == "ceph" else
               "a qcow2 file written by two QEMUs at once has its metadata corrupted, and "
               "QEMU's image lock refuses the second")
        raise InvalidInput(f"cannot mark block volume {vol.name} shared: {why}; only "
                           "filesystem volumes (dir pools) can be shared, by containers")
    if not shared and len(vol.holders()) > 1:
        raise StateError(f"volume {vol.pool}/{vol.name}", f"set {SHARED}=false",
                         f"held by {', '.join(vol.holders())}", ("held by one instance",),
                         "detach it from all but one first")


def holder_text(vol: Volume) -> str:
    """Who holds ``vol``, for a message: ``a`` or ``a, b``."""
    return ", ".join(vol.holders())


def with_holder(vol: Volume, holder: str) -> Volume:
    """``vol`` held by ``holder`` too; StateError when it is held by another and not
    shared (naming the holder and how to share it)."""
    if holder in vol.holders():
        return replace(vol)
    if not vol.attached:
        return replace(vol, attached=holder)
    if not vol.shared():
        raise StateError(f"volume {vol.pool}/{vol.name}", "attach",
                         f"attached to {holder_text(vol)}", ("detached",),
                         "a volume is attached to one instance at a time unless marked "
                         f"shared (popek storage volume set {vol.pool} {vol.name} "
                         f"{SHARED}=true: filesystem volumes only)")
    return replace(vol, shared_with=[*vol.shared_with, holder])


def without_holder(vol: Volume, holder: str) -> Volume:
    """``vol`` no longer held by ``holder`` (the next holder, if any, becomes the first);
    unchanged when ``holder`` does not hold it."""
    if holder not in vol.holders():
        return replace(vol)
    rest = [h for h in vol.holders() if h != holder]
    return replace(vol, attached=rest[0] if rest else "", shared_with=rest[1:])


def subject(vol: Volume) -> str:
    """The holder an ``attaching``/``detaching`` intent is about: the one it names
    (``pending``), else the first holder (records written before shared volumes)."""
    return vol.pending or vol.attached
