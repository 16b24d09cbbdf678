"""The Engine protocol: what every engine (QEMU, OCI runtime, bubblewrap) offers.

Callers never branch on the engine type.  They call the protocol, and ask
:meth:`Engine.require` for optional capabilities, which raises a clear
:class:`popek.errors.CapabilityError` when an engine lacks one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from popek.errors import CapabilityError

if TYPE_CHECKING:
    from popek.engines.session import Channel
    from popek.images import Image
    from popek.iolimits import IoLimits
    from popek.network.model import Network, Port


class Capability(StrEnum):
    """Optional abilities an engine may declare.

    Only abilities some engine implements are listed (a unit test holds
    this): snapshots and migration arrive with the engines' methods for them.
    ``STATS``: :meth:`Engine.status` reports resource usage against the limits.
    """

    PAUSE = "pause"
    CONSOLE = "console"
    EXEC = "exec"
    EXEC_STREAM = "exec-stream"
    HOST_MOUNTS = "share host directories"
    NETWORK_HOTPLUG = "attach or detach networks while running"
    GRACEFUL_STOP = "graceful-stop"
    RESIZE = "resize"
    STATS = "stats"
    DISK_LIMIT = "a bounded writable layer (limits.disk)"
    DISK_HOTPLUG = "attach, detach or grow volumes while running"
    IO_LIMIT = "disk I/O limits (limits.disk.read_bps and the others)"


@dataclass(frozen=True)
class LaunchSpec:
    """Everything an engine needs to run one instance.

    ``image`` is the (verified) image, ``None`` when it was deleted since the
    instance started (stop and delete still work then).  ``uid``/``gid`` is
    the first host id of the instance's range of ``Engine.id_range`` ids.
    The rest comes from the user's request, already validated by ``core``.
    """

    name: str
    workdir: Path
    vcpus: int
    memory: int
    uid: int
    gid: int
    image: Image | None
    cmdline: str = ""
    accel: str = "auto"
    runtime: str = "auto"
    project: str = "default"
    limits: Mapping[str, int] = field(default_factory=dict)
    #: host directories shared into the instance: (source, destination, read-only)
    mounts: tuple[tuple[str, str, bool], ...] = ()
    #: the instance's network ports (devices already created on the host by popek.network)
    ports: tuple[Port, ...] = ()
    #: the networks those ports are on, by name
    networks: Mapping[str, Network] = field(default_factory=dict)
    #: called by ``start`` with the engine binary and its effective configuration
    #: (QEMU argv, OCI config.json) just before it runs them: the launch measurement,
    #: returned as hex (a VM hands it to its guest's virtual TPM)
    measure: Callable[[str, bytes], str] | None = None
    #: host CPUs the instance is pinned to (empty: all of them); see core.placement
    cpus: tuple[int, ...] = ()
    #: block volumes attached at start: (volume name, its files, its own first, then each
    #: backing file); the engine opens them and hands the VMM descriptors, never paths
    disks: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: filesystem volumes mounted at start (containers): (``POOL/NAME``, its file, the
    #: path it is mounted at in the instance)
    fs_volumes: tuple[tuple[str, str, str], ...] = ()
    #: the I/O limits of each of ``disks`` (a VM) or ``fs_volumes`` (a container), in the
    #: same order (empty: none on any); the instance's own are in ``limits``
    #: (``disk.write_bps``...): all of a VM's disks share them, a container has them on
    #: its writable layer and on each volume without limits of its own
    disk_limits: tuple[IoLimits, ...] = ()
    #: Ceph RBD volumes attached at start, after ``disks``: QEMU's rbd driver opens them
    rbd_disks: tuple[RbdDisk, ...] = ()
    #: the key of each of ``disks`` (same order; empty: a plain volume, and no entry at
    #: all: none is encrypted), handed to the VMM through a FIFO, never on its command line
    disk_keys: tuple[str, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class RbdDisk:
    """A volume that is an RBD image of a Ceph cluster, which QEMU opens itself.

    ``servers`` are the monitors (host, port); ``key`` is the client's secret, which
    the engine hands QEMU through a pipe read once (never on a command line, never
    in a file): it is left out of the repr.  ``luks``: the volume's own key when it is
    encrypted (QEMU's LUKS over the image), handed over the same way; empty: a plain volume.
    """

    name: str
    pool: str
    image: str
    user: str
    servers: tuple[tuple[str, str], ...]
    key: str = field(repr=False)
    luks: str = field(default="", repr=False)


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
    #: how many consecutive host uids (and gids) one instance needs
    id_range: ClassVar[int]
    #: the host device a network port of this engine is: "tap" or "veth"
    port_kind: ClassVar[str]
    #: the volumes it takes: "block" (a VM's disks) or "filesystem" (mounted in it)
    volume_kind: ClassVar[str]

    def preflight(self, spec: LaunchSpec) -> None:
        """Check the engine can run ``spec`` here (binary, accelerator, image contents)."""
        ...

    def create(self, spec: LaunchSpec) -> None:
        """Prepare the instance directory once, at launch (e.g. extract a root filesystem)."""
        ...

    def start(self, spec: LaunchSpec, ready_timeout: float) -> Runtime:
        """Start the instance detached from the caller and wait until it is ready.

        Every engine verifies the image files it reads against the manifest
        before (or, streaming, while) it uses them, and refuses on a mismatch.
        """
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

    def exec_stream(self, spec: LaunchSpec, argv: list[str], tty: bool) -> int:
        """Run ``argv`` on the caller's own stdio (a terminal if ``tty``); return its exit code.

        Only engines with :attr:`Capability.EXEC_STREAM`.
        """
        ...

    def resize(self, spec: LaunchSpec, runtime: Runtime) -> None:
        """Apply ``spec``'s CPU, memory and pids limits to the running instance.

        Only engines with :attr:`Capability.RESIZE`.
        """
        ...

    def resize_disk(self, spec: LaunchSpec, runtime: Runtime | None) -> None:
        """Bring the writable layer to ``spec.limits["disk"]``, running (``runtime``) or
        stopped (``None``); refuse what the layer cannot do in that state.

        Only engines with :attr:`Capability.DISK_LIMIT`.
        """
        ...

    def set_io_limits(self, spec: LaunchSpec, runtime: Runtime) -> None:
        """Apply ``spec``'s disk I/O limits (the instance's, and each volume's in
        ``disk_limits``) to the running instance at once.

        Only engines with :attr:`Capability.IO_LIMIT`.
        """
        ...

    def attach_port(self, spec: LaunchSpec, runtime: Runtime, port: Port) -> None:
        """Plug ``port`` into the running instance (Capability.NETWORK_HOTPLUG)."""
        ...

    def detach_port(self, spec: LaunchSpec, runtime: Runtime, port: Port) -> None:
        """Unplug ``port`` from the running instance (Capability.NETWORK_HOTPLUG)."""
        ...

    def attach_disk(self, spec: LaunchSpec, runtime: Runtime, ref: str, files: list[str],
                    path: str = "", key: str = "") -> None:
        """Plug volume ``ref`` (its ``files``: its own first) into the running instance
        (a VM's disk; a container's filesystem mounted at ``path``) (``DISK_HOTPLUG``);
        ``key``: the volume is encrypted with it."""
        ...

    def detach_disk(self, spec: LaunchSpec, runtime: Runtime, ref: str) -> None:
        """Unplug volume ``ref`` from the running instance (``DISK_HOTPLUG``)."""
        ...

    def grow_disk(self, spec: LaunchSpec, runtime: Runtime, ref: str, size: int) -> None:
        """Grow volume ``ref`` to ``size`` bytes under the running instance
        (``DISK_HOTPLUG``)."""
        ...

    def quiesce_disk(self, spec: LaunchSpec, runtime: Runtime,
                     ref: str) -> AbstractContextManager[None]:
        """Volume ``ref`` of the running instance held still (flushed, no new writes) for
        the time of a ``with`` block, so that its file can be copied consistently; an
        EngineError where the engine cannot (a VM's disk)."""
        ...

    def console(self, spec: LaunchSpec, escape: bytes) -> None:
        """Attach the caller's terminal to the instance console until ``escape``."""
        ...

    def open_console(self, spec: LaunchSpec, size: tuple[int, int]) -> Channel:
        """The console as descriptors a front end relays (:mod:`popek.engines.session`);
        ``size``: the terminal's rows and columns where the console has a window."""
        ...

    def open_exec(self, spec: LaunchSpec, argv: list[str], tty: bool,
                  size: tuple[int, int]) -> Channel:
        """Start ``argv`` for a front end to relay (a terminal of ``size`` if ``tty`` and
        the engine has one); closing the channel gives the exit code.  Only engines
        with :attr:`Capability.EXEC_STREAM`."""
        ...

    def console_log(self, spec: LaunchSpec) -> bytes:
        """Return what the instance wrote on its console since it last started."""
        ...

    def cleanup(self, spec: LaunchSpec) -> None:
        """Remove runtime leftovers (stray processes, sockets, pid files) of a stopped instance."""
        ...

    def destroy(self, spec: LaunchSpec) -> None:
        """Remove what :meth:`create` made (on delete, after :meth:`cleanup`)."""
        ...


def require(engine: Engine, capability: Capability) -> None:
    """Raise :class:`CapabilityError` when ``engine`` lacks ``capability``."""
    if capability not in engine.capabilities:
        raise CapabilityError(
            f"the {engine.name} engine cannot {capability.value}; "
            f"it supports: {', '.join(sorted(c.value for c in engine.capabilities))}"
        )
