"""The instance record kept in the state store, and validation of user input."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from popek.core.lifecycle import State
from popek.engines.base import Runtime
from popek.errors import InvalidInput, StoreError
from popek.names import (
    DEFAULT_LABEL,
    DEFAULT_PROJECT,
    LABEL_RULE,
    NAME_RULE,
    check_label,
    validate_name,
)
from popek.state.schema import instance_key, instances_prefix

MIN_MEMORY = 64 << 20
__all__ = ["DEFAULT_LABEL", "DEFAULT_PROJECT", "LABEL_RULE", "MIN_MEMORY", "NAME_RULE",
           "Instance", "InstanceSpec", "check_label", "instance_key", "instances_prefix",
           "parse_mount", "validate_name"]


@dataclass
class InstanceSpec:
    """What the user asked for: image, engine and resources."""

    image: str
    engine: str = "qemu"
    vcpus: int = 1
    memory: int = 512 << 20
    accel: str = "auto"
    runtime: str = "auto"
    limits: dict[str, int] = field(default_factory=dict)
    mounts: list[str] = field(default_factory=list)
    label: str = DEFAULT_LABEL
    #: the profiles it was launched with, in order (core.profiles: their values are copied)
    profiles: list[str] = field(default_factory=list)
    #: started by ``popek admin boot`` at the host's boot (config key ``boot.autostart``)
    autostart: bool = False
    #: block volumes attached to it, ``POOL/VOLUME`` of its project (VMs: virtio disks)
    volumes: list[str] = field(default_factory=list)
    #: where each filesystem volume is mounted in a container (``POOL/VOLUME`` -> path)
    volume_paths: dict[str, str] = field(default_factory=dict)


@dataclass
class Instance:
    """One instance as recorded in the state store."""

    name: str
    spec: InstanceSpec
    state: State
    uid: int
    created: str
    project: str = DEFAULT_PROJECT
    reason: str = ""
    image_version: str = ""
    runtime: Runtime | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    @property
    def key(self) -> str:
        """The store key of this instance."""
        return instance_key(self.project, self.name)

    def to_json(self) -> bytes:
        """Serialise for the store."""
        d = asdict(self)
        d["state"] = self.state.value
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Instance:
        """Read a record written by :meth:`to_json`; raise :class:`StoreError` when broken."""
        try:
            d: dict[str, Any] = json.loads(data)
            d["spec"] = InstanceSpec(**d["spec"])
            d["state"] = State(d["state"])
            d["runtime"] = Runtime(**d["runtime"]) if d.get("runtime") else None
            return cls(**d)
        except (ValueError, TypeError, KeyError) as exc:
            raise StoreError(f"broken instance record in the state store: {exc}") from exc


FORBIDDEN_MOUNT_SOURCES = ("/proc", "/sys", "/dev", "/boot", "/etc", "/root", "/run", "/var/lib")


def parse_mount(text: str) -> tuple[str, str, bool]:
    """Parse ``SRC:DST[:ro]`` (a host directory shared into a container).

    Raises :class:`InvalidInput` unless SRC is an existing absolute directory
    outside the host's system trees and DST an absolute path.
    """
    import os

    parts = text.split(":")
    ro = len(parts) == 3 and parts[2] == "ro"
    if len(parts) not in (2, 3) or (len(parts) == 3 and not ro):
        raise InvalidInput(f"invalid mount {text!r}: use SRC:DST or SRC:DST:ro")
    src, dst = os.path.normpath(parts[0]), os.path.normpath(parts[1])
    if not os.path.isabs(parts[0]) or not os.path.isabs(parts[1]):
        raise InvalidInput(f"invalid mount {text!r}: SRC and DST must be absolute paths")
    real = os.path.realpath(src)
    if not os.path.isdir(real):
        raise InvalidInput(f"invalid mount {text!r}: {src} is not an existing directory")
    if real == "/" or any(real == f or real.startswith(f + "/") for f in FORBIDDEN_MOUNT_SOURCES):
        raise InvalidInput(f"invalid mount {text!r}: sharing {real} is not allowed; share a "
                           f"directory outside / itself and {', '.join(FORBIDDEN_MOUNT_SOURCES)}")
    if dst == "/":
        raise InvalidInput(f"invalid mount {text!r}: DST cannot be /")
    return real, dst, ro
