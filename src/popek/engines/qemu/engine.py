"""The QEMU engine: virtual machines under KVM or TCG with virtio devices."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from popek import proc
from popek.engines import cgroupfs
from popek.engines.base import Capability, ExecResult, LaunchSpec, Liveness, RbdDisk, Runtime
from popek.engines.qemu import accel as accel_mod
from popek.engines.qemu import consolelog, jail, process, qmp, vtpm
from popek.engines.qemu.cmdline import (
    ROOT_PORTS,
    SHARED_GROUP,
    Paths,
    build_argv,
    disk_blockdevs,
    disk_buses,
    disk_device,
    disk_id,
    disk_node,
    disk_secret,
    disk_throttles,
    disk_top,
    find_qemu,
    netdev_id,
    nic_id,
    rbd_blockdevs,
    rbd_key_path,
    rbd_secret,
    root_port,
    throttle_group,
    throttle_limits,
    throttle_object,
)
from popek.engines.qemu.keyfifo import KeyFifo
from popek.engines.qemu.tap import open_tap
from popek.errors import CapabilityError, EngineError
from popek.iolimits import IoLimits
from popek.watch import wait_for_line

if TYPE_CHECKING:
    from popek.engines.session import Channel
    from popek.network.model import Port

READY_LINE = b"popek-guest: ready"
SHUTDOWN_LINE = b"popek-guest: shutdown"
POWER_DOWN = b"reboot: Power down"
PANIC = b"Kernel panic"
KVM_GROUP_DEV = Path("/dev/kvm")


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


#: how much of the console log's end is searched for the reason QEMU is gone
REASON_TAIL = 64 << 10


def exit_reason(paths: Paths) -> str:
    """Explain why QEMU is gone, from what the guest and QEMU last wrote."""
    try:
        log = consolelog.tail(paths.console_log, REASON_TAIL)
    except EngineError:
        log = b""
    if PANIC in log:
        return "the guest kernel panicked (see popek console --log)"
    if POWER_DOWN in log or SHUTDOWN_LINE in log:
        return "the guest powered off"
    detail = _tail(paths.stderr)
    reason = "QEMU exited unexpectedly (killed or crashed)"
    return f"{reason}: {detail}" if detail else reason


def _names(pid: int, path: Path) -> bool:
    """Whether the command line of ``pid`` contains ``path``."""
    try:
        return str(path).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _remove_boot_files(p: Paths) -> None:
    for role in ("kernel", "initrd"):
        p.boot_file(role).unlink(missing_ok=True)


def open_disks(disks: Sequence[tuple[str, Sequence[str]]]) -> list[list[int]]:
    """Open each volume's files for QEMU: its own read-write, its backing files read-only
    (every descriptor closed again when one cannot be opened)."""
    opened: list[list[int]] = []
    try:
        for name, files in disks:
            fds: list[int] = []
            opened.append(fds)
            for i, f in enumerate(files):
                try:
                    fds.append(os.open(f, (os.O_RDONLY if i else os.O_RDWR) | os.O_CLOEXEC))
                except OSError as exc:
                    raise EngineError(f"cannot open volume {name} ({f}): {exc.strerror}") \
                        from exc
    except BaseException:
        for fd in (fd for fds in opened for fd in fds):
            os.close(fd)
        raise
    return opened


def _refs(spec: LaunchSpec) -> list[str]:
    """The volumes of ``spec`` a VM has as disks, in the order of ``spec.disk_limits``:
    those with files, then the RBD images."""
    return [r for r, _ in spec.disks] + [d.name for d in spec.rbd_disks]


def _limits_of(spec: LaunchSpec, ref: str) -> IoLimits:
    """The I/O limits of volume ``ref`` of ``spec`` (none when it has none)."""
    refs = _refs(spec)
    i = refs.index(ref) if ref in refs else len(spec.disk_limits)
    return spec.disk_limits[i] if i < len(spec.disk_limits) else IoLimits()


def _free_ports(runtime: Runtime) -> list[str]:
    """The PCIe root ports of the VM that no NIC and no disk holds."""
    used = set(runtime.details.get("nics", {}).values())
    used |= {d.get("bus") for d in runtime.details.get("disks", {}).values()}
    return [root_port(i) for i in range(ROOT_PORTS) if root_port(i) not in used]


def _remove_nodes(sock: Path, slot: int, depth: int, fdsets: Sequence[int]) -> None:
    """Delete the block nodes of the disk in ``slot`` (``depth`` files), top first, and
    its fd sets: best effort (what was never added is not there to delete)."""
    cmds: list[tuple[str, Mapping[str, object] | None]] = [
        ("blockdev-del", {"node-name": str(node["node-name"])})
        for node in reversed(disk_throttles(slot))]
    for i in range(depth):
        cmds += [("blockdev-del", {"node-name": disk_node(slot, i)}),
                 ("blockdev-del", {"node-name": f"{disk_node(slot, i)}-file"})]
    cmds += [("object-del", {"id": throttle_group(slot)})]
    cmds += [("remove-fd", {"fdset-id": s}) for s in fdsets]
    cmds += [("object-del", {"id": disk_secret(slot)})]  # an encrypted disk's key
    cmds += [("object-del", {"id": rbd_secret(slot)})]  # an RBD disk's Ceph client key
    for cmd in cmds:  # one at a time: a node never added must not stop the rest
        with contextlib.suppress(EngineError):
            qmp.execute(sock, *cmd)


class QemuEngine:
    """Runs each instance as one unprivileged, sandboxed, detached QEMU process."""

    name: ClassVar[str] = "qemu"
    id_range: ClassVar[int] = 1
    port_kind: ClassVar[str] = "tap"
    volume_kind: ClassVar[str] = "block"
    capabilities: ClassVar[frozenset[Capability]] = frozenset({
        Capability.PAUSE, Capability.CONSOLE, Capability.EXEC, Capability.EXEC_STREAM,
        Capability.GRACEFUL_STOP, Capability.NETWORK_HOTPLUG, Capability.DISK_HOTPLUG,
        Capability.IO_LIMIT,
    })

    # -- start -------------------------------------------------------------
    def preflight(self, spec: LaunchSpec) -> None:
        """Check QEMU is installed, the accelerator usable and the image bootable."""
        find_qemu()
        accel_mod.choose(spec.accel)
        if spec.image is not None and not (spec.image.has("kernel") and spec.image.has("initrd")):
            raise EngineError(f"image {spec.image.name!r} has no kernel and initrd to boot a VM; "
                              "launch it with --container")

    def create(self, spec: LaunchSpec) -> None:
        """Nothing to prepare: the kernel and initrd are read from the image at each start."""

    def destroy(self, spec: LaunchSpec) -> None:
        """Nothing beyond the instance directory, which core removes."""

    def _prepare(self, spec: LaunchSpec, p: Paths) -> None:
        spec.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chown(spec.workdir, spec.uid, spec.gid)
        os.chmod(spec.workdir, 0o700)
        self.cleanup(spec)
        for f in (p.console_log, p.stderr):
            f.unlink(missing_ok=True)
        if spec.image is None:
            raise EngineError(f"the image of {spec.name} no longer exists")
        for role in ("kernel", "initrd"):
            # QEMU boots from a root-owned copy whose hash is computed on the
            # very bytes written: nothing can be swapped between check and use.
            spec.image.copy_verified(role, p.boot_file(role))

    def start(self, spec: LaunchSpec, ready_timeout: float) -> Runtime:
        """Start QEMU jailed and detached as the instance uid; wait for the guest's ready line.

        QEMU runs in a mount namespace of its own that holds only what it
        needs, inside a cgroup with the instance's limits (see ``jail.py``).
        Raises :class:`EngineError` when QEMU is missing, exits early, or the
        guest is not ready within ``ready_timeout`` seconds (QEMU is then killed).
        """
        qemu = find_qemu()
        accel = accel_mod.choose(spec.accel)
        p = Paths(spec.workdir)
        plan = jail.mount_plan(spec.workdir, accel == "kvm", qemu)
        jail.prepare_host()
        self._prepare(spec, p)
        pidfile = spec.workdir / "qemu.pid"
        tap_fds: list[int] = []
        disk_fds: list[list[int]] = []
        fifos: list[KeyFifo] = []
        try:
            for port in spec.ports:
                tap_fds.append(open_tap(port.host_ifname))
            disk_fds = open_disks(spec.disks)
            fifos = [KeyFifo(p.disk_key(d), key, spec.uid, spec.gid)
                     for d, key in enumerate(spec.disk_keys) if key]
            argv = [*build_argv(spec, accel, qemu, tap_fds, disk_fds), "-pidfile", str(pidfile)]
            p.argv.write_text(json.dumps(argv))
            value = spec.measure(qemu, p.argv.read_bytes()) if spec.measure else "00" * 32
            vtpm.write_measurement(spec.workdir, value)
            fifos += [KeyFifo(rbd_key_path(spec.workdir, i), disk.key, spec.uid, spec.gid)
                      for i, disk in enumerate(spec.rbd_disks)]
            fifos += [KeyFifo(p.disk_key(len(spec.disks) + i), disk.luks, spec.uid, spec.gid)
                      for i, disk in enumerate(spec.rbd_disks) if disk.luks]
            vtpm.start(spec.workdir, spec.uid, spec.gid)
            consolelog.start(p.console_log, spec.uid, spec.gid)
            kvm_gid = KVM_GROUP_DEV.stat().st_gid if accel == "kvm" else 0
            groups = [kvm_gid] if kvm_gid != 0 else []  # never root's group
            cgroup = jail.cgroup_path(spec)
            process.spawn_jailed(argv, spec.uid, spec.gid, groups, p.stderr,
                                 jail.fstab(plan, jail.jail_root()), cgroup,
                                 jail.limits(spec, accel),
                                 (*tap_fds, *(fd for fds in disk_fds for fd in fds)),
                                 cpus=spec.cpus)
            if not proc.wait_until(lambda: pidfile.exists() and pidfile.read_text().strip() != "",
                                   10.0):
                raise EngineError(f"QEMU did not start: {_tail(p.stderr) or 'no message'}")
            pid = int(pidfile.read_text().strip())
            started = proc.start_time(pid)
            if started is None:
                raise EngineError(f"QEMU exited at once: {_tail(p.stderr) or 'no message'}")
        except BaseException:
            for fifo in fifos:
                fifo.close()
            with contextlib.suppress(EngineError):
                self.cleanup(spec)  # a launcher or QEMU half way, and the cgroup
            raise
        finally:
            for fd in (*tap_fds, *(fd for fds in disk_fds for fd in fds)):
                os.close(fd)
        nics = {port.host_ifname: root_port(i) for i, port in enumerate(spec.ports)}
        disks: dict[str, dict[str, Any]] = {}
        fdset = 0
        for d, ((ref, files), bus) in enumerate(zip(spec.disks, disk_buses(spec), strict=True)):
            disks[ref] = {"slot": d, "bus": bus, "fdsets": list(range(fdset + 1,
                                                                    fdset + 1 + len(files)))}
            fdset += len(files)
        for i, disk in enumerate(spec.rbd_disks):  # opened by QEMU itself: no fd sets
            slot = len(spec.disks) + i
            disks[disk.name] = {"slot": slot, "bus": root_port(len(spec.ports) + slot),
                                "fdsets": []}
        runtime = Runtime(pid, started, {"accel": accel, "nics": nics, "disks": disks,
                                         "cgroup": cgroup})
        try:
            self._wait_ready(p, runtime, ready_timeout)
        except BaseException:
            proc.kill(pid, started)
            self.cleanup(spec)
            raise
        finally:
            # QEMU read both at machine creation and keeps them for resets; the disks'
            # keys when it made its secret objects, before the machine.
            _remove_boot_files(p)
            for fifo in fifos:
                fifo.close()
        return runtime

    def _wait_ready(self, p: Paths, runtime: Runtime, timeout: float) -> None:
        """Sleep on inotify until the console log shows the ready line (no busy polling)."""
        if not wait_for_line(p.console_log, READY_LINE, timeout,
                             lambda: proc.alive(runtime.pid, runtime.start_time)):
            if not proc.alive(runtime.pid, runtime.start_time):
                raise EngineError(f"the instance stopped while booting: {exit_reason(p)}")
            raise EngineError(f"the guest did not report ready within {timeout:.0f}s "
                              "(see popek console --log)")

    # -- stop, pause, resume ----------------------------------------------
    def stop(self, spec: LaunchSpec, runtime: Runtime, force: bool, timeout: float) -> str:
        """Press the ACPI power button and wait ``timeout`` s; then quit QEMU by force.

        Returns ``graceful`` or ``forced``.
        """
        p = Paths(spec.workdir)
        gone = lambda: not proc.alive(runtime.pid, runtime.start_time)  # noqa: E731
        if not force:
            try:
                status = qmp.execute(p.qmp, "query-status")
                if status.get("status") == "paused":
                    qmp.execute(p.qmp, "cont")
                qmp.execute(p.qmp, "system_powerdown")
            except EngineError:
                pass
            if proc.wait_until(gone, timeout, 0.05):
                self.cleanup(spec)
                return "graceful"
        with contextlib.suppress(EngineError):
            qmp.execute(p.qmp, "quit", timeout=2.0)
        if not proc.wait_until(gone, 2.0, 0.02):
            proc.kill(runtime.pid, runtime.start_time)
        self.cleanup(spec)
        return "forced"

    def pause(self, spec: LaunchSpec, runtime: Runtime) -> None:
        """Stop the vCPUs (QMP ``stop``); the guest clock stops with them."""
        qmp.execute(Paths(spec.workdir).qmp, "stop")

    def resume(self, spec: LaunchSpec, runtime: Runtime) -> None:
        """Restart the vCPUs (QMP ``cont``)."""
        qmp.execute(Paths(spec.workdir).qmp, "cont")

    # -- observation -------------------------------------------------------
    def liveness(self, spec: LaunchSpec, runtime: Runtime) -> Liveness:
        """Tell whether QEMU runs; when not, why (from the console and QEMU logs)."""
        if proc.alive(runtime.pid, runtime.start_time):
            return Liveness(True)
        return Liveness(False, exit_reason(Paths(spec.workdir)))

    def status(self, spec: LaunchSpec, runtime: Runtime) -> dict[str, Any]:
        """Return QEMU's run state and the chosen accelerator."""
        st = qmp.execute(Paths(spec.workdir).qmp, "query-status")
        return {"vm_status": st.get("status"), "accel": runtime.details.get("accel"),
                "pid": runtime.pid}

    def attach_port(self, spec: LaunchSpec, runtime: Runtime, port: Port) -> None:
        """Hot-plug a virtio-net NIC on the port's tap into a free PCIe root port."""
        nics: dict[str, str] = runtime.details.setdefault("nics", {})
        free = _free_ports(runtime)
        if not free:
            raise EngineError(f"{spec.name} has no free PCIe slot left ({ROOT_PORTS} NICs and "
                              "disks at most)")
        sock = Paths(spec.workdir).qmp
        fd = open_tap(port.host_ifname)
        try:
            qmp.execute_with_fd(sock, fd, netdev_id(port), [
                ("netdev_add", {"type": "tap", "id": netdev_id(port), "fd": netdev_id(port),
                                "vhost": False})])
        finally:
            os.close(fd)
        try:
            qmp.execute(sock, "device_add", {"driver": "virtio-net-pci",
                                             "netdev": netdev_id(port), "mac": port.mac,
                                             "id": nic_id(port), "bus": free[0]})
        except EngineError:
            with contextlib.suppress(EngineError):
                qmp.execute(sock, "netdev_del", {"id": netdev_id(port)})
            raise
        nics[port.host_ifname] = free[0]

    def detach_port(self, spec: LaunchSpec, runtime: Runtime, port: Port,
                    timeout: float = 30.0) -> None:
        """Ask the guest to release the NIC (PCIe hot-unplug), then remove its tap backend."""
        sock = Paths(spec.workdir).qmp
        qmp.execute(sock, "device_del", {"id": nic_id(port)})

        def gone() -> bool:
            peripherals = qmp.execute(sock, "qom-list", {"path": "/machine/peripheral"})
            return nic_id(port) not in {p["name"] for p in peripherals}

        if not proc.wait_until(gone, timeout, 0.2):
            raise EngineError(f"the guest of {spec.name} did not release its NIC on "
                              f"{port.network} within {timeout:.0f}s")
        qmp.execute(sock, "netdev_del", {"id": netdev_id(port)})
        runtime.details.get("nics", {}).pop(port.host_ifname, None)

    # -- disks plugged in and out while running ------------------------------------------
    def attach_disk(self, spec: LaunchSpec, runtime: Runtime, ref: str, files: list[str],
                    path: str = "", key: str = "") -> None:
        """Hot-plug volume ``ref`` (``POOL/NAME``, its ``files``: its own first, then its
        backing files) as a virtio-blk disk into a free PCIe root port of the running VM.

        QEMU gets descriptors (``add-fd``), never paths, and the chain node by node, as at
        start; a refusal half way removes what was added.  An encrypted volume's ``key``
        goes over the monitor socket (``object-add`` of a ``secret``; the socket is the
        instance's alone), never a command line or a file."""
        disks: dict[str, dict[str, Any]] = runtime.details.setdefault("disks", {})
        if ref in disks:
            raise EngineError(f"volume {ref} is already a disk of {spec.name}")
        free = _free_ports(runtime)
        if not free:
            raise EngineError(f"{spec.name} has no free PCIe slot left ({ROOT_PORTS} NICs and "
                              "disks at most): detach one first")
        used = {int(d["slot"]) for d in disks.values()}
        slot = next(i for i in range(len(used) + 1) if i not in used)
        sock = Paths(spec.workdir).qmp
        limits = _limits_of(spec, ref)
        objects = {o["name"] for o in qmp.execute(sock, "qom-list", {"path": "/objects"})}
        shared: list[tuple[str, Mapping[str, object]]] = [] if SHARED_GROUP in objects else [
            ("object-add", throttle_object(SHARED_GROUP, IoLimits.of(spec.limits)))]
        rbd = next((d for d in spec.rbd_disks if d.name == ref), None)
        if rbd is not None:
            self._attach_rbd(sock, slot, rbd, key or rbd.luks, limits, shared, free[0])
            disks[ref] = {"slot": slot, "bus": free[0], "fdsets": []}
            return
        if not files:
            raise EngineError(f"volume {ref} has no files and is no RBD image of {spec.name}")
        fds = open_disks([(ref, files)])[0]
        sets: list[int] = []

        def build(fdsets: list[int]) -> list[tuple[str, Mapping[str, object]]]:
            sets.extend(fdsets)
            secret: list[tuple[str, Mapping[str, object]]] = [("object-add", {
                "qom-type": "secret", "id": disk_secret(slot), "data": key})] if key else []
            return [*secret, *(("blockdev-add", node)
                               for node in disk_blockdevs(slot, fdsets, bool(key))),
                    *shared, ("object-add", throttle_object(throttle_group(slot), limits)),
                    *(("blockdev-add", node) for node in disk_throttles(slot)),
                    ("device_add", disk_device(slot, ref, free[0]))]

        try:
            qmp.execute_with_fdsets(sock, fds, build)
        except EngineError:
            _remove_nodes(sock, slot, len(files), sets)
            raise
        finally:
            for fd in fds:
                os.close(fd)
        disks[ref] = {"slot": slot, "bus": free[0], "fdsets": sets}

    @staticmethod
    def _attach_rbd(sock: Path, slot: int, disk: RbdDisk, luks: str, limits: IoLimits,
                    shared: list[tuple[str, Mapping[str, object]]], bus: str) -> None:
        """Hot-plug the Ceph volume ``disk`` into ``slot`` on root port ``bus``, in one QMP
        session: its client key (and, encrypted, its own key ``luks``) as ``secret``
        objects whose data passes over the monitor socket (the instance's alone), never
        a command line or a file; then its rbd node, its throttle filters and the device.
        Like the disks plugged in at start, QEMU's rbd driver needs no configuration file
        or keyring in its jail: the monitors are given as ``server``.  A refusal half way
        removes what was added."""
        nodes = rbd_blockdevs(slot, disk if disk.luks == luks else replace(disk, luks=luks))
        cmds: list[tuple[str, Mapping[str, object] | None]] = [
            ("object-add", {"qom-type": "secret", "id": rbd_secret(slot), "data": disk.key,
                            "format": "base64"})]
        if luks:
            cmds.append(("object-add", {"qom-type": "secret", "id": disk_secret(slot),
                                        "data": luks}))
        cmds += [*(("blockdev-add", n) for n in nodes), *shared,
                 ("object-add", throttle_object(throttle_group(slot), limits)),
                 *(("blockdev-add", n) for n in disk_throttles(slot)),
                 ("device_add", disk_device(slot, disk.name, bus))]
        try:
            qmp.execute_many(sock, cmds, timeout=30.0)
        except EngineError:
            _remove_nodes(sock, slot, 1, [])
            raise

    def detach_disk(self, spec: LaunchSpec, runtime: Runtime, ref: str,
                    timeout: float = 30.0) -> None:
        """Ask the guest to release the disk of ``ref`` (PCIe hot-unplug), then close its
        nodes and descriptors: QEMU holds none of the volume's files afterwards."""
        disks: dict[str, dict[str, Any]] = runtime.details.get("disks", {})
        disk = disks.get(ref)
        if disk is None:
            raise EngineError(f"volume {ref} is not a disk of {spec.name}")
        slot = int(disk["slot"])
        sock = Paths(spec.workdir).qmp
        if disk.get("bus", "pcie.0") == "pcie.0":
            raise EngineError(f"the disk of {ref} sits where it cannot be unplugged (it was "
                              f"attached before popek plugged disks into root ports): stop "
                              f"{spec.name} first")

        def gone() -> bool:
            peripherals = qmp.execute(sock, "qom-list", {"path": "/machine/peripheral"})
            return disk_id(slot) not in {p["name"] for p in peripherals}

        if not gone():  # else: unplugged by a detach that was killed before its record
            qmp.execute(sock, "device_del", {"id": disk_id(slot)})
        if not proc.wait_until(gone, timeout, 0.2):
            raise EngineError(f"the guest of {spec.name} did not release the disk of {ref} "
                              f"within {timeout:.0f}s")
        _remove_nodes(sock, slot, len(disk.get("fdsets", [])) or 1,  # an rbd disk: 1 node
                      list(disk.get("fdsets", [])))
        disks.pop(ref, None)

    def quiesce_disk(self, spec: LaunchSpec, runtime: Runtime,
                     ref: str) -> AbstractContextManager[None]:
        """Refused: a running VM's disk is written by its guest's own file system, which
        popek cannot freeze from outside (no guest agent); stop the VM or detach it."""
        raise EngineError(f"volume {ref} is in use by running VM {spec.name}: popek cannot "
                          "hold a VM's disk still; stop the VM or detach the volume first")

    def grow_disk(self, spec: LaunchSpec, runtime: Runtime, ref: str, size: int) -> None:
        """Grow the disk of ``ref`` to ``size`` bytes under the running guest (QMP
        ``block_resize``: QEMU grows the file and tells the guest the new capacity)."""
        disk = runtime.details.get("disks", {}).get(ref)
        if disk is None:
            raise EngineError(f"volume {ref} is not a disk of {spec.name}")
        # the top node (its throttle filter passes the resize down): only the node the
        # device sits on tells the guest; a VM started without filters has its own on top
        slot = int(disk["slot"])
        sock = Paths(spec.workdir).qmp
        try:
            qmp.execute(sock, "block_resize", {"node-name": disk_top(slot), "size": size},
                        timeout=60.0)
        except EngineError:
            qmp.execute(sock, "block_resize", {"node-name": disk_node(slot, 0), "size": size},
                        timeout=60.0)

    def exec_stream(self, spec: LaunchSpec, argv: list[str], tty: bool) -> int:
        """Run ``argv`` in the guest with its output streamed to the caller's stdout/stderr.

        With ``tty`` (the caller's stdin and stdout are terminals) the command
        runs on a new terminal in the guest, relayed to the caller's in raw
        mode (:mod:`popek.engines.qemu.ptyexec`); an image whose agent
        predates terminals runs it without one and with no input, as
        before, after a note.  Otherwise the caller's stdin is read to its
        end first (at most ``agent.MAX_STDIN`` bytes) and sent with the
        command.  The output is written as it arrives, kept nowhere, and has
        no size or time limit: interrupting the client ends the command.
        """
        from popek.engines.qemu.agent import MAX_STDIN, STREAM_START_TIMEOUT, AgentClient

        client = AgentClient(Paths(spec.workdir).agent, STREAM_START_TIMEOUT)
        if tty:
            from popek.engines.qemu.agent import NoTerminal
            from popek.engines.qemu.ptyexec import on_terminal

            try:
                return on_terminal(client, argv)
            except NoTerminal as exc:
                print(f"popek: {exc}; running it without one", file=sys.stderr, flush=True)
        stdin = b""
        if not tty and not os.isatty(0):
            with os.fdopen(os.dup(0), "rb") as f:  # buffered: read(n) reads until n or EOF
                stdin = f.read(MAX_STDIN + 1) or b""
        return client.exec_stream(argv, stdin, 1, 2)

    def resize(self, spec: LaunchSpec, runtime: Runtime) -> None:
        """Not offered yet for VMs: change CPUs and memory while the VM is stopped."""
        raise CapabilityError("the qemu engine cannot resize a running VM yet; stop it first")

    def resize_disk(self, spec: LaunchSpec, runtime: Runtime | None) -> None:
        """Not for VMs: their root is their image (volumes come with storage pools)."""
        raise CapabilityError("limits.disk applies to containers (their writable layer); "
                              "a VM's root is its image")

    def set_io_limits(self, spec: LaunchSpec, runtime: Runtime) -> None:
        """Give the throttle groups of the running VM ``spec``'s limits (``qom-set``, all in
        one QMP session): each volume's group and the one its disks share."""
        def qom(group: str, limits: IoLimits) -> tuple[str, Mapping[str, object] | None]:
            return ("qom-set", {"path": f"/objects/{group}", "property": "limits",
                                "value": throttle_limits(limits, every=True)})

        slots = {ref: int(d["slot"]) for ref, d in runtime.details.get("disks", {}).items()}
        commands = [qom(SHARED_GROUP, IoLimits.of(spec.limits))]
        commands += [qom(throttle_group(slots[ref]), _limits_of(spec, ref))
                     for ref in _refs(spec) if ref in slots]
        try:
            qmp.execute_many(Paths(spec.workdir).qmp, commands)
        except EngineError as exc:
            raise EngineError(f"{exc} (a VM started before popek had I/O limits has no "
                              f"throttle groups: restart {spec.name} to give it them)") from exc

    def exec(self, spec: LaunchSpec, argv: list[str], stdin: bytes, timeout: float) -> ExecResult:
        """Run ``argv`` in the guest through the agent channel; return its whole output.

        Bounded: the answer within ``timeout`` seconds, at most
        ``agent.MAX_OUTPUT`` bytes of output (see :meth:`exec_stream`).
        """
        from popek.engines.qemu.agent import AgentClient

        return AgentClient(Paths(spec.workdir).agent, timeout).exec(argv, stdin)

    def console(self, spec: LaunchSpec, escape: bytes) -> None:
        """Attach the caller's terminal to the serial console."""
        from popek.engines.qemu.console import attach

        attach(Paths(spec.workdir).console, escape)

    def open_console(self, spec: LaunchSpec, size: tuple[int, int]) -> Channel:
        """The serial console socket for a front end to relay (one session at a time).

        ``size`` is not passed on: a serial line has no window size.
        """
        from popek.engines.qemu.console import connect
        from popek.engines.session import socket_channel

        sock, lock = connect(Paths(spec.workdir).console)
        return socket_channel(sock, lock)

    def open_exec(self, spec: LaunchSpec, argv: list[str], tty: bool,
                  size: tuple[int, int]) -> Channel:
        """Run ``argv`` through the guest agent for a front end to relay.

        With ``tty``: on a new terminal in the guest of ``size`` (rows,
        columns), keys in and the screen out on one descriptor, a resize
        passed on (:func:`popek.engines.qemu.ptyexec.channel`).  Without (or
        when the image's agent predates terminals): the output on two pipes,
        no input (the agent takes input with the command only).  The exit
        code comes when the channel closes.
        """
        import threading

        from popek.engines.qemu.agent import STREAM_START_TIMEOUT, AgentClient, NoTerminal
        from popek.engines.session import Channel

        client = AgentClient(Paths(spec.workdir).agent, STREAM_START_TIMEOUT)
        if tty:
            from popek.engines.qemu.ptyexec import channel

            with contextlib.suppress(NoTerminal):
                return channel(client, argv, size)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["code"] = client.exec_stream(argv, b"", out_w, err_w)
            except Exception as exc:  # raised again when the session closes
                outcome["error"] = exc
            finally:
                os.close(out_w)
                os.close(err_w)

        thread = threading.Thread(target=run, name="vm-exec", daemon=True)
        thread.start()

        def finish() -> int | None:
            thread.join(STREAM_START_TIMEOUT)
            if "error" in outcome:
                raise outcome["error"]
            code: int | None = outcome.get("code")
            return code

        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
        return Channel(None, {1: out_r, 2: err_r}, on_close=finish)

    def console_log(self, spec: LaunchSpec) -> bytes:
        """Return the end of what the guest wrote on its serial console since it started.

        At most ``consolelog.MAX_READ`` bytes (4 MiB): the log is rotated,
        see ``conlog.py``.
        """
        return consolelog.tail(Paths(spec.workdir).console_log)

    def cleanup(self, spec: LaunchSpec) -> None:
        """Kill a stray QEMU of this instance, remove its cgroup, sockets and pid file.

        A stray is a QEMU whose start was interrupted before popek recorded it:
        whatever still runs in the instance's cgroup (QEMU, or its launcher).
        """
        p = Paths(spec.workdir)
        pidfile = spec.workdir / "qemu.pid"
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            pass
        else:
            started = proc.start_time(pid)
            if started is not None and str(p.qmp).encode() in cmdline:
                proc.kill(pid, started)
        cgroup = jail.cgroup_path(spec)
        # cgroup names are host-wide: kill only what names this instance's directory
        # (QEMU, or its launcher), never an instance of the same name in another POPEK_HOME
        cgroupfs.kill(cgroup, only=lambda pid: _names(pid, p.qmp))
        with contextlib.suppress(EngineError):  # a leftover is removed at the next cleanup
            cgroupfs.remove(cgroup)
        for sock in p.sockets():
            sock.unlink(missing_ok=True)
            sock.with_suffix(".lock").unlink(missing_ok=True)
        (spec.workdir / "qemu.pid").unlink(missing_ok=True)
        _remove_boot_files(p)
        vtpm.stop(spec.workdir)
        consolelog.stop(p.console_log)
