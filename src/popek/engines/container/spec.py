"""The OCI runtime spec (config.json) of a popek system container.

Every default here is strict on purpose; docs/CONTAINERS.md gives the reason
for each.  In short: every namespace including the user namespace (root in
the container is an unprivileged uid range on the host), a reduced set of
capabilities, ``noNewPrivileges``, popek's seccomp deny list, masked and
read-only kernel interfaces in /proc and /sys, only the standard devices,
and cgroup limits for CPU, memory, pids and I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from popek.engines.seccomp import oci_profile
from popek.iolimits import IoLimits

#: the capabilities a system container keeps (all others are dropped).  They
#: act only inside the container's user namespace; see docs/CONTAINERS.md.
CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT",
    "CAP_AUDIT_WRITE",
)

NAMESPACES = ("pid", "network", "ipc", "uts", "mount", "user", "cgroup")

MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap", "/proc/kallsyms",
)
READONLY_PATHS = (
    "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
)

CPU_PERIOD = 100_000  # microseconds
ID_RANGE = 65536

#: the most open files (struct file) one container may hold, all its processes together:
#: ``RLIMIT_NOFILE`` x ``limits.pids`` stays under this and under 1/:data:`FILE_MAX_SHARE`
#: of the host's ``fs.file-max`` (docs/CONTAINERS.md)
FILES_BUDGET = 1 << 18
FILE_MAX_SHARE = 8
#: RLIMIT_NOFILE never goes below (programs expect a few dozen) nor above this
NOFILE_MIN, NOFILE_MAX = 64, 1 << 16
FILE_MAX = "/proc/sys/fs/file-max"


@dataclass(frozen=True)
class Limits:
    """cgroup limits of one container."""

    memory: int
    cpus: float
    pids: int
    #: relative I/O weight (1-10000, default 100); 0: none asked for (the host has no
    #: proportional I/O scheduler: :func:`popek.engines.cgroupfs.io_weight_offered`)
    io_weight: int = 100
    cpuset: str = ""  # host CPUs to run on, "0,2"; empty: all
    #: disk I/O limits on each of ``io_devices`` ((major, minor): its writable layer's)
    io: IoLimits = field(default_factory=IoLimits)
    io_devices: tuple[tuple[int, int], ...] = ()

    def block_io(self) -> dict[str, Any]:
        """The OCI ``blockIO`` object: the weight and the throttles (empty: none)."""
        out: dict[str, Any] = {"weight": self.io_weight} if self.io_weight else {}
        for key, rate in (("throttleReadBpsDevice", self.io.read_bps),
                          ("throttleWriteBpsDevice", self.io.write_bps),
                          ("throttleReadIOPSDevice", self.io.read_iops),
                          ("throttleWriteIOPSDevice", self.io.write_iops)):
            if rate and self.io_devices:
                out[key] = [{"major": major, "minor": minor, "rate": rate}
                            for major, minor in self.io_devices]
        return out

    def resources(self) -> dict[str, Any]:
        """Return the OCI ``linux.resources`` object for these limits."""
        block_io = self.block_io()
        return {
            "memory": {"limit": self.memory, "swap": self.memory},
            "cpu": {"quota": int(self.cpus * CPU_PERIOD), "period": CPU_PERIOD,
                    **({"cpus": self.cpuset} if self.cpuset else {})},
            "pids": {"limit": self.pids},
            **({"blockIO": block_io} if block_io else {}),
            "devices": [{"allow": False, "access": "rwm"}] + [
                {"allow": True, "type": "c", "major": major, "access": "rwm"}
                | ({} if minor is None else {"minor": minor})
                for major, minor in STANDARD_DEVICES
            ],
        }


#: /dev/null, zero, full, random, urandom, tty, console, ptmx, pts/*
STANDARD_DEVICES: tuple[tuple[int, int | None], ...] = (
    (1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 1), (5, 2), (136, None))


def host_file_max(path: str = FILE_MAX) -> int:
    """The host's ``fs.file-max`` (open files, all processes together); the budget if unknown."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return FILES_BUDGET * FILE_MAX_SHARE


def nofile(pids: int, file_max: int | None = None) -> int:
    """The ``RLIMIT_NOFILE`` of every process of a container with ``pids`` tasks at most.

    The kernel counts open files per process (the rlimit) and the tasks per
    container (the pids cgroup), so a container holds at most ``pids x
    nofile`` files: that product is kept under ``min(FILES_BUDGET, file-max /
    FILE_MAX_SHARE)``.  Fewer tasks allow more files each (a database with
    ``limits.pids 64`` gets 4096), never fewer than :data:`NOFILE_MIN` (the
    bound is then ``pids x 64``) nor more than :data:`NOFILE_MAX`.
    """
    budget = min(FILES_BUDGET, (host_file_max() if file_max is None else file_max)
                 // FILE_MAX_SHARE)
    return max(NOFILE_MIN, min(NOFILE_MAX, budget // max(1, pids)))


def _mount(dest: str, typ: str, source: str, options: list[str]) -> dict[str, Any]:
    return {"destination": dest, "type": typ, "source": source, "options": options}


def build_spec(*, hostname: str, args: list[str], env: list[str], cwd: str, host_uid: int,
               host_gid: int, limits: Limits, cgroups_path: str, rootfs: str = "rootfs",
               binds: tuple[tuple[str, str, bool], ...] = ()) -> dict[str, Any]:
    """Return the full OCI runtime spec of a container.

    ``host_uid``/``host_gid`` is the first host id of the container's
    subordinate range (:data:`ID_RANGE` ids): container root maps to it.
    ``RLIMIT_NOFILE`` follows ``limits.pids`` (:func:`nofile`).
    """
    files = nofile(limits.pids)
    devices_mode = "mode=755,size=65536k"
    devices = [
        {"path": f"/dev/{name}", "type": "c", "major": major, "minor": minor,
         "fileMode": 0o666, "uid": 0, "gid": 0}
        for name, (major, minor) in {
            "null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8),
            "urandom": (1, 9), "tty": (5, 0)}.items()
    ]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": {k: list(CAPABILITIES) for k in
                             ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": files, "soft": files},
                        {"type": "RLIMIT_CORE", "hard": 0, "soft": 0}],
            "noNewPrivileges": True,
            "oomScoreAdj": 500,
        },
        "root": {"path": rootfs, "readonly": False},
        "hostname": hostname,
        "mounts": [
            _mount("/proc", "proc", "proc", ["nosuid", "noexec", "nodev"]),
            _mount("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", devices_mode]),
            _mount("/dev/pts", "devpts", "devpts",
                   ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]),
            _mount("/dev/shm", "tmpfs", "shm",
                   ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
            _mount("/dev/mqueue", "mqueue", "mqueue", ["nosuid", "noexec", "nodev"]),
            _mount("/sys", "sysfs", "sysfs", ["nosuid", "noexec", "nodev", "ro"]),
            _mount("/sys/fs/cgroup", "cgroup", "cgroup",
                   ["nosuid", "noexec", "nodev", "relatime", "ro"]),
            _mount("/run", "tmpfs", "tmpfs", ["nosuid", "nodev", "mode=755", "size=65536k"]),
            _mount("/tmp", "tmpfs", "tmpfs", ["nosuid", "nodev", "mode=1777", "size=262144k"]),
            *(_mount(dst, "bind", src, ["rbind", "nosuid", "nodev", "ro" if ro else "rw"])
              for src, dst, ro in binds),
        ],
        "linux": {
            "uidMappings": [{"containerID": 0, "hostID": host_uid, "size": ID_RANGE}],
            "gidMappings": [{"containerID": 0, "hostID": host_gid, "size": ID_RANGE}],
            "namespaces": [{"type": t} for t in NAMESPACES],
            "devices": devices,
            "resources": limits.resources(),
            "cgroupsPath": cgroups_path,
            "seccomp": oci_profile(),
            # ICMP echo through datagram sockets (ping without CAP_NET_RAW); namespaced
            "sysctl": {"net.ipv4.ping_group_range": f"0 {ID_RANGE - 1}"},
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }
