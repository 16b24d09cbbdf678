"""The records of storage pools and volumes, as the state store keeps them.

A pool is where volumes are cut from (driver ``dir``: files in a directory);
a volume belongs to one pool and one project and looks to an instance like
one plain disk (``block``) or one filesystem (``filesystem``).  Each record
carries a ``state``: ``ready``, or the intent of an operation under way
(``creating``, ``resizing``, ``deleting``) with the ``owner`` process carrying
it out, which :meth:`popek.storage.service.Storage.reconcile` settles when
that process died.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

#: the drivers popek has (``dir``: files in a directory; ``ceph``: RBD images in a Ceph pool)
DRIVERS = ("dir", "ceph")
#: what a volume looks like to an instance
VOLUME_TYPES = ("block", "filesystem")
#: the pool every host has from the first use, under ``POPEK_HOME``
DEFAULT_POOL = "local"
READY = "ready"
#: the states of a record whose operation is under way
INTENTS = ("creating", "resizing", "deleting", "snapshotting", "restoring",
           "deleting-snapshot", "attaching", "detaching")
#: the intents of plugging a volume in and out (their holder's record decides them)
ATTACHMENT_INTENTS = ("attaching", "detaching")

#: the config key that lets several instances hold a volume at once (``true``/``false``)
SHARED = "security.shared"

POOLS_PREFIX = "/popek/storage/pools/"
VOLUMES_PREFIX = "/popek/storage/volumes/"


def pool_key(name: str) -> str:
    """The store key of pool ``name``."""
    return f"{POOLS_PREFIX}{name}"


def volumes_prefix(pool: str, project: str | None = None) -> str:
    """The prefix of the volumes of ``pool`` (of one ``project``)."""
    return f"{VOLUMES_PREFIX}{pool}/" + (f"{project}/" if project else "")


def volume_key(pool: str, project: str, name: str) -> str:
    """The store key of volume ``name`` of ``project`` in ``pool``."""
    return f"{volumes_prefix(pool, project)}{name}"


@dataclass
class Pool:
    """A storage pool: its driver and the driver's settings (``path`` for ``dir``)."""

    name: str
    driver: str
    config: dict[str, str]
    created: str
    state: str = READY
    owner: str = ""

    def to_json(self) -> bytes:
        """The record as stored."""
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Pool:
        """Read a stored record."""
        d: dict[str, Any] = json.loads(data)
        return cls(str(d["name"]), str(d["driver"]), dict(d.get("config") or {}),
                   str(d.get("created", "")), str(d.get("state", READY)),
                   str(d.get("owner", "")))


@dataclass
class Volume:
    """A volume: ``size`` bytes (what the instance sees), its type, who holds it."""

    pool: str
    project: str
    name: str
    size: int
    type: str
    created: str
    state: str = READY
    owner: str = ""
    #: the instance it is attached to (``PROJECT/NAME``); empty: none.  A shared volume
    #: held by several instances names the first here, the others in ``shared_with``
    attached: str = ""
    config: dict[str, str] = field(default_factory=dict)
    #: its snapshots, oldest first: ``{"name": ..., "created": ...}``
    snapshots: list[dict[str, str]] = field(default_factory=list)
    #: the snapshot a clone was made from (``PROJECT/VOLUME@SNAPSHOT``); empty: none
    origin: str = ""
    #: the snapshot an operation under way is about (``snapshotting``, ``restoring``...)
    pending: str = ""
    #: the instances beside ``attached`` that hold it (a shared volume only), in the order
    #: they attached it
    shared_with: list[str] = field(default_factory=list)
    #: the store revision this copy was read at (not stored): a change of the record
    #: compares against it, so nothing written since the read is overwritten
    revision: int = field(default=0, compare=False, repr=False)

    def to_json(self) -> bytes:
        """The record as stored (without the revision it was read at)."""
        d = asdict(self)
        d.pop("revision")
        return json.dumps(d, sort_keys=True).encode()

    def holders(self) -> list[str]:
        """Every instance that holds it (``PROJECT/NAME``), the first first."""
        return [self.attached, *self.shared_with] if self.attached else list(self.shared_with)

    def shared(self) -> bool:
        """Whether it is marked shared (``security.shared=true``): several instances may
        hold it at once."""
        return self.config.get(SHARED) == "true"

    def snapshot_names(self) -> list[str]:
        """The names of its snapshots, oldest first."""
        return [s["name"] for s in self.snapshots]

    @classmethod
    def from_json(cls, data: bytes) -> Volume:
        """Read a stored record."""
        d: dict[str, Any] = json.loads(data)
        return cls(str(d["pool"]), str(d["project"]), str(d["name"]), int(d["size"]),
                   str(d.get("type", "block")), str(d.get("created", "")),
                   str(d.get("state", READY)), str(d.get("owner", "")),
                   str(d.get("attached", "")), dict(d.get("config") or {}),
                   [dict(x) for x in d.get("snapshots") or []], str(d.get("origin", "")),
                   str(d.get("pending", "")), [str(x) for x in d.get("shared_with") or []])
