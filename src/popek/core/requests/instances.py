"""Requests on instances: their lifecycle, configuration, networks and sessions."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from popek.core.service import NOT_AUDITED, Progress, Request, _noop

if TYPE_CHECKING:
    from popek.core.model import Instance
    from popek.core.service import Core
    from popek.engines import ExecResult
    from popek.engines.session import Channel
    from popek.network.model import Port


R = TypeVar("R")
#: a front end's relay of a session's channel (see :class:`Exec` and :class:`Console`)
Relay = Callable[["Channel"], None]


def _no_input() -> bytes:
    return b""


@dataclass(frozen=True)
class Launch(Request["Instance"]):
    """Create instance ``name`` from ``image`` and start it.

    Its settings, as incus applies them: the built-in defaults, then each profile of
    ``profiles`` in order, then the shorthands given (``vcpus``, ``memory``, ``label``,
    ``limits``; ``None``: not given), then ``config`` (``-c KEY=VALUE``), which wins
    (see :mod:`popek.core.profiles`).
    """

    op = "instance.launch"
    shown = ("image", "engine", "vcpus", "memory", "limits", "mounts", "networks", "label",
             "accel", "runtime", "profiles", "config", "volumes")
    image: str
    name: str
    vcpus: int | None = None
    memory: int | None = None
    accel: str = "auto"
    engine: str = "qemu"
    runtime: str = "auto"
    limits: dict[str, int] = field(default_factory=dict)
    mounts: tuple[str, ...] = ()
    networks: tuple[str, ...] = ()
    label: str | None = None
    ready_timeout: float = 180.0
    progress: Progress = field(default=_noop, metadata=NOT_AUDITED, compare=False)
    profiles: tuple[str, ...] = ()
    config: dict[str, str] = field(default_factory=dict)
    #: block volumes to attach, ``POOL/VOLUME`` of the project (``--disk POOL/VOLUME``)
    volumes: tuple[str, ...] = ()

    def reconciles(self) -> list[str]:
        """None up front: the launch decides on the active index, and reconciles the
        other active instances only when the policy denies (see core.access)."""
        return []

    def run(self, core: Core) -> Instance:
        """Launch it (see :meth:`popek.core.instances.Instances.launch`)."""
        from popek.core.profiles import for_launch

        profiles = tuple(dict.fromkeys(self.profiles))
        spec, networks = for_launch(
            core.store, self.engine, profiles,
            {"vcpus": self.vcpus, "memory": self.memory, "label": self.label,
             "limits": self.limits}, dict(self.config), self.networks, core.project)
        return core.instances.launch(
            self.image, self.name, vcpus=spec.vcpus, memory=spec.memory, accel=self.accel,
            engine=self.engine, runtime=self.runtime, limits=dict(spec.limits),
            mounts=list(self.mounts), networks=networks, ready_timeout=self.ready_timeout,
            progress=self.progress, label=spec.label, profiles=list(profiles),
            volumes=list(self.volumes))


@dataclass(frozen=True)
class _Named(Request[R]):
    """A request on one existing instance, reconciled first."""

    name: str

    def reconciles(self) -> list[str]:
        """The instance it names."""
        return [self.name]


@dataclass(frozen=True)
class Start(_Named["Instance"]):
    """Start a stopped instance and wait until its guest is ready."""

    op = "instance.start"
    ready_timeout: float = 180.0
    progress: Progress = field(default=_noop, metadata=NOT_AUDITED, compare=False)

    def run(self, core: Core) -> Instance:
        """Start it."""
        return core.instances.start(self.name, self.ready_timeout, self.progress)


@dataclass(frozen=True)
class Stop(_Named[str]):
    """Stop an instance: ACPI shutdown first, forced after ``timeout`` seconds."""

    op = "instance.stop"
    shown = ("force",)
    force: bool = False
    timeout: float = 30.0

    def run(self, core: Core) -> str:
        """Stop it; return ``graceful``, ``forced`` or ``already stopped`` (not an error)."""
        return core.instances.stop(self.name, self.force, self.timeout)


@dataclass(frozen=True)
class Restart(_Named["Instance"]):
    """Stop an instance (if it runs) and start it again."""

    op = "instance.restart"
    shown = ("force",)
    force: bool = False
    timeout: float = 30.0
    ready_timeout: float = 180.0
    progress: Progress = field(default=_noop, metadata=NOT_AUDITED, compare=False)

    def run(self, core: Core) -> Instance:
        """Restart it."""
        return core.instances.restart(self.name, self.force, self.timeout, self.ready_timeout,
                                      self.progress)


@dataclass(frozen=True)
class Pause(_Named[None]):
    """Freeze a running instance."""

    op = "instance.pause"

    def run(self, core: Core) -> None:
        """Pause it."""
        core.instances.pause(self.name)


@dataclass(frozen=True)
class Resume(_Named[None]):
    """Unfreeze a paused instance."""

    op = "instance.resume"

    def run(self, core: Core) -> None:
        """Resume it."""
        core.instances.resume(self.name)


@dataclass(frozen=True)
class Delete(_Named[None]):
    """Delete an instance and everything it left on the host."""

    op = "instance.delete"
    shown = ("force",)
    force: bool = False

    def run(self, core: Core) -> None:
        """Delete it (``force``: stop it first)."""
        core.instances.delete(self.name, self.force)


@dataclass(frozen=True)
class ConfigSet(_Named["Instance"]):
    """Change settings of an instance, all or none (see :mod:`popek.core.config`).

    ``values`` (``config set NAME K=V K2=V2``) or, for one key, ``key`` and ``value``.
    """

    op = "config.set"
    shown = ("key", "value", "values")
    key: str = ""
    value: str = ""
    values: dict[str, str] = field(default_factory=dict)

    def change(self) -> str:
        """One key as ``key=... value=...``; several as ``values={...}``."""
        if self.values:
            return f"values={json.dumps(self.values, separators=(',', ':'))}"
        return f"key={json.dumps(self.key)} value={json.dumps(self.value)}"

    def run(self, core: Core) -> Instance:
        """Set them; a running instance gets them at once where the engine can."""
        values = dict(self.values) if self.values else {self.key: self.value}
        return core.instances.config_update(self.name, values)


@dataclass(frozen=True)
class ConfigUnset(_Named["Instance"]):
    """Put settings of an instance back to what its profiles or the defaults say."""

    op = "config.unset"
    shown = ("keys",)
    keys: tuple[str, ...] = ()

    def run(self, core: Core) -> Instance:
        """Unset them, all or none; a running instance gets the values at once."""
        return core.instances.config_unset(self.name, list(self.keys))


@dataclass(frozen=True)
class Attach(Request["Port"]):
    """Give ``instance`` a port on ``network`` (plugged in at once if it runs)."""

    op = "network.attach"
    shown = ("network", "ipv4")
    network: str
    instance: str
    ipv4: str | None = None

    def target(self) -> str:
        """The network (as ``popek network attach NETWORK INSTANCE`` names it)."""
        return self.network

    def reconciles(self) -> list[str]:
        """The instance."""
        return [self.instance]

    def run(self, core: Core) -> Port:
        """Attach it."""
        return core.instances.attach(self.instance, self.network, self.ipv4)


@dataclass(frozen=True)
class Detach(Request[None]):
    """Remove ``instance``'s port on ``network`` (unplugged first if it runs)."""

    op = "network.detach"
    shown = ("network",)
    network: str
    instance: str

    def target(self) -> str:
        """The network."""
        return self.network

    def reconciles(self) -> list[str]:
        """The instance."""
        return [self.instance]

    def run(self, core: Core) -> None:
        """Detach it."""
        core.instances.detach(self.instance, self.network)


# -- sessions with a guest: they change nothing, and are audited -----------------------
@dataclass(frozen=True)
class Exec(_Named["ExecResult | int"]):
    """Run ``argv`` in a running instance.

    With ``stream``, on the caller's stdio where the engine can (a
    container): the result is the exit code.  Otherwise, or when the engine
    cannot stream (a VM's guest agent), the whole output comes back as an
    :class:`ExecResult`; its stdin is ``stdin()`` (read only then).
    """

    op = "session.exec"
    shown = ("tty", "stream")
    session = True
    argv: tuple[str, ...] = ()
    timeout: float = 60.0
    stream: bool = False
    tty: bool = False
    stdin: Callable[[], bytes] = field(default=_no_input, metadata=NOT_AUDITED, compare=False)
    #: a front end that relays the session itself (an API websocket): given the
    #: command's channel, it returns when the session is over; the result is then
    #: the exit code (``-1``: none, the command ended by the hang-up)
    relay: Relay | None = field(default=None, metadata=NOT_AUDITED, compare=False)
    #: the terminal's rows and columns for ``relay`` with ``tty``
    size: tuple[int, int] = field(default=(24, 80), metadata=NOT_AUDITED, compare=False)

    def run(self, core: Core) -> ExecResult | int:
        """Run it through the engine."""
        if self.relay is not None:
            channel = core.instances.open_exec(self.name, list(self.argv), self.tty, self.size)
            try:
                self.relay(channel)
            finally:
                code = channel.close()
            return -1 if code is None else code
        if self.stream:
            code = core.instances.exec_stream(self.name, list(self.argv), self.tty)
            if code is not None:
                return code
        return core.instances.exec(self.name, list(self.argv), self.stdin(), self.timeout)


@dataclass(frozen=True)
class Console(_Named[None]):
    """Attach the caller's terminal to a running instance's console."""

    op = "session.console"
    session = True
    #: called once the session may begin (the instance runs), before it attaches
    attached: Progress = field(default=_noop, metadata=NOT_AUDITED, compare=False)
    #: a front end that relays the console itself (an API websocket), given its
    #: channel; it returns on detach, and the channel is closed (the instance runs on)
    relay: Relay | None = field(default=None, metadata=NOT_AUDITED, compare=False)
    #: the terminal's rows and columns for ``relay`` (where the console has a window)
    size: tuple[int, int] = field(default=(24, 80), metadata=NOT_AUDITED, compare=False)

    def run(self, core: Core) -> None:
        """Attach until the user detaches."""
        if self.relay is None:
            core.instances.console(self.name, attached=self.attached)
            return
        channel = core.instances.open_console(self.name, self.size)
        try:
            self.attached(self.name)
            self.relay(channel)
        finally:
            channel.close()


@dataclass(frozen=True)
class Attest(_Named[dict[str, Any]]):
    """Quote the instance's launch measurement over the verifier's ``nonce``."""

    op = "session.attest"
    session = True
    nonce: str = ""

    def run(self, core: Core) -> dict[str, Any]:
        """Return the signed quote."""
        from popek.trust import measure as ms

        inst = core.instances.get(self.name)
        m = ms.read(core.instances.workdir(inst))
        return ms.quote(core.trust, f"{inst.project}/{inst.name}", m, self.nonce)


@dataclass(frozen=True)
class ProjectSet(Request[None]):
    """Change a default of ``project`` (see :mod:`popek.core.projects`)."""

    op = "project.set"
    shown = ("key", "value")
    project: str
    key: str
    value: str

    def target(self) -> str:
        """The project."""
        return self.project

    def run(self, core: Core) -> None:
        """Set it; instances made later get it."""
        from popek.core.projects import Projects

        Projects(core.instances.store).set(self.project, self.key, self.value)
