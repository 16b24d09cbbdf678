"""Instance operations: launch, start, stop, pause, resume, exec, config, delete.

:class:`Instances` orchestrates; each concern lives in a module of its own:
records and intents (:mod:`~popek.core.records`), host ids
(:mod:`~popek.core.ids`), the network side (:mod:`~popek.core.netglue`),
access control decisions (:mod:`~popek.core.access`), configuration and
limits (:mod:`~popek.core.config`) and reconcile
(:mod:`~popek.core.reconcile`).  Engines and the network service come from
factories given to the constructor (the host's by default; fakes in unit
tests), and the constructor does no work: reconcile is an explicit step
(:meth:`Instances.reconcile`) that a front end runs once per command.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from popek import paths, proc
from popek.core import config as cfg
from popek.core.access import Access, decision_lock
from popek.core.guard import Guard
from popek.core.host import check_resources
from popek.core.lifecycle import ACTIVE, State, refused, transition
from popek.core.listings import Listings
from popek.core.model import (
    DEFAULT_LABEL,
    DEFAULT_PROJECT,
    Instance,
    InstanceSpec,
    check_label,
    parse_mount,
    validate_name,
)
from popek.core.netglue import (
    InstanceNetworks,
    NetworksFactory,
    host_networks,
    owner_name,
    port_json,
    split_network,
)
from popek.core.projects import Projects
from popek.core.reconcile import Reconciler
from popek.core.records import MINE, Records
from popek.core.volumes import Attachments
from popek.engines import (
    Capability,
    Engine,
    ExecResult,
    LaunchSpec,
    RbdDisk,
    get_engine,
    require,
)
from popek.errors import AlreadyExists, InvalidInput, NotFound, PopekError, StateError
from popek.images import Image, ImageStore
from popek.iolimits import IoLimits
from popek.network.model import Port, host_name
from popek.state import open_store
from popek.state.hostwide import HostCpus
from popek.state.store import StateStore

#: engines whose running instances :meth:`Instances.info` reads from files only (a
#: container's state directory and cgroup), with no round trip to an engine process
QUICK_INFO_ENGINES = frozenset({"container"})

if TYPE_CHECKING:
    from popek.engines.session import Channel

Progress = Callable[[str], None]
EngineFactory = Callable[[str], Engine]
CONFIG_KEYS = cfg.CONFIG_KEYS
#: what :meth:`Instances.stop` returns for an instance that was stopped already
ALREADY_STOPPED = "already stopped"
check_limits = cfg.check_limits
__all__ = ["ALREADY_STOPPED", "CONFIG_KEYS", "Instances", "check_limits", "split_network"]


def _noop(_: str) -> None:
    pass


def _cpus(inst: Instance) -> tuple[int, ...]:
    """The host CPUs a started instance was placed on (none recorded: all)."""
    return tuple(inst.runtime.details.get("cpus", [])) if inst.runtime else ()


class Instances:
    """The instance service over one state store, one image store, engines and networks."""

    def __init__(self, store: StateStore | None = None, images: ImageStore | None = None,
                 engines: EngineFactory = get_engine,
                 networks: NetworksFactory = host_networks,
                 project: str = DEFAULT_PROJECT, listings: Listings | None = None) -> None:
        """Open the stores (defaults under ``POPEK_HOME``); nothing is reconciled here.

        Instance names are of ``project``; a launch creates them there.
        ``listings``: the listings a long-running process keeps (see :meth:`summaries`).
        """
        self.store: StateStore = store or open_store()
        self.project = project
        self.listings = listings
        self.images = images or ImageStore()
        self.guard = Guard(self.store)
        self.records = Records(self.store, project)
        self.nets = InstanceNetworks(self.store, networks)
        self.access = Access(self.guard, self.records, self.nets)
        self.volumes = Attachments(self)
        self._engines = engines
        self._instances_dir = paths.instances_dir()
        self.reconciler = Reconciler(self.records, self._engine, self._spec,
                                     self._purge, self._kill, self._audit_settled)

    # -- records ---------------------------------------------------------------
    def get(self, name: str) -> Instance:
        """Return the record of instance ``name``; raise :class:`NotFound`."""
        return self.records.load(name)[0]

    def all(self, project: str | None = MINE) -> list[Instance]:
        """Return every instance (of ``project``, this service's by default; ``None``: of
        every project), sorted by name."""
        return self.records.all(project)

    def settled(self, project: str | None = MINE) -> list[Instance]:
        """Every instance (of ``project``, as :meth:`all`), reconciled first, each record
        read once."""
        return self.reconciler.settled_all(self.project if project == MINE else project)

    def reconcile(self, names: Iterable[str] | None = None) -> list[str]:
        """Settle records with reality (``names`` only, or all); return a line per change."""
        return self.reconciler.run(names)

    # -- helpers -------------------------------------------------------------------
    def _audit_settled(self, inst: Instance, what: str) -> None:
        """The outcome of an operation whose popek process died, as reconcile settled it."""
        with contextlib.suppress(OSError, PopekError):  # the reconcile itself stands
            self.guard.audit.append("instance.reconcile", inst.name, {"project": inst.project},
                                    f"ok: {what}")

    def workdir(self, inst: Instance) -> Path:
        """Return the instance directory of ``inst``."""
        return self._instances_dir / inst.project / inst.name

    def _engine(self, inst: Instance) -> Engine:
        return self._engines(inst.spec.engine)

    def _launch_spec(self, inst: Instance, image: Image | None = None,
                     lookup: bool = True, with_ports: bool = True) -> LaunchSpec:
        """The spec of ``inst``; without ``lookup`` no image and no mounts, without
        ``with_ports`` no ports (no store reads at all)."""
        if image is None and lookup:
            image = self.images.resolve(inst.spec.image, inst.project)[1]
        cmdline = f"{image.manifest.cmdline} popek.hostname={inst.name}" if image else ""
        ports = self.nets.ports(inst) if with_ports else []
        return LaunchSpec(
            name=inst.name, workdir=self.workdir(inst), vcpus=inst.spec.vcpus,
            memory=inst.spec.memory, uid=inst.uid, gid=inst.uid, image=image,
            cmdline=cmdline, accel=inst.spec.accel, runtime=inst.spec.runtime,
            project=inst.project, limits=dict(inst.spec.limits),
            mounts=tuple(parse_mount(m) for m in inst.spec.mounts) if lookup else (),
            ports=tuple(ports), networks=self.nets.networks_of(ports),
            disks=self._disks(inst) if lookup else (),
            fs_volumes=self._fs_volumes(inst) if lookup else (),
            rbd_disks=self._rbd_disks(inst) if lookup else (),
            disk_limits=self._disk_limits(inst) if lookup else (),
        )

    def _disks(self, inst: Instance) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """Each attached block volume and its files (a VM's disks)."""
        return self.volumes.files(inst) if self._kind(inst) == "block" else ()

    def _disk_limits(self, inst: Instance) -> tuple[IoLimits, ...]:
        """The I/O limits of each attached volume, in the order of :meth:`_disks` then
        :meth:`_rbd_disks` (a VM) or :meth:`_fs_volumes` (a container)."""
        if not self._kind(inst):
            return ()
        from popek.storage.service import Storage

        storage = Storage(self.store)
        files: list[IoLimits] = []
        rbd: list[IoLimits] = []
        for ref in inst.spec.volumes:
            pool, name = storage.parse_ref(ref)
            limits = storage.io_limits_of(storage.volume(pool, inst.project, name))
            (rbd if storage.is_ceph(pool) else files).append(limits)
        return (*files, *rbd)

    def apply_io_limits(self, name: str) -> Instance:
        """Give running instance ``name`` the I/O limits its record and its volumes hold now
        (nothing while it is stopped: its next start takes them)."""
        inst = self.get(name)
        if inst.state in (State.RUNNING, State.PAUSED) and inst.runtime is not None:
            eng = self._engine(inst)
            require(eng, Capability.IO_LIMIT)
            eng.set_io_limits(self._spec_for_running(inst), inst.runtime)
        return inst

    def _kind(self, inst: Instance) -> str:
        """The kind of volume ``inst``'s engine takes (none: no engine, or no volumes)."""
        if not inst.spec.volumes:
            return ""
        try:
            return self._engine(inst).volume_kind
        except PopekError:
            return ""

    def _fs_volumes(self, inst: Instance) -> tuple[tuple[str, str, str], ...]:
        """Each attached filesystem volume, its file and where it is mounted (a
        container's)."""
        if self._kind(inst) != "filesystem":
            return ()
        return tuple((ref, files[0], inst.spec.volume_paths.get(ref, ""))
                     for ref, files in self.volumes.files(inst))

    def _rbd_disks(self, inst: Instance) -> tuple[RbdDisk, ...]:
        """Each attached volume of a ceph pool (``POOL/NAME``): its image, its client and
        that client's key (read from the pool's keyring at each start, never stored), and
        an encrypted one's own key (the project's, from the secret store)."""
        if not inst.spec.volumes or inst.spec.engine != "qemu":
            return ()
        from popek.core.volkeys import volume_key
        from popek.storage.service import Storage

        storage = Storage(self.store, volume_key)  # an encrypted one's key: secret store
        out = []
        for ref in inst.spec.volumes:
            pool, name = storage.parse_ref(ref)
            if storage.is_ceph(pool):
                d = storage.rbd_disk(pool, inst.project, name)
                luks = storage.key(storage.volume(pool, inst.project, name)) or ""
                out.append(RbdDisk(ref, d["pool"], d["image"], d["user"],
                                   tuple((str(h), str(p)) for h, p in d["servers"]), d["key"],
                                   luks))
        return tuple(out)

    def _disk_keys(self, inst: Instance) -> tuple[str, ...]:
        """The key of each attached volume (empty: a plain one), in ``_disks``' order; none
        at all when no volume is encrypted; read only to start it.  NotFound when the
        project's key is missing."""
        return self.volumes.keys(inst) if self._kind(inst) == "block" else ()

    def _spec(self, inst: Instance, full: bool) -> LaunchSpec:
        """A spec of a recorded instance; ``full=False`` reads neither images nor ports."""
        if full:
            return self._spec_for_running(inst)
        return replace(self._launch_spec(inst, lookup=False, with_ports=False),
                       cpus=_cpus(inst))

    def _spec_for_running(self, inst: Instance) -> LaunchSpec:
        """A LaunchSpec for an instance whose image may have gone since it started."""
        try:
            return replace(self._launch_spec(inst), cpus=_cpus(inst))
        except PopekError:
            return replace(self._launch_spec(inst, lookup=False), cpus=_cpus(inst))

    def _place(self, inst: Instance) -> tuple[int, ...]:
        """The host CPUs for ``inst``: the least used by the other active instances,
        of this home and of every other home on the host (:mod:`popek.state.hostwide`:
        one grouped query, however many instances run).
        """
        from popek.core import placement

        busy: list[tuple[int, ...]] = []
        with contextlib.suppress(OSError, PopekError):
            for cpus, count in HostCpus(paths.home()).load(but=f"{inst.project}/{inst.name}"):
                busy += [cpus] * count
        return placement.choose(inst.spec.vcpus, busy)

    # -- networks ----------------------------------------------------------------------
    def attach_volume(self, name: str, ref: str, path: str = "") -> Instance:
        """Attach volume ``ref`` (``POOL/VOLUME``) to ``name`` (see :mod:`popek.core.volumes`)."""
        return self.volumes.attach(name, ref, path)

    def detach_volume(self, name: str, ref: str) -> Instance:
        """Detach volume ``ref`` from ``name`` (unplugged first when it runs)."""
        return self.volumes.detach(name, ref)

    def attach(self, name: str, network: str, ipv4: str | None = None) -> Port:
        """Give ``name`` a port on ``network``; plug it in at once if the instance runs.

        Raises :class:`NotFound` for a missing network, :class:`AlreadyExists`
        when already attached, :class:`popek.errors.CapabilityError` when a
        running instance's engine cannot hot-plug.
        """
        inst, rev = self.records.load(name)
        eng = self._engine(inst)
        short, network = network, self.nets.service.resolve(network, self.project).name
        if any(p.network == network for p in self.nets.ports(inst)):
            raise AlreadyExists(f"instance {name!r} is already attached to network {short!r}")
        running = inst.state in (State.RUNNING, State.PAUSED)
        if running:
            require(eng, Capability.NETWORK_HOTPLUG)
        elif inst.state != State.STOPPED:
            raise StateError(name, "attach a network to", inst.state.value,
                             (State.PAUSED.value, State.RUNNING.value, State.STOPPED.value))
        nets = self.nets.service
        self.access.check_network(inst.spec.label, network)
        port = nets.create_port(network, f"{inst.project}/{inst.name}", eng.port_kind, inst.uid,
                                ipv4=ipv4)
        plugged = False
        try:  # port, plug, shape, record: a failure at any step undoes the steps before it
            if running:
                assert inst.runtime is not None
                eng.attach_port(self._spec_for_running(inst), inst.runtime, port)
                plugged = True
                self.nets.shape(inst, [port])
            self.records.save(inst, rev, f"attached to network {network}")
        except BaseException as exc:
            if plugged and not self._unplug(inst, eng, port, exc):
                # still plugged: its port stays, and the record says where (best effort),
                # so that `network detach` removes both and no later plug takes its slot
                with contextlib.suppress(PopekError):
                    self.records.save(inst, rev, f"attached to network {network} "
                                      "(the undo of a failed attach failed)")
                raise
            with contextlib.suppress(NotFound):  # a delete that raced us removed it already
                nets.delete_port(port)
            raise
        return port

    def _network_ref(self, text: str) -> str:
        """``NAME`` or ``NAME=IPV4`` as this project names the network (its own, else
        ``default``'s), with the network's host-wide name; NotFound when there is none."""
        name, ipv4 = split_network(text)
        full = self.nets.service.resolve(name, self.project).name
        return full if ipv4 is None else f"{full}={ipv4}"

    def _unplug(self, inst: Instance, eng: Engine, port: Port, cause: BaseException) -> bool:
        """Undo a hot-plug after ``cause``; ``False`` (and a note on ``cause``) if it stays."""
        assert inst.runtime is not None
        try:
            eng.detach_port(self._spec_for_running(inst), inst.runtime, port)
        except Exception as exc:  # the first error is the one to report
            cause.add_note(f"popek: the NIC on {port.network} stays plugged ({exc}); "
                           f"`popek network detach {inst.name} {port.network}` removes it")
            return False
        return True

    def detach(self, name: str, network: str) -> None:
        """Remove ``name``'s port on ``network`` (unplugging it first if the instance runs).

        Once the NIC is out, the detach goes forward: when deleting the port
        fails, the port is left ``deleting`` for the network reconcile to
        finish, and the record still loses the NIC's slot.
        """
        inst, rev = self.records.load(name)
        mine = self.nets.ports(inst)
        ports = next(([p for p in mine if p.network == full] for full in
                      (host_name(self.project, network), network)
                      if any(p.network == full for p in mine)), [])
        if not ports:
            raise NotFound(f"instance {name!r} is not attached to network {network!r}")
        eng = self._engine(inst)
        if inst.state in (State.RUNNING, State.PAUSED):
            require(eng, Capability.NETWORK_HOTPLUG)
            assert inst.runtime is not None
            eng.detach_port(self._spec_for_running(inst), inst.runtime, ports[0])
        try:
            self.nets.service.delete_port(ports[0])
        except BaseException:
            with contextlib.suppress(PopekError):  # the first error is the one to report
                self.records.save(inst, rev, f"detached from network {network}")
            raise
        self.records.save(inst, rev, f"detached from network {network}")

    # -- operations ------------------------------------------------------------
    def launch(self, image_name: str, name: str, vcpus: int = 1, memory: int = 512 << 20,
               accel: str = "auto", engine: str = "qemu", runtime: str = "auto",
               limits: dict[str, int] | None = None, mounts: list[str] | None = None,
               networks: list[str] | None = None, ready_timeout: float = 180.0,
               progress: Progress = _noop, label: str = DEFAULT_LABEL,
               profiles: list[str] | None = None,
               volumes: list[str] | None = None) -> Instance:
        """Create instance ``name`` from ``image_name`` and start it.

        ``profiles``: the profiles its settings came from (recorded; see
        :mod:`popek.core.profiles`, which merges them): each must still exist
        when the record is written, so that a profile delete that checked
        for users meanwhile cannot miss this instance.

        Validates everything before anything is created; when the start fails,
        the record, the uid and the instance directory are removed again.
        Raises :class:`InvalidInput`, :class:`NotFound`, :class:`AlreadyExists`,
        :class:`popek.errors.ResourceError`, :class:`popek.errors.IntegrityError`
        or :class:`popek.errors.EngineError`.
        """
        validate_name(name)
        Projects(self.store).require(self.project)
        check_label(label)
        check_resources(vcpus, memory)
        limits = check_limits(limits or {})
        mounts = list(mounts or [])
        for m in mounts:
            parse_mount(m)
        eng = self._engines(engine)
        if Capability.DISK_LIMIT in eng.capabilities:
            limits.setdefault("disk", Projects(self.store).disk(self.project))
        elif "disk" in limits:
            raise InvalidInput("limits.disk applies to containers (their writable layer); "
                               "a VM's root is its image")
        if mounts:
            require(eng, Capability.HOST_MOUNTS)
        volumes, volume_paths = self.volumes.parse(volumes or [], eng.volume_kind)
        if volumes:
            self.volumes.check(volumes, eng.volume_kind)
        if self.records.exists(name):
            raise AlreadyExists(f"instance {name!r} already exists; pick another name "
                                "or delete it first")
        image = self.images.resolve(image_name, self.project)[1]  # its own, else default's
        spec_in = InstanceSpec(image_name, engine, vcpus, memory, accel, runtime, limits, mounts,
                               label, list(profiles or []), volumes=volumes,
                               volume_paths=volume_paths)
        probe = Instance(name=name, spec=spec_in, state=State.STARTING, uid=0, created="")
        eng.preflight(self._launch_spec(probe, image))
        networks = [self._network_ref(n) for n in networks or []]  # missing: fail first
        verdict = self.guard.image(image, image_name, self.project)
        with decision_lock():  # the decision holds until our record is there for the next one
            if profiles:  # a profile delete holds this lock too (see core.profiles)
                from popek.core.profiles import Profiles

                for profile in profiles:
                    Profiles(self.store, self.project).get(profile)
            self.access.check_run(probe, networks or [], self.reconcile)
            Projects(self.store).check_quotas(self.project, self.records.all, spec_in)
            inst, revision = self.records.create(name, spec_in, eng.id_range,
                                                  image.manifest.version)
        try:
            self.volumes.mark(inst)
            self.nets.create_ports(inst, eng, list(networks or []))
            measure, measured = self.guard.measurer(self.workdir(inst), verdict)
            spec = replace(self._launch_spec(inst, image), measure=measure,
                           cpus=self._place(inst), disk_keys=self._disk_keys(inst))
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
            self.nets.shape(inst)
        except BaseException:
            self._purge(inst)
            raise
        self.records.finish(inst, revision, State.RUNNING, "started")
        return inst

    def start(self, name: str, ready_timeout: float = 180.0,
              progress: Progress = _noop) -> Instance:
        """Start a stopped instance and wait until its guest is ready."""
        inst, rev = self.records.intent(name, "start")
        try:
            image = self.images.resolve(inst.spec.image, inst.project)[1]
            verdict = self.guard.image(image, inst.spec.image, inst.project)
            with decision_lock():  # our intent (starting) is recorded: decide after it
                self.access.check_run(inst, [p.network for p in self.nets.ports(inst)],
                                      self.reconcile)
            progress(f"booting {name}")
            self.nets.ensure_devices(inst)
            measure, measured = self.guard.measurer(self.workdir(inst), verdict)
            spec = replace(self._launch_spec(inst, image), measure=measure,
                           cpus=self._place(inst), disk_keys=self._disk_keys(inst))
            inst.runtime = self._engine(inst).start(spec, ready_timeout)
            inst.runtime.details["cpus"] = list(spec.cpus)
            inst.runtime.details["image_trust"] = verdict.to_doc()
            inst.runtime.details["measurement"] = measured[-1].value if measured else ""
            self.nets.shape(inst)
            self.records.finish(inst, rev, State.RUNNING, "started")
        except BaseException as exc:
            if inst.runtime is not None:  # started, then a later step failed: stopped again
                with contextlib.suppress(Exception):
                    self._engine(inst).stop(self._spec_for_running(inst), inst.runtime,
                                            True, 0)
                inst.runtime = None
            self.records.finish(inst, rev, State.STOPPED, "start failed", f"start failed: {exc}")
            raise
        return inst

    def stop(self, name: str, force: bool = False, timeout: float = 30.0) -> str:
        """Stop ``name``: ACPI power button, then force after ``timeout`` s.

        Returns ``graceful`` or ``forced``, or :data:`ALREADY_STOPPED` for a stopped
        instance (a success that changed nothing, as podman's stop).
        """
        if timeout < 0:
            raise InvalidInput(f"invalid timeout {timeout}: must be 0 or more seconds")
        try:
            inst, rev = self.records.intent(name, "stop")
        except StateError as exc:  # refused before anything was written
            if exc.state == State.STOPPED.value:
                return ALREADY_STOPPED
            raise
        assert inst.runtime is not None
        try:
            how = self._engine(inst).stop(self._spec_for_running(inst), inst.runtime, force,
                                          timeout)
        except BaseException:
            live = self._engine(inst).liveness(self._spec_for_running(inst), inst.runtime)
            if live.alive:
                self.records.finish(inst, rev, State.RUNNING, "stop failed")
            else:
                self.records.finish(inst, rev, State.STOPPED, "stopped", live.reason)
            raise
        inst.runtime = None
        self.records.finish(inst, rev, State.STOPPED, f"stopped ({how})",
                            f"stopped on request ({how})")
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
        inst, rev = self.records.load(name)
        new_state = transition(name, inst.state, operation)
        eng = self._engine(inst)
        require(eng, capability)
        assert inst.runtime is not None
        getattr(eng, operation)(self._spec_for_running(inst), inst.runtime)
        inst.state = new_state
        try:
            self.records.save(inst, rev, operation)
        except BaseException:  # not recorded: the engine goes back to what the record says
            undo = "resume" if operation == "pause" else "pause"
            with contextlib.suppress(Exception):
                getattr(eng, undo)(self._spec_for_running(inst), inst.runtime)
            raise

    def _exec_target(self, name: str, argv: list[str]) -> tuple[Instance, Engine]:
        """Check an exec request; return the running instance and its engine."""
        if not argv:
            raise InvalidInput("no command given: use popek exec NAME -- COMMAND [ARGS...]")
        inst = self.get(name)
        eng = self._engine(inst)
        require(eng, Capability.EXEC)
        if inst.state != State.RUNNING:
            raise refused(name, "exec", inst.state, (State.RUNNING.value,))
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
        """Set one key; see :meth:`config_update`."""
        return self.config_update(name, {key: value})

    def config_update(self, name: str, values: dict[str, str]) -> Instance:
        """Set keys of :data:`popek.core.config.CONFIG_KEYS`, all or none.

        A running instance gets the new limits at once when its engine can
        resize; otherwise the change is refused while it runs.  Invalid keys
        and out-of-range values raise :class:`InvalidInput` and change nothing;
        a live change that fails is undone before the error is raised.
        """
        if not values:
            raise InvalidInput(f"no KEY=VALUE given; keys: {', '.join(cfg.CONFIG_KEYS)}")
        inst, rev = self.records.load(name)
        before = replace(inst.spec, limits=dict(inst.spec.limits))
        lives = {cfg.apply(inst, cfg.check_key(k), v): k for k, v in values.items()}
        event = "config " + ", ".join(f"{k}={v}" for k, v in values.items())
        return self._config_commit(inst, rev, before, lives, event)

    def config_unset(self, name: str, keys: list[str]) -> Instance:
        """Put ``keys`` back to what the instance's profiles say now, else the built-in
        defaults (see :func:`popek.core.config.unset`), all or none, live where it can."""
        from popek.core.profiles import Profiles

        if not keys:
            raise InvalidInput(f"no KEY given; keys: {', '.join(cfg.CONFIG_KEYS)}")
        inst, rev = self.records.load(name)
        for key in keys:
            cfg.check_key(key)
        profiles = Profiles(self.store, inst.project)
        present = {p.name for p in profiles.all()}
        fallback, _ = profiles.resolve([p for p in inst.spec.profiles if p in present])
        disk = Projects(self.store).disk(inst.project)
        before = replace(inst.spec, limits=dict(inst.spec.limits))
        lives = {cfg.unset(inst, k, fallback, disk): k for k in keys}
        return self._config_commit(inst, rev, before, lives, "config unset " + ", ".join(keys))

    def config_show(self, name: str) -> dict[str, str]:
        """Every key set on instance ``name``, as text (``config show``, ``config get``)."""
        return cfg.show(self.get(name))

    def _config_commit(self, inst: Instance, rev: int, before: InstanceSpec,
                       lives: dict[cfg.Live, str], event: str) -> Instance:
        """Apply changes made to ``inst``'s spec (``lives``: what each needs, with a key
        that needs it) to the running instance, then record them; undo on failure.

        Every check comes first; then the live changes that can be undone (limits, then
        shaping), then the writable layer (it cannot shrink mounted), then the record.
        """
        name = inst.name
        Projects(self.store).check_quotas(inst.project, self.records.all, inst.spec, before)
        cpus = list(inst.runtime.details.get("cpus", [])) if inst.runtime else []
        running = inst.state in (State.RUNNING, State.PAUSED)
        eng = self._engine(inst)
        if cfg.Live.DISK in lives:
            if Capability.DISK_LIMIT not in eng.capabilities:
                raise InvalidInput("limits.disk applies to containers (their writable "
                                   "layer); a VM's root is its image")
            if inst.state not in (State.RUNNING, State.PAUSED, State.STOPPED):
                raise StateError(name, "change limits.disk of", inst.state.value,
                                 (State.PAUSED.value, State.RUNNING.value,
                                  State.STOPPED.value))
        if cfg.Live.RESIZE in lives:
            if running:
                require(eng, Capability.RESIZE)
            elif inst.state != State.STOPPED:
                raise StateError(name, "change the configuration of", inst.state.value,
                                 (State.PAUSED.value, State.RUNNING.value,
                                  State.STOPPED.value))
        if running and cfg.Live.IO in lives:
            require(eng, Capability.IO_LIMIT)
        done: list[cfg.Live] = []
        try:
            if running and cfg.Live.RESIZE in lives:
                assert inst.runtime is not None
                if before.vcpus != inst.spec.vcpus:  # more or fewer vCPUs: placed again
                    inst.runtime.details["cpus"] = list(self._place(inst))
                done.append(cfg.Live.RESIZE)
                eng.resize(self._spec_for_running(inst), inst.runtime)
            if running and cfg.Live.SHAPE in lives:
                done.append(cfg.Live.SHAPE)
                self.nets.shape(inst)
            if running and cfg.Live.IO in lives:
                assert inst.runtime is not None
                done.append(cfg.Live.IO)
                eng.set_io_limits(self._spec_for_running(inst), inst.runtime)
            if cfg.Live.DISK in lives:
                eng.resize_disk(self._spec_for_running(inst), inst.runtime if running else None)
            self.records.save(inst, rev, event)
        except BaseException:
            if done:
                self._unapply(inst, before, cpus, done)
            raise
        return inst

    def _unapply(self, inst: Instance, before: InstanceSpec, cpus: list[int],
                 done: list[cfg.Live]) -> None:
        """Put a running instance back to the limits its record still holds (best effort)."""
        inst.spec = before
        if inst.runtime is not None and cpus:
            inst.runtime.details["cpus"] = cpus
        for live in done:
            with contextlib.suppress(Exception):  # the first error is the one to report
                if live is cfg.Live.SHAPE:
                    self.nets.shape(inst)
                elif live is cfg.Live.IO and inst.runtime is not None:
                    self._engine(inst).set_io_limits(self._spec_for_running(inst),
                                                     inst.runtime)
                elif inst.runtime is not None:
                    self._engine(inst).resize(self._spec_for_running(inst), inst.runtime)

    def console_target(self, name: str) -> tuple[Instance, Engine]:
        """Check a console may attach to ``name``; its instance and engine."""
        inst = self.get(name)
        eng = self._engine(inst)
        require(eng, Capability.CONSOLE)
        if inst.state not in (State.RUNNING, State.PAUSED):
            raise refused(name, "attach a console to", inst.state,
                          (State.PAUSED.value, State.RUNNING.value))
        return inst, eng

    def console(self, name: str, escape: bytes = b"\x1d", attached: Progress = _noop) -> None:
        """Attach the caller's terminal to the console of running instance ``name``.

        ``attached(name)`` is called once the checks passed, just before the session.
        """
        inst, eng = self.console_target(name)
        attached(name)
        eng.console(self._spec_for_running(inst), escape)

    def open_console(self, name: str, size: tuple[int, int]) -> Channel:
        """The console of running instance ``name`` as a channel its caller relays."""
        inst, eng = self.console_target(name)
        return eng.open_console(self._spec_for_running(inst), size)

    def exec_target(self, name: str, argv: list[str]) -> None:
        """Check ``argv`` may run in ``name`` now (it runs, its engine can exec)."""
        self._exec_target(name, argv)

    def open_exec(self, name: str, argv: list[str], tty: bool,
                  size: tuple[int, int]) -> Channel:
        """Start ``argv`` in running instance ``name`` as a channel its caller relays."""
        inst, eng = self._exec_target(name, argv)
        require(eng, Capability.EXEC_STREAM)
        return eng.open_exec(self._spec_for_running(inst), argv, tty, size)

    def console_log(self, name: str) -> bytes:
        """Return what instance ``name`` wrote on its console since it last started."""
        inst = self.get(name)
        return self._engine(inst).console_log(self._spec_for_running(inst))

    def summaries(self, project: str | None = MINE) -> list[dict[str, Any]]:
        """Every instance (of ``project``), reconciled, as ``popek list`` shows it.

        Each with its network ports (their addresses from the store: one read
        for all instances, no netlink).  With :attr:`listings` (a long-running
        front end's), a listing still true is given again, not read again
        (:mod:`popek.core.listings`): the rows are shared, not to be changed.
        """
        which = self.project if project == MINE else project
        if self.listings is not None:
            kept = self.listings.fresh(self.store, which, self.reconciler)
            if kept is not None:
                return kept
            revision = self.store.revision()
        insts = self.settled(project)
        ports: dict[str, list[dict[str, Any]]] = {}
        for p in self.nets.all_ports():
            ports.setdefault(p.instance, []).append(port_json(p))
        rows = [{"name": i.name, "project": i.project, "state": i.state.value,
                 "reason": i.reason, "engine": i.spec.engine, "image": i.spec.image,
                 "vcpus": i.spec.vcpus, "memory": i.spec.memory, "label": i.spec.label,
                 "created": i.created, "pid": i.runtime.pid if i.runtime else None,
                 "ports": ports.get(owner_name(i), [])} for i in insts]
        if self.listings is not None:
            self.listings.keep(self.store, which, revision, insts, self.reconciler, rows)
        return rows

    def kept_summaries(self, project: str | None = MINE) -> list[dict[str, Any]] | None:
        """The listing :meth:`summaries` would give again unread, or ``None`` when it would
        read and settle (no kept listing, the store moved, an instance needs settling)."""
        if self.listings is None:
            return None
        return self.listings.fresh(self.store, self.project if project == MINE else project,
                                   self.reconciler)

    def quick_info(self, name: str) -> bool:
        """Whether :meth:`info` of ``name`` needs neither settling nor a round trip to an
        engine process: a container's (its state read from files) or an instance that does
        not run, which reconcile would leave as it is.  NotFound when there is none."""
        inst = self.get(name)
        running = inst.state in (State.RUNNING, State.PAUSED)
        return (inst.spec.engine in QUICK_INFO_ENGINES or not running) and \
            self.reconciler.settled_already(inst)

    def info(self, name: str) -> dict[str, Any]:
        """Return the record of ``name`` with live engine details when it runs."""
        inst = self.get(name)
        data: dict[str, Any] = {
            "name": inst.name, "project": inst.project, "state": inst.state.value,
            "reason": inst.reason, "engine": inst.spec.engine, "image": inst.spec.image,
            "image_version": inst.image_version, "label": inst.spec.label,
            "vcpus": inst.spec.vcpus,
            "memory": inst.spec.memory, "limits": dict(inst.spec.limits),
            "accel_requested": inst.spec.accel,
            "uid": inst.uid, "created": inst.created, "workdir": str(self.workdir(inst)),
            "history": inst.history,
            "ports": [port_json(p) for p in self.nets.ports(inst)],
            "volumes": list(inst.spec.volumes),
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
        inst, _ = self.records.intent(name, "delete")
        self._purge(inst)

    def _purge(self, inst: Instance) -> None:
        """Remove everything an instance left: engine leftovers, directory, uid, record.

        Files go first: on a full disk, what they free lets the store record the rest.
        """
        spec = self._spec_for_running(inst)
        with contextlib.suppress(PopekError):
            eng = self._engine(inst)
            eng.cleanup(spec)
            eng.destroy(spec)
        shutil.rmtree(self.workdir(inst), ignore_errors=True)
        self.nets.delete_ports(inst)
        self.volumes.free(inst)
        self.records.remove(inst)

    def _kill(self, inst: Instance) -> None:
        """End the engine process of an instance whose delete was interrupted."""
        if inst.runtime:
            proc.kill(inst.runtime.pid, inst.runtime.start_time)

    def image_in_use(self, image: str, project: str = DEFAULT_PROJECT) -> list[str]:
        """Return the names of instances that use image ``image`` of ``project``: those of
        ``project`` launched from that name, and for ``default``'s, those of any project
        without an image of its own of that name (``PROJECT/NAME`` outside ``default``)."""
        def uses(p: str) -> bool:
            if p == project:
                return True
            return project == DEFAULT_PROJECT and not (self.images.in_project(p).root
                                                       / image).is_dir()

        return [i.name if i.project == DEFAULT_PROJECT else f"{i.project}/{i.name}"
                for i in self.all(None) if i.spec.image == image and uses(i.project)]

