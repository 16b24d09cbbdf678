"""Instance operations: launch, start, stop, pause, resume, exec, delete, reconcile.

Every mutating operation follows the same pattern: check the transition,
write the intent (``starting``, ``stopping``, ``deleting``) with the pid of
the popek process that owns it, act through the engine, then write the
outcome.  :meth:`Instances.reconcile` runs whenever an :class:`Instances` is
created and settles what reality says: an engine process that died, an
intent whose owner died.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from popek import paths, proc
from popek.core.guard import Guard
from popek.core.host import check_resources
from popek.core.lifecycle import ACTIVE, State, transition
from popek.core.model import (
    DEFAULT_LABEL,
    DEFAULT_PROJECT,
    Instance,
    InstanceSpec,
    check_label,
    instance_key,
    instances_prefix,
    parse_mount,
    validate_name,
)
from popek.core.store import Compare, Delete, Put, SQLiteStore
from popek.engines import Capability, Engine, ExecResult, LaunchSpec, get_engine, require
from popek.errors import (
    AlreadyExists,
    InvalidInput,
    NotFound,
    PopekError,
    StateError,
    StoreError,
)
from popek.images import Image, ImageStore
from popek.network.model import Network, Port, network_key
from popek.units import parse_size

if TYPE_CHECKING:
    from popek.network import Networks

#: unprivileged uids (and gids) given to engine processes, one per instance
VMM_UID_BASE = 900_000_000
VMM_UID_COUNT = 65536
#: containers: one range of 65536 ids (a user namespace) each, from here up
CONTAINER_UID_BASE = 1_000_000_000
CONTAINER_RANGES = 40_000
UID_PREFIX = "/popek/uids/"
HISTORY = 20
PORT_PREFIX = "/popek/ports/"

Progress = Callable[[str], None]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _noop(_: str) -> None:
    pass


@dataclass(frozen=True)
class Owner:
    """The popek process that owns an intent (pid and start time)."""

    pid: int
    start_time: int

    @classmethod
    def me(cls) -> Owner:
        """Return the owner record of the current process."""
        pid = os.getpid()
        return cls(pid, proc.start_time(pid) or 0)

    def alive(self) -> bool:
        """Return whether the owning process still runs."""
        return proc.alive(self.pid, self.start_time)


class Instances:
    """The instance service over one state store and one image store."""

    def __init__(self, store: SQLiteStore | None = None, images: ImageStore | None = None,
                 reconcile: bool = True) -> None:
        """Open the stores (defaults under ``POPEK_HOME``) and reconcile."""
        self.store = store or SQLiteStore(paths.state_db())
        self.images = images or ImageStore()
        self.guard = Guard(self.store)
        if reconcile:
            self.reconcile()

    # -- records -------------------------------------------------------------
    def _load(self, name: str, project: str = DEFAULT_PROJECT) -> tuple[Instance, int]:
        kv = self.store.get(instance_key(project, name))
        if kv is None:
            names = [i.name for i in self.all(project)]
            known = ", ".join(names) if names else "none"
            raise NotFound(f"instance {name!r} not found; existing instances: {known}")
        return Instance.from_json(kv.value), kv.mod_revision

    def _save(self, inst: Instance, revision: int, event: str) -> int:
        inst.history = [*inst.history, {"time": _now(), "event": event}][-HISTORY:]
        res = self.store.txn([Compare(inst.key, "mod_revision", "==", revision)],
                             [Put(inst.key, inst.to_json())])
        if not res.succeeded:
            raise StoreError(f"instance {inst.name!r} was changed by another operation "
                             "at the same time; look at popek info and retry")
        return res.revision

    def _intent(self, name: str, operation: str) -> tuple[Instance, int]:
        """Check and record the intent of ``operation`` on ``name``; return it with its revision."""
        inst, rev = self._load(name)
        inst.state = transition(name, inst.state, operation)
        inst.reason = ""
        owner = Owner.me()
        inst_owner = {"pid": owner.pid, "start_time": owner.start_time}
        inst.history = [*inst.history, {"time": _now(), "event": f"{operation} requested",
                                        "owner": str(inst_owner["pid"])}][-HISTORY:]
        res = self.store.txn([Compare(inst.key, "mod_revision", "==", rev)],
                             [Put(inst.key, inst.to_json()), Put(self._owner_key(inst),
                                                                 _owner_bytes(owner))])
        if not res.succeeded:
            raise StoreError(f"instance {name!r} was changed by another operation at the same "
                             "time; look at popek info and retry")
        return inst, res.revision

    def _owner_key(self, inst: Instance) -> str:
        return f"/popek/owners/{inst.project}/{inst.name}"

    def _finish(self, inst: Instance, rev: int, state: State, event: str,
                reason: str = "") -> None:
        inst.state = state
        inst.reason = reason
        inst.history = [*inst.history, {"time": _now(), "event": event}][-HISTORY:]
        res = self.store.txn([Compare(inst.key, "mod_revision", "==", rev)],
                             [Put(inst.key, inst.to_json()), Delete(self._owner_key(inst))])
        if not res.succeeded:
            raise StoreError(f"instance {inst.name!r} was changed by another operation "
                             "at the same time; look at popek info and retry")

    def get(self, name: str) -> Instance:
        """Return the record of instance ``name``; raise :class:`NotFound`."""
        return self._load(name)[0]

    def all(self, project: str | None = DEFAULT_PROJECT) -> list[Instance]:
        """Return every instance (of ``project``), sorted by name."""
        return [Instance.from_json(kv.value) for kv in self.store.range(instances_prefix(project))]

    # -- helpers -------------------------------------------------------------
    def workdir(self, inst: Instance) -> Path:
        """Return the instance directory of ``inst``."""
        return paths.instances_dir() / inst.project / inst.name

    def _engine(self, inst: Instance) -> Engine:
        return get_engine(inst.spec.engine)

    def _launch_spec(self, inst: Instance, image: Image | None = None,
                     lookup: bool = True) -> LaunchSpec:
        if image is None and lookup:
            image = self.images.get(inst.spec.image)
        cmdline = f"{image.manifest.cmdline} popek.hostname={inst.name}" if image else ""
        return LaunchSpec(
            name=inst.name, workdir=self.workdir(inst), vcpus=inst.spec.vcpus,
            memory=inst.spec.memory, uid=inst.uid, gid=inst.uid, image=image,
            cmdline=cmdline, accel=inst.spec.accel, runtime=inst.spec.runtime,
            project=inst.project, limits=dict(inst.spec.limits),
            mounts=tuple(parse_mount(m) for m in inst.spec.mounts) if lookup else (),
            ports=tuple(ports := self._ports(inst)),
            networks=self._networks_of(ports),
        )

    # -- networks --------------------------------------------------------------
    def _ports(self, inst: Instance) -> list[Port]:
        """The instance's network ports, from the store (no netlink, no import of the service)."""
        owner = f"{inst.project}/{inst.name}"
        return [p for p in self._all_ports() if p.instance == owner]

    def _all_ports(self) -> list[Port]:
        """Every port record of the host, from the store."""
        return [Port.from_json(kv.value) for kv in self.store.range(PORT_PREFIX)]

    def _networks_of(self, ports: list[Port]) -> dict[str, Network]:
        nets: dict[str, Network] = {}
        for port in ports:
            kv = self.store.get(network_key(port.network))
            if kv is not None:
                nets[port.network] = Network.from_json(kv.value)
        return nets

    def _network_service(self) -> Networks:
        from popek.network import Networks

        return Networks(self.store)

    def attach(self, name: str, network: str, ipv4: str | None = None) -> Port:
        """Give ``name`` a port on ``network``; plug it in at once if the instance runs.

        Raises :class:`NotFound` for a missing network, :class:`AlreadyExists`
        when already attached, :class:`popek.errors.CapabilityError` when a
        running instance's engine cannot hot-plug.
        """
        inst, rev = self._load(name)
        eng = self._engine(inst)
        if any(p.network == network for p in self._ports(inst)):
            raise AlreadyExists(f"instance {name!r} is already attached to network {network!r}")
        running = inst.state in (State.RUNNING, State.PAUSED)
        if running:
            require(eng, Capability.NETWORK_HOTPLUG)
        elif inst.state != State.STOPPED:
            raise StateError(name, "attach a network to", inst.state.value,
                             (State.PAUSED.value, State.RUNNING.value, State.STOPPED.value))
        nets = self._network_service()
        nets.get(network)  # a missing network is NotFound before any decision
        self._check_network(inst.spec.label, network)
        port = nets.create_port(network, f"{inst.project}/{inst.name}", eng.port_kind, inst.uid,
                                ipv4=ipv4)
        if running:
            assert inst.runtime is not None
            try:
                eng.attach_port(self._spec_for_running(inst), inst.runtime, port)
                self._shape(inst, [port])
            except BaseException:
                nets.delete_port(port)
                raise
        self._save(inst, rev, f"attached to network {network}")
        return port

    def detach(self, name: str, network: str) -> None:
        """Remove ``name``'s port on ``network`` (unplugging it first if the instance runs)."""
        inst, rev = self._load(name)
        ports = [p for p in self._ports(inst) if p.network == network]
        if not ports:
            raise NotFound(f"instance {name!r} is not attached to network {network!r}")
        eng = self._engine(inst)
        if inst.state in (State.RUNNING, State.PAUSED):
            require(eng, Capability.NETWORK_HOTPLUG)
            assert inst.runtime is not None
            eng.detach_port(self._spec_for_running(inst), inst.runtime, ports[0])
        self._network_service().delete_port(ports[0])
        self._save(inst, rev, f"detached from network {network}")

    def _create_ports(self, inst: Instance, eng: Engine, networks: list[str]) -> None:
        if not networks:
            return
        nets = self._network_service()
        for net, ipv4 in (split_network(n) for n in networks):
            nets.create_port(net, f"{inst.project}/{inst.name}", eng.port_kind, inst.uid,
                             ipv4=ipv4)

    def _ensure_port_devices(self, inst: Instance) -> None:
        """Recreate host devices of ports that vanished (a container's veth dies with it)."""
        ports = self._ports(inst)
        if ports:
            nets = self._network_service()
            for port in ports:
                nets.ensure_port_device(port)

    def _delete_ports(self, inst: Instance) -> None:
        ports = self._ports(inst)
        if ports:
            nets = self._network_service()
            for port in ports:
                nets.delete_port(port)

    def _allocate_uid(self, id_range: int) -> int:
        """Return the first id of a free range of ``id_range`` host uids.

        VMs (one id) come from :data:`VMM_UID_BASE`; containers (a 65536-id
        user namespace range each) from :data:`CONTAINER_UID_BASE`.
        """
        used = {int(kv.key[len(UID_PREFIX):]) for kv in self.store.range(UID_PREFIX)}
        base, count = ((VMM_UID_BASE, VMM_UID_COUNT) if id_range == 1
                       else (CONTAINER_UID_BASE, CONTAINER_RANGES))
        for i in range(count):
            uid = base + i * id_range
            if uid not in used:
                return uid
        raise PopekError(f"no free range of {id_range} host uids left; delete unused instances")

    def _uid_key(self, uid: int) -> str:
        return f"{UID_PREFIX}{uid}"

    # -- operations ----------------------------------------------------------
    def _place(self, inst: Instance) -> tuple[int, ...]:
        """The host CPUs for ``inst``: the least used by the other active instances."""
        from popek.core import placement

        busy = [i.runtime.details.get("cpus", []) for i in self.all(None)
                if i.state in ACTIVE and i.runtime is not None and i.name != inst.name]
        return placement.choose(inst.spec.vcpus, busy)

    def _shape(self, inst: Instance, ports: list[Port] | None = None) -> None:
        """Apply ``limits.net`` (or no limit) to the host side of the instance's ports."""
        from popek.network import shaping

        rate = inst.spec.limits.get("net")
        for port in ports if ports is not None else self._ports(inst):
            guest = None
            if port.kind == "veth" and inst.runtime is not None:  # its end in the container
                guest = (inst.runtime.pid, shaping.guest_ifname(inst.runtime.pid, port.mac))
            shaping.apply(port.host_ifname, rate, guest)

    # -- access control ------------------------------------------------------------
    def _check_run(self, inst: Instance, networks: list[str]) -> None:
        """The policy checks of a start: run beside the others, host channels, networks."""
        label = inst.spec.label
        others = [i for i in self.all(None) if i.name != inst.name]  # read once for every check
        running = [i.spec.label for i in others if i.state in ACTIVE]
        self.guard.check(label, "run", "host", running=running)
        for m in inst.spec.mounts:
            self.guard.check(label, "channel", f"host-mount:{parse_mount(m)[0]}")
        for net in networks:
            self._check_network(label, split_network(net)[0], inst, others)

    def _check_network(self, label: str, network: str, inst: Instance | None = None,
                       others: list[Instance] | None = None) -> None:
        me = f"{inst.project}/{inst.name}" if inst else ""
        owners = {p.instance for p in self._all_ports()
                  if p.network == network and p.instance != me}
        candidates = self.all(None) if others is None else others
        sharers = [i.spec.label for i in candidates if f"{i.project}/{i.name}" in owners]
        self.guard.check(label, "network", network, sharers=sharers)

    def launch(self, image_name: str, name: str, vcpus: int = 1, memory: int = 512 << 20,
               accel: str = "auto", engine: str = "qemu", runtime: str = "auto",
               limits: dict[str, int] | None = None, mounts: list[str] | None = None,
               networks: list[str] | None = None, ready_timeout: float = 180.0,
               progress: Progress = _noop, label: str = DEFAULT_LABEL) -> Instance:
        """Create instance ``name`` from ``image_name`` and start it.

        Validates everything before anything is created; when the start fails,
        the record, the uid and the instance directory are removed again.
        Raises :class:`InvalidInput`, :class:`NotFound`, :class:`AlreadyExists`,
        :class:`popek.errors.ResourceError`, :class:`popek.errors.IntegrityError`
        or :class:`popek.errors.EngineError`.
        """
        validate_name(name)
        check_label(label)
        check_resources(vcpus, memory)
        limits = check_limits(limits or {})
        mounts = list(mounts or [])
        for m in mounts:
            parse_mount(m)
        eng = get_engine(engine)
        if mounts:
            require(eng, Capability.HOST_MOUNTS)
        key = instance_key(DEFAULT_PROJECT, name)
        if self.store.get(key) is not None:
            raise AlreadyExists(f"instance {name!r} already exists; pick another name "
                                "or delete it first")
        image = self.images.get(image_name)
        spec_in = InstanceSpec(image_name, engine, vcpus, memory, accel, runtime, limits, mounts,
                               label)
        probe = Instance(name=name, spec=spec_in, state=State.STARTING, uid=0, created="")
        eng.preflight(self._launch_spec(probe, image))
        for net in networks or []:
            self._network_service().get(split_network(net)[0])  # missing: fail first
        verdict = self.guard.image(image, image_name, DEFAULT_PROJECT)
        with _decision_lock():  # the decision holds until our record is there for the next one
            self._check_run(probe, networks or [])
            inst, revision = self._create_record(name, key, spec_in, eng, image)
        try:
            self._create_ports(inst, eng, list(networks or []))
            measure, measured = self.guard.measurer(self.workdir(inst), verdict)
            spec = replace(self._launch_spec(inst, image), measure=measure,
                           cpus=self._place(inst))
            progress(f"creating {name}")
            eng.create(spec)
            progress(f"booting {name}")
            started = eng.start(spec, ready_timeout)
        except BaseException:
            self._purge(inst)
            raise
        started.details["image_trust"] = verdict.to_doc()
        started.details["measurement"] = measured[-1].value if measured else ""
        started.details["cpus"] = list(spec.cpus)
        inst.runtime = started
        try:
            self._shape(inst)
        except BaseException:
            self._purge(inst)
            raise
        self._finish(inst, revision, State.RUNNING, "started")
        return inst

    def _create_record(self, name: str, key: str, spec_in: InstanceSpec, eng: Engine,
                       image: Image) -> tuple[Instance, int]:
        """Write the new instance (state starting) with its own uid, in one transaction."""
        owner = Owner.me()
        for _ in range(10):
            uid = self._allocate_uid(eng.id_range)
            inst = Instance(name=name, spec=spec_in,
                            state=State.STARTING, uid=uid, created=_now(),
                            image_version=image.manifest.version,
                            history=[{"time": _now(), "event": "launch requested",
                                      "owner": str(owner.pid)}])
            res = self.store.txn(
                [Compare(key, "version", "==", 0), Compare(self._uid_key(uid), "version", "==", 0)],
                [Put(key, inst.to_json()), Put(self._uid_key(uid), key.encode()),
                 Put(self._owner_key(inst), _owner_bytes(owner))],
            )
            if res.succeeded:
                return inst, res.revision
            if self.store.get(key) is not None:
                raise AlreadyExists(f"instance {name!r} already exists; pick another name "
                                    "or delete it first")
        raise StoreError("could not allocate a uid for the instance; retry")

    def start(self, name: str, ready_timeout: float = 180.0,
              progress: Progress = _noop) -> Instance:
        """Start a stopped instance and wait until its guest is ready."""
        inst, rev = self._intent(name, "start")
        try:
            image = self.images.get(inst.spec.image)
            verdict = self.guard.image(image, inst.spec.image, inst.project)
            with _decision_lock():  # our intent (starting) is recorded: decide after it
                self._check_run(inst, [p.network for p in self._ports(inst)])
            progress(f"booting {name}")
            self._ensure_port_devices(inst)
            measure, measured = self.guard.measurer(self.workdir(inst), verdict)
            spec = replace(self._launch_spec(inst, image), measure=measure,
                           cpus=self._place(inst))
            inst.runtime = self._engine(inst).start(spec, ready_timeout)
            inst.runtime.details["cpus"] = list(spec.cpus)
            inst.runtime.details["image_trust"] = verdict.to_doc()
            inst.runtime.details["measurement"] = measured[-1].value if measured else ""
            self._shape(inst)
        except BaseException as exc:
            self._finish(inst, rev, State.STOPPED, "start failed", f"start failed: {exc}")
            raise
        self._finish(inst, rev, State.RUNNING, "started")
        return inst

    def stop(self, name: str, force: bool = False, timeout: float = 30.0) -> str:
        """Stop ``name``: ACPI power button, then force after ``timeout`` s.

        Returns ``graceful`` or ``forced``.
        """
        if timeout < 0:
            raise InvalidInput(f"invalid timeout {timeout}: must be 0 or more seconds")
        inst, rev = self._intent(name, "stop")
        assert inst.runtime is not None
        try:
            how = self._engine(inst).stop(self._spec_for_running(inst), inst.runtime, force,
                                          timeout)
        except BaseException:
            live = self._engine(inst).liveness(self._spec_for_running(inst), inst.runtime)
            if live.alive:
                self._finish(inst, rev, State.RUNNING, "stop failed")
            else:
                self._finish(inst, rev, State.STOPPED, "stopped", live.reason)
            raise
        inst.runtime = None
        self._finish(inst, rev, State.STOPPED, f"stopped ({how})", f"stopped on request ({how})")
        return how

    def restart(self, name: str, force: bool = False, timeout: float = 30.0,
                ready_timeout: float = 180.0, progress: Progress = _noop) -> Instance:
        """Stop ``name`` (if it runs) and start it again."""
        if self.get(name).state in (State.RUNNING, State.PAUSED):
            progress(f"stopping {name}")
            self.stop(name, force, timeout)
        return self.start(name, ready_timeout, progress)

    def pause(self, name: str) -> None:
        """Freeze a running instance."""
        self._simple(name, "pause", Capability.PAUSE)

    def resume(self, name: str) -> None:
        """Unfreeze a paused instance."""
        self._simple(name, "resume", Capability.PAUSE)

    def _simple(self, name: str, operation: str, capability: Capability) -> None:
        inst, rev = self._load(name)
        new_state = transition(name, inst.state, operation)
        eng = self._engine(inst)
        require(eng, capability)
        assert inst.runtime is not None
        getattr(eng, operation)(self._spec_for_running(inst), inst.runtime)
        inst.state = new_state
        self._save(inst, rev, operation)

    def _spec_for_running(self, inst: Instance) -> LaunchSpec:
        """A LaunchSpec for an instance whose image may have gone since it started."""
        cpus = tuple(inst.runtime.details.get("cpus", [])) if inst.runtime else ()
        try:
            return replace(self._launch_spec(inst), cpus=cpus)
        except PopekError:
            return replace(self._launch_spec(inst, lookup=False), cpus=cpus)

    def _exec_target(self, name: str, argv: list[str]) -> tuple[Instance, Engine]:
        """Check an exec request; return the running instance and its engine."""
        if not argv:
            raise InvalidInput("no command given: use popek exec NAME -- COMMAND [ARGS...]")
        inst = self.get(name)
        eng = self._engine(inst)
        require(eng, Capability.EXEC)
        if inst.state != State.RUNNING:
            raise StateError(name, "exec", inst.state.value, (State.RUNNING.value,))
        return inst, eng

    def exec(self, name: str, argv: list[str], stdin: bytes = b"",
             timeout: float = 60.0) -> ExecResult:
        """Run ``argv`` inside running instance ``name``; return its exit code and output."""
        inst, eng = self._exec_target(name, argv)
        return eng.exec(self._spec_for_running(inst), argv, stdin, timeout)

    def exec_stream(self, name: str, argv: list[str], tty: bool) -> int | None:
        """Run ``argv`` in ``name`` on the caller's stdio; ``None`` if the engine cannot stream.

        Callers fall back to :meth:`exec` (whole output) when this returns ``None``.
        """
        inst, eng = self._exec_target(name, argv)
        if Capability.EXEC_STREAM not in eng.capabilities:
            return None
        return eng.exec_stream(self._spec_for_running(inst), argv, tty)

    def config_set(self, name: str, key: str, value: str) -> Instance:
        """Set ``limits.memory``, ``limits.cpu`` or ``limits.pids`` of ``name``.

        A running instance gets the new limit at once when its engine can
        resize; otherwise the change is refused while it runs.  Invalid keys
        and out-of-range values raise :class:`InvalidInput` and change nothing.
        """
        inst, rev = self._load(name)
        spec = inst.spec
        if key == "limits.memory":
            spec.memory = parse_size(value, "limits.memory")
            check_resources(spec.vcpus, spec.memory)
        elif key == "limits.cpu":
            try:
                spec.vcpus = int(value)
            except ValueError as exc:
                raise InvalidInput(f"invalid limits.cpu {value!r}: expected a whole number of "
                                   "CPUs, from 1 to this host's count") from exc
            check_resources(spec.vcpus, spec.memory)
        elif key == "limits.pids":
            spec.limits = check_limits({**spec.limits, "pids": _int(value, "limits.pids")})
        elif key == "limits.net":
            from popek.network.shaping import parse_rate

            limits = dict(spec.limits)
            if value.lower() in ("none", "0", "off"):
                limits.pop("net", None)
            else:
                limits["net"] = parse_rate(value)
            spec.limits = check_limits(limits)
            if inst.state in (State.RUNNING, State.PAUSED):
                self._shape(inst)
            self._save(inst, rev, f"config {key}={value}")
            return inst
        elif key == "label":
            if inst.state != State.STOPPED:
                raise StateError(name, "change the label of", inst.state.value,
                                 (State.STOPPED.value,))
            spec.label = check_label(value)
            self._save(inst, rev, f"config {key}={value}")
            return inst
        else:
            raise InvalidInput(f"unknown key {key!r}; allowed: {', '.join(CONFIG_KEYS)}")
        if inst.state in (State.RUNNING, State.PAUSED):
            eng = self._engine(inst)
            require(eng, Capability.RESIZE)
            assert inst.runtime is not None
            if key == "limits.cpu":  # more or fewer vCPUs: placed again
                inst.runtime.details["cpus"] = list(self._place(inst))
            eng.resize(self._spec_for_running(inst), inst.runtime)
        elif inst.state != State.STOPPED:
            raise StateError(name, "change the configuration of", inst.state.value,
                             (State.PAUSED.value, State.RUNNING.value, State.STOPPED.value))
        self._save(inst, rev, f"config {key}={value}")
        return inst

    def console(self, name: str, escape: bytes = b"\x1d") -> None:
        """Attach the caller's terminal to the console of running instance ``name``."""
        inst = self.get(name)
        eng = self._engine(inst)
        require(eng, Capability.CONSOLE)
        if inst.state not in (State.RUNNING, State.PAUSED):
            raise StateError(name, "attach a console to", inst.state.value,
                             (State.PAUSED.value, State.RUNNING.value))
        eng.console(self._spec_for_running(inst), escape)

    def console_log(self, name: str) -> bytes:
        """Return what instance ``name`` wrote on its console since it last started."""
        inst = self.get(name)
        return self._engine(inst).console_log(self._spec_for_running(inst))

    def info(self, name: str) -> dict[str, Any]:
        """Return the record of ``name`` with live engine details when it runs."""
        inst = self.get(name)
        data: dict[str, Any] = {
            "name": inst.name, "project": inst.project, "state": inst.state.value,
            "reason": inst.reason, "engine": inst.spec.engine, "image": inst.spec.image,
            "image_version": inst.image_version, "label": inst.spec.label,
            "vcpus": inst.spec.vcpus,
            "memory": inst.spec.memory, "accel_requested": inst.spec.accel,
            "uid": inst.uid, "created": inst.created, "workdir": str(self.workdir(inst)),
            "history": inst.history,
            "ports": [{"network": p.network, "mac": p.mac, "ipv4": p.ipv4, "ipv6": p.ipv6,
                       "host_device": p.host_ifname, "kind": p.kind} for p in self._ports(inst)],
        }
        if inst.runtime is not None and inst.state in (State.RUNNING, State.PAUSED):
            data["pid"] = inst.runtime.pid
            data.update(inst.runtime.details)
            try:
                data.update(self._engine(inst).status(self._spec_for_running(inst), inst.runtime))
            except PopekError as exc:
                data["engine_error"] = str(exc)
        return data

    def delete(self, name: str, force: bool = False) -> None:
        """Delete ``name``: its record, uid, directory and files.

        A running or paused instance is refused unless ``force``, which stops it first.
        """
        inst = self.get(name)
        if force and inst.state in ACTIVE:
            self.stop(name, force=True, timeout=0)
        inst, _ = self._intent(name, "delete")
        self._purge(inst)

    def _purge(self, inst: Instance) -> None:
        """Remove everything an instance left: engine leftovers, directory, uid, record."""
        spec = self._spec_for_running(inst)
        with contextlib.suppress(PopekError):
            eng = self._engine(inst)
            eng.cleanup(spec)
            eng.destroy(spec)
        self._delete_ports(inst)
        shutil.rmtree(self.workdir(inst), ignore_errors=True)
        self.store.txn([], [Delete(inst.key), Delete(self._uid_key(inst.uid)),
                            Delete(self._owner_key(inst))])

    # -- reconcile -----------------------------------------------------------
    def reconcile(self) -> list[str]:
        """Settle records with reality; return a line per change made.

        An engine process that died marks its instance ``stopped`` with the
        reason; an intent whose popek process died is completed or rolled back.
        """
        changes: list[str] = []
        for kv in self.store.range(instances_prefix(None)):
            inst = Instance.from_json(kv.value)
            if inst.state not in ACTIVE and inst.state != State.DELETING:
                continue
            owner_kv = self.store.get(self._owner_key(inst))
            if owner_kv is not None and _owner_from(owner_kv.value).alive():
                continue  # an operation is in progress in another popek process
            change = self._reconcile_one(inst, kv.mod_revision)
            if change:
                changes.append(change)
        return changes

    def _reconcile_one(self, inst: Instance, rev: int) -> str:
        eng = self._engine(inst)
        spec = self._spec_for_running(inst)
        if inst.state == State.DELETING:
            if inst.runtime:
                proc.kill(inst.runtime.pid, inst.runtime.start_time)
            self._purge(inst)
            return f"{inst.name}: finished an interrupted delete"
        if inst.runtime is None:
            eng.cleanup(spec)
            try:
                self._finish(inst, rev, State.STOPPED, "start interrupted",
                             "the start was interrupted (popek exited before the guest was ready)")
            except StoreError:
                return ""
            return f"{inst.name}: interrupted start rolled back"
        live = eng.liveness(spec, inst.runtime)
        if live.alive:
            if inst.state in (State.STARTING, State.STOPPING):
                state = State.RUNNING
                try:
                    self._finish(inst, rev, state, f"{inst.state.value} interrupted")
                except StoreError:
                    return ""
                return f"{inst.name}: interrupted operation settled as running"
            return ""
        reason = "stopped on request" if inst.state == State.STOPPING else live.reason
        eng.cleanup(spec)
        inst.runtime = None
        try:
            self._finish(inst, rev, State.STOPPED, "engine exited", reason)
        except StoreError:
            return ""
        return f"{inst.name}: stopped ({reason})"

    def image_in_use(self, image: str) -> list[str]:
        """Return the names of instances that use ``image``."""
        return [i.name for i in self.all(None) if i.spec.image == image]


CONFIG_KEYS = ("limits.memory", "limits.cpu", "limits.pids", "limits.net", "label")


def split_network(text: str) -> tuple[str, str | None]:
    """Split ``NAME`` or ``NAME=IPV4`` (a static address on that network)."""
    name, _, ipv4 = text.partition("=")
    return name, ipv4 or None
MAX_PIDS = 1 << 22


def _int(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError as exc:
        raise InvalidInput(f"invalid {what} {value!r}: expected a whole number") from exc


def check_limits(limits: dict[str, int]) -> dict[str, int]:
    """Validate extra limits (``pids``: 16 to 4194304; ``net``: bit/s); return them."""
    from popek.network.shaping import check_rate

    for key, value in limits.items():
        if key == "net":
            check_rate(value)
        elif key != "pids":
            raise InvalidInput(f"unknown limit {key!r}; allowed: pids, net")
        elif not 16 <= value <= MAX_PIDS:
            raise InvalidInput(f"invalid limits.pids {value}: must be from 16 to {MAX_PIDS}")
    return limits


def _owner_bytes(owner: Owner) -> bytes:
    return f"{owner.pid} {owner.start_time}".encode()


def _owner_from(data: bytes) -> Owner:
    pid, started = data.decode().split()
    return Owner(int(pid), int(started))


def wait_stopped(instances: Instances, name: str, timeout: float) -> bool:
    """Poll until ``name`` is stopped (after reconcile) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        instances.reconcile()
        if instances.get(name).state == State.STOPPED:
            return True
        time.sleep(0.1)
    return False


@contextlib.contextmanager
def _decision_lock() -> Iterator[None]:
    """One access control decision at a time on this host (for launch and start).

    A launch holds it from its check until its record (state starting) is
    written; a start writes its intent first.  So two instances whose labels
    conflict can never both pass the check, however their commands interleave.
    """
    path = paths.home() / ".decisions.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with proc.flocked(path):
        yield
