"""Building the QEMU command line from a :class:`LaunchSpec`.

Every instance gets the same hardened shape: no default devices, no user
configuration files, the seccomp sandbox with every optional deny enabled, no
display, no host channels (no shared folders, clipboard, USB or PCI
pass-through), and only virtio devices.  The machine type is ``q35``: it has
PCI Express hot-plug, which live attach of NICs and disks and CPU/memory
hot-plug need; ``microvm`` boots faster but has none of that (see
docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from popek import proc
from popek.engines.base import LaunchSpec, RbdDisk
from popek.engines.qemu import vtpm
from popek.errors import EngineError
from popek.iolimits import IoLimits

if TYPE_CHECKING:
    from popek.network.model import Port

QEMU_BINARY = "qemu-system-x86_64"
AGENT_PORT = "org.popek.agent.0"
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@dataclass(frozen=True)
class Paths:
    """The files of one instance directory that QEMU creates or uses."""

    workdir: Path

    def boot_file(self, role: str) -> Path:
        """The verified copy of the image's ``role`` file (kernel, initrd) QEMU boots from."""
        return self.workdir / f"{role}.verified"

    @property
    def qmp(self) -> Path:
        """QMP control socket."""
        return self.workdir / "qmp.sock"

    @property
    def console(self) -> Path:
        """Serial console socket."""
        return self.workdir / "console.sock"

    @property
    def console_log(self) -> Path:
        """The last 2 MiB or less the guest wrote on its serial console (``conlog.py``)."""
        return self.workdir / "console.log"

    @property
    def console_fifo(self) -> Path:
        """What QEMU logs the console to: the logger reading it keeps ``console_log`` bounded."""
        return self.workdir / "console.fifo"

    @property
    def agent(self) -> Path:
        """Guest agent channel (virtio-serial) socket."""
        return self.workdir / "agent.sock"

    @property
    def stderr(self) -> Path:
        """QEMU's own messages."""
        return self.workdir / "qemu.log"

    @property
    def argv(self) -> Path:
        """The exact command line of the last start, as JSON (for audits and measurements)."""
        return self.workdir / "qemu.argv.json"

    def disk_key(self, index: int) -> Path:
        """The FIFO QEMU reads the key of encrypted disk ``index`` from (``keyfifo.py``)."""
        return self.workdir / f"disk{index}.key"

    def sockets(self) -> list[Path]:
        """Return every socket path QEMU serves."""
        return [self.qmp, self.console, self.agent]


ROOT_PORTS = 16


def root_port(index: int) -> str:
    """QEMU id of the ``index``-th PCIe root port."""
    return f"rp{index}"


def nic_id(port: Port) -> str:
    """QEMU device id of the NIC of ``port``."""
    return f"nic-{port.host_ifname}"


def netdev_id(port: Port) -> str:
    """QEMU netdev id of ``port``."""
    return f"net-{port.host_ifname}"


def netdev_arg(port: Port, fd: int) -> str:
    """``-netdev`` value: the tap popek opened for QEMU, inherited as file descriptor ``fd``."""
    return f"tap,id={netdev_id(port)},fd={fd},vhost=off"


def nic_arg(port: Port, bus: str) -> str:
    """``-device`` value of the virtio-net NIC of ``port`` on root port ``bus``."""
    return f"virtio-net-pci,netdev={netdev_id(port)},mac={port.mac},id={nic_id(port)},bus={bus}"


def find_qemu() -> str:
    """Return the path of the QEMU binary; raise :class:`EngineError` when it is missing."""
    path = proc.tool(QEMU_BINARY)
    if path is None:
        raise EngineError(f"{QEMU_BINARY} not found in {proc.TOOL_PATH}; install the Debian "
                          "package qemu-system-x86 (make demo does it)")
    return path


def disk_id(slot: int) -> str:
    """QEMU device id of the disk in ``slot`` (its top node is :func:`disk_node` 0)."""
    return f"disk{slot}"


def disk_node(slot: int, level: int) -> str:
    """Node name of level ``level`` of the disk in ``slot``'s chain (0: its own file)."""
    return f"vol{slot}-{level}"


def disk_serial(ref: str) -> str:
    """The serial a guest sees the volume ``POOL/NAME`` by (``/dev/disk/by-id/virtio-NAME``)."""
    return ref.rpartition("/")[2][:20]


def disk_secret(slot: int) -> str:
    """QEMU id of the secret object holding the key of the encrypted disk in ``slot``."""
    return f"vol{slot}-key"


def disk_blockdevs(slot: int, fdsets: Sequence[int],
                   encrypted: bool = False) -> list[dict[str, object]]:
    """The block nodes of the disk in ``slot`` whose files QEMU holds in ``fdsets`` (its own,
    read-write, then each backing file, read-only), a backing node before the node it backs.

    The chain is built here, node by node (``backing`` named explicitly, ``null`` at its
    end), so QEMU never follows a backing file name from an image header.  An
    ``encrypted`` disk's qcow2 nodes (LUKS) open with the secret :func:`disk_secret`.
    """
    out: list[dict[str, object]] = []
    for i in reversed(range(len(fdsets))):
        ro = i > 0
        node = disk_node(slot, i)
        out.append({"driver": "file", "node-name": f"{node}-file",
                    "filename": f"/dev/fdset/{fdsets[i]}", "read-only": ro})
        out.append({"driver": "qcow2", "node-name": node, "file": f"{node}-file",
                    "read-only": ro,
                    "backing": disk_node(slot, i + 1) if i + 1 < len(fdsets) else None})
        if encrypted:
            out[-1]["encrypt"] = {"format": "luks", "key-secret": disk_secret(slot)}
    return out


#: the throttle group every disk of an instance shares (the instance's own limits)
SHARED_GROUP = "tg-all"


def throttle_group(slot: int) -> str:
    """QOM id of the throttle group of the disk in ``slot`` (its volume's limits)."""
    return f"tg-vol{slot}"


def throttle_limits(limits: IoLimits, every: bool = False) -> dict[str, int]:
    """QEMU's ``ThrottleLimits`` for ``limits``: the ones set, or ``every`` one (0: none).

    A ``qom-set`` needs ``every``: QEMU keeps the value of a key left out.
    """
    qemu = {"bps-read": limits.read_bps, "bps-write": limits.write_bps,
            "iops-read": limits.read_iops, "iops-write": limits.write_iops}
    return {k: v for k, v in qemu.items() if v or every}


def throttle_object(group: str, limits: IoLimits) -> dict[str, object]:
    """The throttle group ``group`` (``-object``, QMP ``object-add``); its limits change
    live with ``qom-set``."""
    return {"qom-type": "throttle-group", "id": group, "limits": throttle_limits(limits)}


def disk_top(slot: int) -> str:
    """The node the device of the disk in ``slot`` reads and writes: the filter of the
    instance's group, above the filter of the volume's, above the volume's own node."""
    return f"vol{slot}-shared"


def disk_throttles(slot: int) -> list[dict[str, object]]:
    """The two throttle filter nodes of the disk in ``slot``, lower first: its volume's
    group (``tg-volN``) above its top node, the instance's (``tg-all``) above that.

    They are there unlimited too, so a limit set later is one ``qom-set`` on the
    running VM."""
    return [{"driver": "throttle", "node-name": f"vol{slot}-limit",
             "throttle-group": throttle_group(slot), "file": disk_node(slot, 0)},
            {"driver": "throttle", "node-name": disk_top(slot),
             "throttle-group": SHARED_GROUP, "file": f"vol{slot}-limit"}]


def disk_device(slot: int, ref: str, bus: str) -> dict[str, object]:
    """The virtio-blk device of the disk in ``slot`` (volume ``ref``) on root port ``bus``:
    its serial is the volume's name."""
    return {"driver": "virtio-blk-pci", "drive": disk_top(slot), "id": disk_id(slot),
            "serial": disk_serial(ref), "bus": bus}


def disk_args(disks: Sequence[tuple[str, Sequence[int]]],
              buses: Sequence[str] = (),
              rbd: Sequence[tuple[RbdDisk, Path, str]] = (),
              keyed: Sequence[bool] = (), limits: Sequence[IoLimits] = (),
              shared: IoLimits | None = None) -> list[str]:
    """The argv of block volumes, each given as (``POOL/NAME``, descriptors of its files:
    its own, read-write, then each backing file, read-only), disk ``d`` on root port
    ``buses[d]`` (so that it can be unplugged while the VM runs).

    Every descriptor goes into an fd set of its own (``-add-fd``) and is opened by QEMU
    as ``/dev/fdset/N``: the jail holds no volume path.  A disk is a virtio-blk device
    whose serial is the volume's name (``/dev/disk/by-id/virtio-NAME``).  A disk marked
    in ``keyed`` is encrypted (its secret made by :func:`secret_args`).

    ``rbd`` are Ceph volumes, each with the pipe its key comes through and its root port:
    QEMU's ``rbd`` driver opens the image itself (:func:`rbd_blockdev`), authenticated
    with ``key-secret``, a ``secret`` object read from that pipe (:func:`rbd_key_path`),
    so the key is on no command line and in no file; an encrypted one's own key comes
    through the pipe :meth:`Paths.disk_key` of its slot.  They follow the other disks
    (slots ``len(disks)`` on); ``limits`` covers them too, after the others.

    I/O limits: disk ``d`` sits under a filter of its own throttle group
    (``limits[d]``, the volume's) and one of the group every disk of the instance
    shares (``shared``, the instance's; made even without disks, for a later hot-plug).
    """
    argv: list[str] = ["-object", json.dumps(throttle_object(SHARED_GROUP,
                                                             shared or IoLimits()))]
    fdset = 0
    for d, (ref, fds) in enumerate(disks):
        sets = []
        for fd in fds:
            fdset += 1
            argv += ["-add-fd", f"fd={fd},set={fdset}"]
            sets.append(fdset)
        for node in disk_blockdevs(d, sets, d < len(keyed) and keyed[d]):
            argv += ["-blockdev", json.dumps(node)]
        argv += ["-object", json.dumps(throttle_object(
            throttle_group(d), limits[d] if d < len(limits) else IoLimits()))]
        for node in disk_throttles(d):
            argv += ["-blockdev", json.dumps(node)]
        dev = disk_device(d, ref, buses[d] if d < len(buses) else "pcie.0")
        argv += ["-device", json.dumps(dev)]
    for d, (disk, key_pipe, bus) in enumerate(rbd, start=len(disks)):
        argv += ["-object", f"secret,id={rbd_secret(d)},format=base64,"
                            f"file={str(key_pipe).replace(',', ',,')}"]
        if disk.luks:  # the volume's own key, through a pipe of its own (keyfifo.py)
            luks_pipe = Paths(key_pipe.parent).disk_key(d)
            argv += ["-object", f"secret,id={disk_secret(d)},"
                                f"file={str(luks_pipe).replace(',', ',,')}"]
        for node in rbd_blockdevs(d, disk):
            argv += ["-blockdev", json.dumps(node)]
        argv += ["-object", json.dumps(throttle_object(
            throttle_group(d), limits[d] if d < len(limits) else IoLimits()))]
        for node in disk_throttles(d):
            argv += ["-blockdev", json.dumps(node)]
        argv += ["-device", json.dumps(disk_device(d, disk.name, bus))]
    return argv


def rbd_secret(slot: int) -> str:
    """QEMU id of the secret object holding the Ceph client key of the RBD disk in
    ``slot`` (its volume's own key, when encrypted, is :func:`disk_secret`)."""
    return f"{disk_node(slot, 0)}-key"


def rbd_blockdevs(slot: int, disk: RbdDisk) -> list[dict[str, object]]:
    """The block nodes of the Ceph volume in ``slot``, lower first: QEMU's rbd driver opens
    the image itself, monitors given as ``server`` (no configuration file or keyring in
    the jail), authenticated with the secret :func:`rbd_secret`.  An encrypted volume is
    QEMU's own LUKS (node ``volN-0``) over the image (node ``volN-0-file``), opened with
    the secret :func:`disk_secret`; a plain one is the image alone (``volN-0``)."""
    top = disk_node(slot, 0)
    node: dict[str, object] = {
        "driver": "rbd", "node-name": f"{top}-file" if disk.luks else top,
        "pool": disk.pool, "image": disk.image, "user": disk.user,
        "key-secret": rbd_secret(slot), "auth-client-required": ["cephx"],
        "server": [{"host": h, "port": p} for h, p in disk.servers]}
    if not disk.luks:
        return [node]
    return [node, {"driver": "luks", "node-name": top, "file": f"{top}-file",
                   "key-secret": disk_secret(slot)}]


def rbd_key_path(workdir: Path, index: int) -> Path:
    """The pipe (a FIFO in the instance directory) the key of the ``index``-th RBD disk
    comes through: empty, written once by popek while QEMU reads it at start."""
    return workdir / f"rbd{index}.key"


def disk_buses(spec: LaunchSpec) -> list[str]:
    """The root ports of ``spec``'s disks at start: those after its NICs'."""
    return [root_port(len(spec.ports) + d) for d in range(len(spec.disks))]


def secret_args(workdir: Path, keyed: Sequence[bool]) -> list[str]:
    """The ``-object secret`` of each encrypted disk: QEMU reads its key from the FIFO
    :meth:`Paths.disk_key` (never from its command line)."""
    argv: list[str] = []
    for d, key in enumerate(keyed):
        if key:
            argv += ["-object", f"secret,id={disk_secret(d)},"
                                f"file={str(Paths(workdir).disk_key(d)).replace(',', ',,')}"]
    return argv


def build_argv(spec: LaunchSpec, accel: str, qemu: str,
               tap_fds: Sequence[int] = (),
               disk_fds: Sequence[Sequence[int]] = ()) -> list[str]:
    """Return the full QEMU argv for ``spec`` with accelerator ``accel`` (``kvm``/``tcg``).

    ``tap_fds`` are the open tap descriptors of ``spec.ports``, in order;
    ``disk_fds`` those of each of ``spec.disks``' files, in the same order.
    """
    p = Paths(spec.workdir)
    mib = spec.memory >> 20
    if spec.image is None:
        raise EngineError(f"the image of {spec.name} no longer exists")
    argv = [
        qemu,
        "-name", f"guest={spec.name},debug-threads=on",
        "-machine", f"q35,accel={accel}",
        "-cpu", "host" if accel == "kvm" else "max",
        "-smp", str(spec.vcpus),
        "-m", f"{mib}M",
        "-nodefaults", "-no-user-config", "-nic", "none",
        "-display", "none", "-vga", "none",
        "-sandbox", SANDBOX,
        "-msg", "timestamp=on",
        "-no-reboot",
        "-kernel", str(p.boot_file("kernel")),
        "-initrd", str(p.boot_file("initrd")),
        "-append", spec.cmdline,
        "-chardev",
        f"socket,id=console,path={p.console},server=on,wait=off,logfile={p.console_fifo}",
        "-serial", "chardev:console",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=agent,path={p.agent},server=on,wait=off",
        "-device", f"virtserialport,bus=vser0.0,chardev=agent,name={AGENT_PORT}",
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", "virtio-rng-pci,rng=rng0",
        "-qmp", f"unix:{p.qmp},server=on,wait=off",
        # a TPM 2.0 (swtpm) and the launch measurement for the guest's PCR 15
        *vtpm.qemu_args(spec.workdir),
    ]
    # PCI Express root ports: one per NIC and per disk, so that every NIC and disk,
    # present at boot or plugged in later, can be unplugged again (devices on pcie.0 cannot)
    for i in range(ROOT_PORTS):
        argv += ["-device", f"pcie-root-port,id={root_port(i)},chassis={i + 1},slot={i + 1},"
                            f"bus=pcie.0"]
    for i, (port, fd) in enumerate(zip(spec.ports, tap_fds, strict=True)):
        argv += ["-netdev", netdev_arg(port, fd), "-device", nic_arg(port, root_port(i))]
    keyed = [bool(k) for k in spec.disk_keys]
    argv += secret_args(spec.workdir, keyed)
    argv += disk_args([(ref, fds) for (ref, _), fds in zip(spec.disks, disk_fds, strict=True)],
                      disk_buses(spec),
                      [(disk, rbd_key_path(spec.workdir, i),
                        root_port(len(spec.ports) + len(spec.disks) + i))
                       for i, disk in enumerate(spec.rbd_disks)], keyed,
                      spec.disk_limits, IoLimits.of(spec.limits))
    return argv
