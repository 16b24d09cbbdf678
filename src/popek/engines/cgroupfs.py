"""Creating, joining and removing the cgroup of a process popek starts itself.

The OCI runtime makes the cgroups of containers (``container/cgroups.py``
only reads them); QEMU has no runtime in front of it, so popek makes its
cgroup here, the way Firecracker's jailer does: one cgroup per instance with
CPU, memory, pids and I/O limits, which the launcher joins *before* it execs
QEMU, so no QEMU instruction ever runs outside it.

The launcher joins by writing ``0`` (itself) into the files :func:`create`
returns: on v1 each hierarchy's ``tasks`` file, which moves the calling
thread only; the kernel then skips the global lock that a whole-process
move (``cgroup.procs``) takes, and with it an RCU grace period (measured
here: 6-20 ms per start on cgroup v1, nothing for ``tasks``).  On v2 the
file is ``cgroup.procs`` (a domain cgroup takes no thread moves) and the
grace period is paid unless cgroup2 is mounted with ``favordynmods``.

Both layouts are supported and detected like ``container.cgroups.is_v2``
(the test is repeated here so that the QEMU engine does not import the
container engine):

- **v1 or hybrid** (this build host): one hierarchy per controller,
  ``/sys/fs/cgroup/<controller>/<path>``; limits in ``cpu.cfs_quota_us``,
  ``memory.limit_in_bytes`` (+ ``memory.memsw.limit_in_bytes``: no swap),
  ``pids.max`` and ``blkio.bfq.weight`` / ``blkio.weight``.
- **v2**: ``/sys/fs/cgroup/<path>``, with the controllers enabled in the
  ``cgroup.subtree_control`` of every ancestor; limits in ``cpu.max``,
  ``memory.max`` (+ ``memory.swap.max`` 0), ``pids.max`` and ``io.weight``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from popek import proc
from popek.errors import EngineError
from popek.iolimits import IoLimits

ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000
#: v1 hierarchies: the limits need cpu, memory and pids; cpuacct (accounting) and
#: blkio (I/O weight) are used when the host has them
V1_REQUIRED = ("cpu", "memory", "pids")
V1_OPTIONAL = ("cpuacct", "blkio")
V2_REQUIRED = ("cpu", "memory", "pids")
V2_OPTIONAL = ("io",)
#: the relative I/O weight of one instance, on the v2 scale (1-10000, 100 = the default)
IO_WEIGHT = 100


def is_v2(root: Path = ROOT) -> bool:
    """Return whether ``root`` is a pure cgroup v2 (unified) mount."""
    try:
        return (root / "cgroup.controllers").exists() and not (root / "memory").is_dir()
    except OSError:
        return False


def io_weight_offered(root: Path = ROOT) -> bool:
    """Whether the kernel weighs I/O between cgroups on this host.

    v1: the blkio hierarchy has a proportional scheduler's weight file
    (``blkio.bfq.weight`` with BFQ, ``blkio.weight`` with CFQ); a host whose
    disks all run ``none``, ``mq-deadline`` or ``kyber`` has neither.  v2: the
    ``io`` controller is offered.  An OCI runtime asked for a weight the host
    cannot apply fails the container's start (runc 1.1: ``open
    .../blkio.bfq.weight: no such file or directory``), so a weight is asked
    for only when this says so.
    """
    try:
        if is_v2(root):
            return "io" in (root / "cgroup.controllers").read_text().split()
        blkio = root / "blkio"
        return (blkio / "blkio.bfq.weight").exists() or (blkio / "blkio.weight").exists()
    except OSError:
        return False


@dataclass(frozen=True)
class Limits:
    """The limits of one cgroup."""

    #: CPU time per period, in CPUs (1.5 = one and a half CPUs)
    cpus: float
    #: bytes of memory; swap is off
    memory: int
    #: tasks (processes and threads) at once
    pids: int
    #: relative I/O weight on the v2 scale (1-10000, default 100)
    io_weight: int = IO_WEIGHT

    @property
    def cpu_quota_us(self) -> int:
        """The CPU quota per :data:`CPU_PERIOD_US`, in microseconds."""
        return max(1000, round(self.cpus * CPU_PERIOD_US))


@dataclass(frozen=True)
class Setting:
    """One control file to write: ``controller`` (v1 hierarchy; ``""`` on v2), file, value.

    A setting that is not ``required`` is skipped when the kernel does not
    offer the file (no swap accounting, no proportional I/O scheduler).
    """

    controller: str
    file: str
    value: str
    required: bool = True


def v1_settings(limits: Limits) -> list[Setting]:
    """The control files of a v1 cgroup for ``limits``, in the order they are written."""
    v1_weight = max(10, min(1000, limits.io_weight * 5))  # CFQ: 10-1000, default 500
    bfq_weight = max(1, min(1000, limits.io_weight))       # BFQ: 1-1000, default 100
    return [
        Setting("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US)),
        Setting("cpu", "cpu.cfs_quota_us", str(limits.cpu_quota_us)),
        Setting("memory", "memory.limit_in_bytes", str(limits.memory)),
        Setting("memory", "memory.memsw.limit_in_bytes", str(limits.memory), required=False),
        Setting("pids", "pids.max", str(limits.pids)),
        Setting("blkio", "blkio.bfq.weight", str(bfq_weight), required=False),
        Setting("blkio", "blkio.weight", str(v1_weight), required=False),
    ]


def v2_settings(limits: Limits) -> list[Setting]:
    """The control files of a v2 cgroup for ``limits``, in the order they are written."""
    return [
        Setting("", "cpu.max", f"{limits.cpu_quota_us} {CPU_PERIOD_US}"),
        Setting("", "memory.max", str(limits.memory)),
        Setting("", "memory.swap.max", "0", required=False),
        Setting("", "pids.max", str(limits.pids)),
        Setting("", "io.weight", f"default {limits.io_weight}", required=False),
        Setting("", "io.bfq.weight", str(max(1, min(1000, limits.io_weight))), required=False),
    ]


#: v1's throttle files, each with the :class:`IoLimits` field it takes
V1_THROTTLE = (("blkio.throttle.read_bps_device", "read_bps"),
               ("blkio.throttle.write_bps_device", "write_bps"),
               ("blkio.throttle.read_iops_device", "read_iops"),
               ("blkio.throttle.write_iops_device", "write_iops"))
#: v2's ``io.max`` keys, each with the :class:`IoLimits` field it takes
V2_IO_MAX = (("rbps", "read_bps"), ("wbps", "write_bps"), ("riops", "read_iops"),
             ("wiops", "write_iops"))


def whole_disk(dev: int) -> tuple[int, int]:
    """(major, minor) of the disk that holds block device ``dev`` (``st_rdev`` or
    ``st_dev``): a partition's disk, since the kernel throttles whole disks only."""
    major, minor = os.major(dev), os.minor(dev)
    sysfs = Path(f"/sys/dev/block/{major}:{minor}")
    with contextlib.suppress(OSError, ValueError):
        if (sysfs / "partition").exists():
            text = (sysfs.resolve().parent / "dev").read_text().strip()
            m, _, n = text.partition(":")
            return int(m), int(n)
    return major, minor


def io_limit_settings(device: tuple[int, int], limits: IoLimits, v2: bool) -> list[Setting]:
    """The control files that give a cgroup ``limits`` on block device ``device``
    (major, minor): v1's ``blkio.throttle.*_device`` (0 removes a rule), or v2's
    ``io.max`` (``max``: no limit)."""
    dev = f"{device[0]}:{device[1]}"
    if v2:
        pairs = " ".join(f"{key}={getattr(limits, field) or 'max'}" for key, field in V2_IO_MAX)
        return [Setting("", "io.max", f"{dev} {pairs}")]
    return [Setting("blkio", name, f"{dev} {getattr(limits, field)}")
            for name, field in V1_THROTTLE]


def set_io_limits(path: str, devices: Sequence[tuple[int, int]], limits: IoLimits,
                  root: Path = ROOT) -> None:
    """Give the existing cgroup ``path`` ``limits`` on each block device of ``devices``
    ((major, minor) of whole disks: a container's writable layer's loop device, a
    filesystem volume's), at once for the processes in it.

    Only I/O that reaches the device from the cgroup's processes is limited: direct
    I/O everywhere, buffered writes too on v2 (its writeback is charged to the cgroup).
    Raises :class:`EngineError` when the host has no I/O controller for a limit or the
    kernel refuses one (nothing is left half-set for a device the kernel refused first).
    """
    rel = path.strip("/")
    v2 = is_v2(root)
    if v2:
        d = root / rel
    else:
        blkio = root / "blkio"
        if not blkio.is_dir():
            if limits:
                raise EngineError(f"the blkio cgroup controller is not mounted under {root}: "
                                  "popek cannot limit disk I/O")
            return
        d = blkio.resolve() / rel
    if not d.is_dir():
        raise EngineError(f"cgroup {rel} does not exist under {root}: is the instance running?")
    for device in devices:
        settings = io_limit_settings(device, limits, v2)
        missing = [s.file for s in settings if not (d / s.file).exists()]
        if missing:
            if not limits:
                continue
            raise EngineError(f"the kernel offers no {missing[0]} in {d}: popek cannot limit "
                              "disk I/O on this host")
        _apply([(d, s) for s in settings])


def v1_hierarchies(root: Path = ROOT) -> dict[str, Path]:
    """Map each v1 controller popek uses to its hierarchy's mount directory.

    Co-mounted controllers (``cpu,cpuacct``) map to the same directory.
    Raises :class:`EngineError` when a required controller is not mounted.
    """
    found: dict[str, Path] = {}
    for name in (*V1_REQUIRED, *V1_OPTIONAL):
        d = root / name
        if d.is_dir():
            found[name] = d.resolve()
    missing = [c for c in V1_REQUIRED if c not in found]
    if missing:
        raise EngineError(f"cgroup v1 controller(s) {', '.join(missing)} not mounted under "
                          f"{root}: popek cannot limit the instance")
    return found


def dirs(path: str, root: Path = ROOT) -> list[Path]:
    """Every directory of the cgroup ``path`` (one on v2, one per v1 hierarchy)."""
    rel = path.strip("/")
    if is_v2(root):
        return [root / rel]
    seen: list[Path] = []
    for name in (*V1_REQUIRED, *V1_OPTIONAL):
        d = root / name
        if d.is_dir() and (d.resolve() / rel) not in seen:
            seen.append(d.resolve() / rel)
    return seen


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _apply(settings: list[tuple[Path, Setting]]) -> None:
    """Write every setting; retry the ones that failed once the others are in.

    The second pass covers order constraints such as v1's
    ``memsw.limit_in_bytes >= limit_in_bytes`` on a cgroup left by an earlier run.
    """
    failed: list[tuple[Path, Setting, OSError]] = []
    for d, s in settings:
        target = d / s.file
        if not s.required and not target.exists():
            continue
        try:
            _write(target, s.value)
        except OSError as exc:
            failed.append((d, s, exc))
    for d, s, _ in failed:
        try:
            _write(d / s.file, s.value)
        except OSError as exc:
            raise EngineError(f"cannot set {s.file}={s.value} in {d}: {exc.strerror}") from exc


def _enable_v2(root: Path, rel: str) -> None:
    """Enable the controllers in ``cgroup.subtree_control`` of every ancestor of ``rel``."""
    parts = Path(rel).parts
    for depth in range(len(parts)):
        parent = root.joinpath(*parts[:depth])
        parent.mkdir(mode=0o755, exist_ok=True)
        available = set((parent / "cgroup.controllers").read_text().split())
        enabled = set((parent / "cgroup.subtree_control").read_text().split())
        for c in (*V2_REQUIRED, *V2_OPTIONAL):
            if c in enabled or (c not in available and c in V2_OPTIONAL):
                continue
            try:
                _write(parent / "cgroup.subtree_control", f"+{c}")
            except OSError as exc:
                if c in V2_REQUIRED:
                    raise EngineError(f"cannot enable the {c} controller in {parent}: "
                                      f"{exc.strerror}") from exc


def create(path: str, limits: Limits, root: Path = ROOT) -> list[Path]:
    """Create the cgroup ``path`` (e.g. ``popek/default-web``) with ``limits``.

    Returns the files a single-threaded process writes ``0`` into to join
    it: ``tasks`` of each hierarchy on v1, ``cgroup.procs`` on v2.  Raises
    :class:`EngineError` when a required controller or limit is not available.
    """
    rel = path.strip("/")
    try:
        if is_v2(root):
            _enable_v2(root, rel)
            d = root / rel
            d.mkdir(mode=0o755, exist_ok=True)
            _apply([(d, s) for s in v2_settings(limits)])
            return [d / "cgroup.procs"]  # domain cgroups take no thread moves
        hierarchies = v1_hierarchies(root)
        by_dir: dict[Path, Path] = {}
        for mount in hierarchies.values():
            d = mount / rel
            d.mkdir(mode=0o755, parents=True, exist_ok=True)
            by_dir[mount] = d
        _apply([(by_dir[hierarchies[s.controller]], s) for s in v1_settings(limits)
                if s.controller in hierarchies])
        return [d / "tasks" for d in by_dir.values()]
    except OSError as exc:
        raise EngineError(f"cannot create the cgroup {rel} under {root}: {exc}") from exc


def procs(path: str, root: Path = ROOT) -> list[int]:
    """The pids in the cgroup ``path`` (read from its first directory), empty if it is gone.

    On v1 an exited process that its parent has not reaped yet is still listed.
    """
    for d in dirs(path, root):
        try:
            return [int(x) for x in (d / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []
    return []


def kill(path: str, root: Path = ROOT, timeout: float = 5.0,
         only: Callable[[int], bool] | None = None) -> None:
    """SIGKILL the processes of the cgroup ``path`` and wait until they are gone.

    ``only`` selects which pids to kill (all by default); see :func:`kill_listed`.
    """
    def targets() -> list[int]:  # living processes only: a zombie needs no signal
        return [pid for pid in procs(path, root)
                if proc.start_time(pid) is not None and (only is None or only(pid))]

    kill_listed(targets, f"cgroup {path}", timeout)


def kill_listed(targets: Callable[[], list[int]], what: str, timeout: float = 5.0) -> list[int]:
    """SIGKILL the pids ``targets()`` lists until it lists none; return those signalled.

    A pid is signalled through a pidfd opened while ``targets()`` still lists
    it, so a pid reused by an unrelated process is never hit.  Raises
    :class:`EngineError` naming ``what`` when they outlive ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    killed: set[int] = set()
    while pids := targets():
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if pid in targets():
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                    killed.add(pid)
            except OSError:
                pass
            finally:
                os.close(fd)
        if time.monotonic() > deadline:
            raise EngineError(f"processes {pids} of {what} did not die within "
                              f"{timeout:.0f}s")
        time.sleep(0.01)
    return sorted(killed)


def remove(path: str, root: Path = ROOT, timeout: float = 2.0) -> None:
    """Remove the (empty) cgroup ``path`` from every hierarchy; a missing one is fine.

    An exited task may keep a cgroup busy for a moment: ``EBUSY`` is retried
    until ``timeout``.  Raises :class:`EngineError` at once when processes
    still run in it.
    """
    if left := [pid for pid in procs(path, root) if proc.start_time(pid) is not None]:
        raise EngineError(f"cannot remove the cgroup {path}: processes {left} still run in it")
    deadline = time.monotonic() + timeout
    for d in dirs(path, root):
        try:
            rmdir(d, deadline)
        except OSError as exc:
            with contextlib.suppress(OSError):
                if not d.exists():
                    continue
            raise EngineError(f"cannot remove the cgroup {d}: {exc.strerror}") from exc


def rmdir(d: Path, deadline: float) -> None:
    """Remove the empty cgroup directory ``d`` (gone already is fine); ``EBUSY``, which an
    exited task may cause for a moment, is retried until ``deadline`` (``time.monotonic``)."""
    while True:
        try:
            os.rmdir(d)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno == errno.EBUSY and time.monotonic() < deadline:
                time.sleep(0.01)
                continue
            raise
        return


@dataclass(frozen=True)
class Counters:
    """What one cgroup has used so far; ``None`` where the kernel does not say.

    ``memory`` is the usage now (page cache included, as the kernel charges
    it); the others only grow while the cgroup lives.
    """

    cpu_seconds: float | None
    memory: int | None
    read_bytes: int | None
    write_bytes: int | None


def _text(path: Path) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _int(path: Path) -> int | None:
    text = _text(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _v2_io(text: str | None) -> tuple[int | None, int | None]:
    """Bytes read and written from a v2 ``io.stat`` (``MAJ:MIN rbytes=N wbytes=N ...`` lines)."""
    if text is None:
        return None, None
    read = write = 0
    for line in text.splitlines():
        for field in line.split()[1:]:
            key, _, value = field.partition("=")
            if key == "rbytes":
                read += int(value)
            elif key == "wbytes":
                write += int(value)
    return read, write


def _v1_io(text: str | None) -> tuple[int | None, int | None]:
    """Bytes read and written from a v1 ``blkio.throttle.io_service_bytes*``
    (``MAJ:MIN Read N`` lines, one ``Total N`` line at the end)."""
    if text is None:
        return None, None
    read = write = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == "Read":
            read += int(parts[2])
        elif len(parts) == 3 and parts[1] == "Write":
            write += int(parts[2])
    return read, write


def counters(path: str, root: Path = ROOT, v2: bool | None = None) -> Counters:
    """Read the usage counters of the cgroup ``path`` (v1 or v2): a few small files, no lock.

    ``v2`` is the layout when the caller detected it already (one
    :func:`is_v2` per scrape instead of one per cgroup).  A cgroup that is
    gone reads as all ``None``.
    """
    rel = path.strip("/")
    if is_v2(root) if v2 is None else v2:
        d = root / rel
        cpu = None
        for line in (_text(d / "cpu.stat") or "").splitlines():
            if line.startswith("usage_usec "):
                cpu = int(line.split()[1]) / 1e6
        read, write = _v2_io(_text(d / "io.stat"))
        return Counters(cpu, _int(d / "memory.current"), read, write)
    ns = _int(root / "cpuacct" / rel / "cpuacct.usage")
    blkio = root / "blkio" / rel
    read, write = _v1_io(_text(blkio / "blkio.throttle.io_service_bytes_recursive")
                         or _text(blkio / "blkio.throttle.io_service_bytes"))
    return Counters(ns / 1e9 if ns is not None else None,
                    _int(root / "memory" / rel / "memory.usage_in_bytes"), read, write)
