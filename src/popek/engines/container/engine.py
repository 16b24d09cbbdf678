"""The container engine: system containers on an OCI runtime (runc or crun).

Each container lives in its instance directory::

    <workdir>/bundle/config.json   the OCI runtime spec (engines/container/spec.py)
    <workdir>/bundle/rootfs/       an overlay: the image's shared base, id-mapped to the
                                   container's uid range, under its own upper layer
                                   (engines/container/rootfs.py); mounted on the host
                                   only while the runtime starts the container
    <workdir>/console.log          what the container's init wrote (stdout/stderr)
    <workdir>/init.pid             the init's pid, written by the runtime

The runtime's ``run --detach`` exits once init runs: no popek or runtime
process stays behind (no conmon-like monitor).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from popek import paths, proc
from popek.engines.base import Capability, ExecResult, LaunchSpec, Liveness, Runtime
from popek.engines.cgroupfs import IO_WEIGHT, io_weight_offered, set_io_limits, whole_disk
from popek.engines.container import cgroups, disk, netplumb, rootfs, runtime, volumes
from popek.engines.container.spec import ID_RANGE, Limits, build_spec
from popek.errors import EngineError
from popek.iolimits import IoLimits

if TYPE_CHECKING:
    from popek.engines.session import Channel
    from popek.network.model import Port

READY_LINE = b"popek-guest: ready"
SHUTDOWN_LINE = b"popek-guest: shutdown"
DEFAULT_PIDS = 1024
FREEZE_BUDGET_S = 10.0
DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "TERM=xterm", "HOME=/root", "container=popek"]


def container_id(spec: LaunchSpec) -> str:
    """The runtime's id of the container of ``spec``."""
    return f"popek-{spec.project}-{spec.name}"


def cgroups_path(spec: LaunchSpec) -> str:
    """The cgroup path (relative to each hierarchy) of the container of ``spec``.

    It carries this home's id (:func:`popek.paths.home_id`): cgroups are
    host-wide, and a container of the same name in another ``POPEK_HOME``
    must never share (and rewrite) its limits.
    """
    return f"/popek/{paths.home_id()}-{spec.project}-{spec.name}"


def limits_of(spec: LaunchSpec) -> Limits:
    """The cgroup limits of ``spec``: its memory, CPUs and pids, the default I/O
    weight where the host can weigh I/O, and its disk I/O limits on its writable layer."""
    io = IoLimits.of(spec.limits)
    return Limits(memory=spec.memory, cpus=float(spec.vcpus),
                  pids=int(spec.limits.get("pids", DEFAULT_PIDS)),
                  io_weight=IO_WEIGHT if io_weight_offered() else 0,
                  cpuset=",".join(str(c) for c in spec.cpus),
                  io=io, io_devices=io_devices(spec) if io else ())


def io_devices(spec: LaunchSpec) -> tuple[tuple[int, int], ...]:
    """The block devices the container of ``spec`` writes its own files to: its writable
    layer's loop device (while its file system is mounted), else the disk holding its
    bundle (a container made before ``limits.disk``)."""
    bundle = spec.workdir / "bundle"
    dev = disk.device(bundle)
    if dev is not None:
        return ((os.major(dev), os.minor(dev)),)
    try:
        return (whole_disk(os.stat(bundle).st_dev),)
    except OSError:
        return ()


class ContainerEngine:
    """Runs system containers with an OCI runtime, unprivileged through a user namespace."""

    name: ClassVar[str] = "container"
    capabilities: ClassVar[frozenset[Capability]] = frozenset({
        Capability.PAUSE, Capability.CONSOLE, Capability.EXEC, Capability.EXEC_STREAM,
        Capability.GRACEFUL_STOP, Capability.RESIZE, Capability.STATS, Capability.HOST_MOUNTS,
        Capability.NETWORK_HOTPLUG, Capability.DISK_LIMIT, Capability.DISK_HOTPLUG,
        Capability.IO_LIMIT,
    })
    id_range: ClassVar[int] = ID_RANGE
    port_kind: ClassVar[str] = "veth"
    volume_kind: ClassVar[str] = "filesystem"

    def _rt(self, spec: LaunchSpec) -> runtime.OciRuntime:
        return runtime.OciRuntime(runtime.choose(spec.runtime), paths.home() / "oci")

    def preflight(self, spec: LaunchSpec) -> None:
        """Check the runtime exists and the image has a root filesystem."""
        runtime.choose(spec.runtime)
        if spec.image is None or not spec.image.has("rootfs"):
            name = spec.image.name if spec.image else "?"
            raise EngineError(f"image {name!r} has no container root filesystem; "
                              "rebuild it (popek image build) or import one")

    def create(self, spec: LaunchSpec) -> None:
        """Make the container's layers over the image's verified base (made on first use)."""
        assert spec.image is not None
        bundle = spec.workdir / "bundle"
        bundle.mkdir(parents=True, exist_ok=True, mode=0o700)
        # the container's root (the first id of its range) must traverse to its rootfs;
        # nobody else may
        for d in (spec.workdir, bundle):
            os.chown(d, spec.uid, spec.gid)
            os.chmod(d, 0o700)
        rootfs.prepare(spec, self.id_range)

    def _write_config(self, spec: LaunchSpec,
                      binds: tuple[tuple[str, str, bool], ...] = ()) -> Path:
        bundle = spec.workdir / "bundle"
        process = spec.image.manifest.process if spec.image is not None else None
        args = list(process.args) if process and process.args else ["/sbin/init"]
        env = [*DEFAULT_ENV, f"POPEK_HOSTNAME={spec.name}", *(process.env if process else ())]
        cwd = process.working_dir if process and process.working_dir else "/"
        config = build_spec(hostname=spec.name, args=args, env=env, cwd=cwd, host_uid=spec.uid,
                            host_gid=spec.gid, limits=limits_of(spec),
                            cgroups_path=cgroups_path(spec), binds=(*spec.mounts, *binds))
        path = bundle / "config.json"
        path.write_text(json.dumps(config, indent=1))
        return path

    def start(self, spec: LaunchSpec, ready_timeout: float) -> Runtime:
        """Start the container detached; wait until its init runs (and says ready, if it can).

        Raises :class:`EngineError` when the runtime fails or init dies.
        """
        rt = self._rt(spec)
        cid = container_id(spec)
        self.cleanup(spec)
        rootfs.mount(spec, self.id_range)
        bundle = spec.workdir / "bundle"
        try:
            binds = volumes.mount_for_start(bundle, spec.fs_volumes, spec.uid, spec.gid,
                                            self.id_range)
        except BaseException:
            rootfs.unmount(spec)
            raise
        config = self._write_config(spec, tuple(binds))
        if spec.measure is not None:
            spec.measure(rt.binary(), config.read_bytes())
        pidfile = spec.workdir / "init.pid"
        log_path = spec.workdir / "console.log"
        try:
            with open(log_path, "wb") as log:
                rt.run_detached(cid, spec.workdir / "bundle", pidfile, log)
        finally:
            rootfs.detach(spec)  # the container holds its own copies now (or failed)
            volumes.unmount_staging(bundle)
        pid = int(pidfile.read_text().strip())
        started = proc.start_time(pid)
        if started is None:
            raise EngineError(f"the container's init exited at once: {_tail(log_path)}")
        result = Runtime(pid, started, {"runtime": rt.name, "id": cid, "disks": {
            ref: {"path": path} for ref, _file, path in spec.fs_volumes}})
        try:
            for i, port in enumerate(spec.ports):
                netplumb.plumb(port, spec.networks[port.network], pid, f"eth{i}")
        except BaseException:
            self._kill(spec, pid, started)
            raise
        deadline = time.monotonic() + ready_timeout
        # an image with its own process (OCI import) has no popek init to say ready:
        # there, "running" means its first process runs
        wants_ready = spec.image is not None and spec.image.manifest.process is None
        while wants_ready and READY_LINE not in log_path.read_bytes():
            if not proc.alive(pid, started):
                self.cleanup(spec)
                raise EngineError(f"the container stopped while starting: {_tail(log_path)}")
            if time.monotonic() > deadline:
                self._kill(spec, pid, started)
                raise EngineError(f"the container did not report ready within "
                                  f"{ready_timeout:.0f}s (see popek console --log)")
            time.sleep(0.005)
        if spec.fs_volumes and (any(spec.disk_limits) or IoLimits.of(spec.limits)):
            # the volumes' loop devices (the writable layer's limits are in config.json)
            try:
                self.set_io_limits(spec, result)
            except BaseException:
                self._kill(spec, pid, started)
                raise
        return result

    def _kill(self, spec: LaunchSpec, pid: int, started: int) -> None:
        proc.kill(pid, started)
        self.cleanup(spec)

    def stop(self, spec: LaunchSpec, rtime: Runtime, force: bool, timeout: float) -> str:
        """SIGTERM init (unless ``force``), SIGKILL after ``timeout``; return how it stopped."""
        rt = self._rt(spec)
        cid = container_id(spec)
        gone = lambda: not proc.alive(rtime.pid, rtime.start_time)  # noqa: E731
        how = "forced"
        if not force:
            state = rt.state(cid)
            if state and state.get("status") == "paused":
                rt.call("resume", cid)
            with contextlib.suppress(EngineError):
                rt.call("kill", cid, "TERM")
            if proc.wait_until(gone, timeout, 0.02):
                how = "graceful"
        if how == "forced":
            try:
                rt.call("kill", cid, "KILL")
            except EngineError:
                proc.kill(rtime.pid, rtime.start_time)
            if not proc.wait_until(gone, 5.0, 0.01):
                raise EngineError(f"container {spec.name} did not die after SIGKILL")
        self.cleanup(spec)
        return how

    def pause(self, spec: LaunchSpec, rtime: Runtime) -> None:
        """Freeze every process of the container (cgroup freezer).

        cgroup v1's freezer gives up while a task sleeps in I/O (runc: "unable
        to freeze"; measured here under a disk flood, about one pause in ten),
        and the runtime then thaws the container again.  A flood sleeps between
        its writes, so the pause is tried again for up to
        :data:`FREEZE_BUDGET_S` before the error is reported, with its cause.
        """
        rt, cid = self._rt(spec), container_id(spec)
        deadline = time.monotonic() + FREEZE_BUDGET_S
        while True:
            try:
                rt.call("pause", cid)
                return
            except EngineError as exc:
                if "unable to freeze" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise EngineError(
                        f"container {spec.name} could not be frozen within "
                        f"{FREEZE_BUDGET_S:.0f}s: its processes stay asleep in I/O, which "
                        "the cgroup v1 freezer cannot stop; try again when its I/O calms "
                        "down") from exc
                time.sleep(0.1)

    def resume(self, spec: LaunchSpec, rtime: Runtime) -> None:
        """Thaw a frozen container."""
        self._rt(spec).call("resume", container_id(spec))

    def liveness(self, spec: LaunchSpec, rtime: Runtime) -> Liveness:
        """Tell whether init runs; when not, why."""
        if proc.alive(rtime.pid, rtime.start_time):
            return Liveness(True)
        log = spec.workdir / "console.log"
        data = log.read_bytes() if log.exists() else b""
        if SHUTDOWN_LINE in data:
            return Liveness(False, "the container shut down")
        return Liveness(False, "the container's init exited unexpectedly (killed or crashed)")

    def container_status(self, spec: LaunchSpec, rtime: Runtime) -> str | None:
        """The status ``runc state`` reports, read where the runtime reads it, without
        running it (a fork and exec of milliseconds per ``popek info``): ``None`` when the
        runtime has no record of the container, ``stopped`` when its init is gone,
        ``paused`` when the cgroup freezer holds it, else ``running``."""
        name = str(rtime.details.get("runtime") or runtime.choose(spec.runtime))
        if not runtime.OciRuntime(name, paths.home() / "oci").knows(container_id(spec)):
            return None
        if not proc.alive(rtime.pid, rtime.start_time):
            return "stopped"
        return "paused" if cgroups.frozen(cgroups_path(spec)) else "running"

    def status(self, spec: LaunchSpec, rtime: Runtime) -> dict[str, Any]:
        """Return the container's status and the cgroup usage against the limits."""
        u = cgroups.usage(cgroups_path(spec))
        return {"container_status": self.container_status(spec, rtime),
                "runtime": rtime.details.get("runtime"),
                "pid": rtime.pid, "usage": {
                    "memory": u.memory, "memory_limit": u.memory_limit,
                    "pids": u.pids, "pids_limit": u.pids_limit, "cpu_seconds": u.cpu_seconds,
                    **rootfs.disk_usage(spec, rtime.pid)}}

    def resize(self, spec: LaunchSpec, rtime: Runtime) -> None:
        """Apply ``spec``'s limits to the running container at once (``update``)."""
        lim = limits_of(spec)
        cpuset = lim.cpuset or ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
        self._rt(spec).call(
            "update", "--memory", str(lim.memory), "--memory-swap", str(lim.memory),
            "--pids-limit", str(lim.pids), "--cpu-quota", str(int(lim.cpus * 100_000)),
            "--cpu-period", "100000", "--cpuset-cpus", cpuset, container_id(spec))
        # runc's update writes the throttles of config.json again, from the start
        self.set_io_limits(spec, rtime)

    def set_io_limits(self, spec: LaunchSpec, rtime: Runtime) -> None:
        """Write ``spec``'s disk I/O limits into the running container's cgroup (v1
        ``blkio.throttle.*``, v2 ``io.max``): the instance's on its writable layer's
        device, and on each mounted filesystem volume's loop device the volume's own
        (without one: the instance's; the kernel limits each device on its own)."""
        own = IoLimits.of(spec.limits)
        path = cgroups_path(spec)
        set_io_limits(path, io_devices(spec), own)
        mounted = rtime.details.get("disks", {})
        for i, (ref, file, where) in enumerate(spec.fs_volumes):
            if ref not in mounted:
                continue
            limits = spec.disk_limits[i] if i < len(spec.disk_limits) else IoLimits()
            set_io_limits(path, [volumes.device(rtime.pid, file, where)], limits or own)

    def resize_disk(self, spec: LaunchSpec, runtime: Runtime | None) -> None:
        """Grow the writable layer (live too, where the host lets ext4 grow online);
        shrink it while stopped only."""
        rootfs.resize_disk(spec, running=runtime is not None)

    def attach_port(self, spec: LaunchSpec, rtime: Runtime, port: Port) -> None:
        """Move the port's veth end into the running container as the next ethN."""
        netplumb.plumb(port, spec.networks[port.network], rtime.pid,
                       netplumb.next_ifname(rtime.pid))

    def detach_port(self, spec: LaunchSpec, rtime: Runtime, port: Port) -> None:
        """Remove the port's interface from the running container."""
        netplumb.unplumb(port.mac, rtime.pid)

    def attach_disk(self, spec: LaunchSpec, rtime: Runtime, ref: str, files: list[str],
                    path: str = "", key: str = "") -> None:
        """Mount filesystem volume ``ref`` (its file ``files[0]``) at ``path`` in the running
        container, owned by its id range (a filesystem volume is never encrypted: no
        ``key``)."""
        disks: dict[str, dict[str, Any]] = rtime.details.setdefault("disks", {})
        volumes.attach_live(rtime.pid, files[0], path, spec.uid, spec.gid,
                            spec.workdir / "bundle")
        disks[ref] = {"path": path}
        if any(spec.disk_limits) or IoLimits.of(spec.limits):
            self.set_io_limits(spec, rtime)

    def _volume(self, spec: LaunchSpec, rtime: Runtime, ref: str) -> tuple[str, str]:
        found = next(((f, p) for r, f, p in spec.fs_volumes if r == ref), None)
        if found is None or ref not in rtime.details.get("disks", {}):
            raise EngineError(f"volume {ref} is not mounted in {spec.name}")
        return found

    def detach_disk(self, spec: LaunchSpec, rtime: Runtime, ref: str) -> None:
        """Unmount volume ``ref`` from the running container."""
        _file, path = self._volume(spec, rtime, ref)
        volumes.detach_live(rtime.pid, path)
        rtime.details.get("disks", {}).pop(ref, None)

    def grow_disk(self, spec: LaunchSpec, rtime: Runtime, ref: str, size: int) -> None:
        """Grow volume ``ref``'s file system to ``size`` bytes while the container runs."""
        file, path = self._volume(spec, rtime, ref)
        volumes.grow_live(rtime.pid, file, path, size, spec.workdir / "bundle")

    def quiesce_disk(self, spec: LaunchSpec, rtime: Runtime,
                     ref: str) -> AbstractContextManager[None]:
        """Volume ``ref``'s file system frozen in the running container (FIFREEZE) for the
        time of a ``with`` block."""
        file, path = self._volume(spec, rtime, ref)
        return volumes.frozen(rtime.pid, file, path)

    def exec(self, spec: LaunchSpec, argv: list[str], stdin: bytes, timeout: float) -> ExecResult:
        """Run ``argv`` in the container and capture its output."""
        cmd = self._rt(spec).exec_argv(container_id(spec), argv, False, DEFAULT_ENV)
        try:
            p = subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise EngineError(f"the command did not finish within {timeout:.0f}s") from exc
        return ExecResult(p.returncode, p.stdout, p.stderr)

    def exec_stream(self, spec: LaunchSpec, argv: list[str], tty: bool) -> int:
        """Run ``argv`` in the container on the caller's stdio (a terminal if ``tty``)."""
        cmd = self._rt(spec).exec_argv(container_id(spec), argv, tty, DEFAULT_ENV)
        return subprocess.run(cmd, check=False, stdin=sys.stdin, stdout=sys.stdout,
                              stderr=sys.stderr).returncode

    def console(self, spec: LaunchSpec, escape: bytes) -> None:
        """Open a login shell in the container on the caller's terminal (exit to detach)."""
        self.exec_stream(spec, ["/bin/sh", "-l"], os.isatty(0))

    def open_exec(self, spec: LaunchSpec, argv: list[str], tty: bool,
                  size: tuple[int, int]) -> Channel:
        """Start ``argv`` in the container for a front end to relay (a terminal if ``tty``)."""
        from popek.engines.session import pipe_process, pty_process

        cmd = self._rt(spec).exec_argv(container_id(spec), argv, tty, DEFAULT_ENV)
        return pty_process(cmd, size) if tty else pipe_process(cmd)

    def open_console(self, spec: LaunchSpec, size: tuple[int, int]) -> Channel:
        """A login shell on a terminal in the container, as :meth:`console` gives the CLI."""
        return self.open_exec(spec, ["/bin/sh", "-l"], True, size)

    def console_log(self, spec: LaunchSpec) -> bytes:
        """Return what the container's init wrote since it last started."""
        log = spec.workdir / "console.log"
        return log.read_bytes() if log.exists() else b""

    def cleanup(self, spec: LaunchSpec) -> None:
        """Delete the runtime's record of the container (killing strays), its cgroups and
        the mount of its root filesystem."""
        rt = self._rt(spec)
        cid = container_id(spec)
        if rt.state(cid) is not None:
            with contextlib.suppress(EngineError):
                rt.call("delete", "--force", cid)
        cgroups.remove(cgroups_path(spec))
        (spec.workdir / "init.pid").unlink(missing_ok=True)
        rootfs.unmount(spec)
        volumes.unmount_staging(spec.workdir / "bundle")

    def destroy(self, spec: LaunchSpec) -> None:
        """Remove the container's layers (on delete), and its base if nothing else uses it."""
        rootfs.remove(spec)


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no message"
    return " | ".join(lines[-3:]) or "no message"


