"""The Engine protocol: what every engine (QEMU, OCI runtime, bubblewrap) offers.

Callers never branch on the engine type.  They call the protocol, and ask
:meth:`Engine.require` for optional capabilities, which raises a clear
:class:`popek.errors.CapabilityError` when an engine lacks one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Protocol

from popek.errors import CapabilityError


class Capability(StrEnum):
    """Optional abilities an engine may declare."""

    PAUSE = "pause"
    CONSOLE = "console"
    EXEC = "exec"
    GRACEFUL_STOP = "graceful-stop"
    SNAPSHOT = "snapshot"
    RESTORE = "restore"
    MIGRATE = "migrate"
    RESIZE = "resize"
    STATS = "stats"


@dataclass(frozen=True)
class LaunchSpec:
    """Everything an engine needs to run one instance.

    ``kernel``/``initrd``/``cmdline`` come from the (verified) image; the rest
    from the user's request, already validated by ``core``.
    """

    name: str
    workdir: Path
    vcpus: int
    memory: int
    uid: int
    gid: int
    kernel: Path
    initrd: Path
    cmdline: str
    accel: str = "auto"


@dataclass
class Runtime:
    """What an engine reports about a started instance (kept in the store)."""

    pid: int
    start_time: int
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Liveness:
    """Whether the engine process of an instance is alive, and if not, why."""

    alive: bool
    reason: str = ""


@dataclass(frozen=True)
class ExecResult:
    """The outcome of a command run inside an instance."""

    exit_code: int
    stdout: bytes
    stderr: bytes


class Engine(Protocol):
    """The interface every engine implements."""

    name: ClassVar[str]
    capabilities: ClassVar[frozenset[Capability]]

    def preflight(self, accel: str) -> None:
        """Check the engine can run here (binary present, accelerator usable)."""
        ...

    def start(self, spec: LaunchSpec, ready_timeout: float) -> Runtime:
        """Start the instance detached from the caller and wait until it is ready."""
        ...

    def stop(self, spec: LaunchSpec, runtime: Runtime, force: bool, timeout: float) -> str:
        """Stop the instance (gracefully first unless ``force``); return how it stopped."""
        ...

    def pause(self, spec: LaunchSpec, runtime: Runtime) -> None:
        """Freeze the instance: its vCPUs (or processes) stop running."""
        ...

    def resume(self, spec: LaunchSpec, runtime: Runtime) -> None:
        """Unfreeze a paused instance."""
        ...

    def liveness(self, spec: LaunchSpec, runtime: Runtime) -> Liveness:
        """Tell whether the engine process runs, and the reason when it does not."""
        ...

    def status(self, spec: LaunchSpec, runtime: Runtime) -> dict[str, Any]:
        """Return live details from the engine (run state, accel, ...)."""
        ...

    def exec(self, spec: LaunchSpec, argv: list[str], stdin: bytes, timeout: float) -> ExecResult:
        """Run ``argv`` inside the instance and return its exit code and output."""
        ...

    def console(self, spec: LaunchSpec, escape: bytes) -> None:
        """Attach the caller's terminal to the instance console until ``escape``."""
        ...

    def console_log(self, spec: LaunchSpec) -> bytes:
        """Return what the instance wrote on its console since it last started."""
        ...

    def cleanup(self, spec: LaunchSpec) -> None:
        """Remove runtime leftovers (stray processes, sockets, pid files) of a stopped instance."""
        ...


def require(engine: Engine, capability: Capability) -> None:
    """Raise :class:`CapabilityError` when ``engine`` lacks ``capability``."""
    if capability not in engine.capabilities:
        raise CapabilityError(
            f"the {engine.name} engine cannot {capability.value}; "
            f"it supports: {', '.join(sorted(c.value for c in engine.capabilities))}"
        )
