"""Engines: one package per way of running an instance, behind one protocol."""

from __future__ import annotations

from popek.engines.base import (
    Capability,
    Engine,
    ExecResult,
    LaunchSpec,
    Liveness,
    RbdDisk,
    Runtime,
    require,
)
from popek.errors import InvalidInput

ENGINES = ("qemu", "container")


def get_engine(name: str) -> Engine:
    """Return the engine called ``name``; raise :class:`InvalidInput` for an unknown one."""
    if name == "qemu":
        from popek.engines.qemu import QemuEngine

        return QemuEngine()
    if name == "container":
        from popek.engines.container import ContainerEngine

        return ContainerEngine()
    raise InvalidInput(f"unknown engine {name!r}; available: {', '.join(ENGINES)}")


__all__ = ["ENGINES", "Capability", "Engine", "ExecResult", "LaunchSpec", "Liveness", "RbdDisk",
           "Runtime", "get_engine", "require"]
