"""The jail of one QEMU: its own mount namespace, its cgroup, its uid.

Like Firecracker's jailer, popek prepares a confined place for each VMM
process before the VMM's first instruction runs.  The launcher is a short
chain of standard tools (util-linux ``unshare``, ``mount`` and ``setsid``,
``sh``, coreutils ``chroot``), built by :func:`launcher_argv`::

    unshare --mount --propagation slave -- sh -c '
        echo 0 > .../popek/<home>-<project>-<name>/tasks   # join the cgroup, each hierarchy
        mount -a -T /dev/stdin                      # the jail, from the plan below
        exec chroot --userspec=+UID:+GID --groups=... JAIL setsid --fork qemu ...'

1. ``unshare`` gives the launcher a mount namespace of its own.  Propagation
   is *slave*: nothing mounted in it reaches the host, and where the host's
   mounts are shared (systemd's default) the host's unmounts reach it, so a
   long-lived QEMU does not keep a host filesystem busy.
2. The shell (still root) moves itself into the instance's cgroup, made
   beforehand by popek (``engines/cgroupfs.py``): QEMU and every thread it
   makes are born inside the limits.
3. One ``mount`` process mounts the whole jail from an fstab that popek
   writes into a memfd (the shell's stdin; see :func:`fstab`): a small
   tmpfs root, read-only binds of the system directories that hold QEMU,
   its libraries and firmware (``/usr``, ``/lib*``, ``/bin``, ``/sbin``), a
   ``/dev`` with only ``null``, ``zero``, ``random``, ``urandom`` (and
   ``kvm`` under KVM; tap devices are never opened, popek passes their
   descriptors), and the instance directory bound at its own path (popek
   reaches the QMP, console and agent sockets by the same paths from the
   host).  Every mount is ``nosuid``; the binds are private; the tmpfs root
   is remounted read-only last.  There is no ``/etc`` of the host (only an
   empty directory QEMU cannot enter, so that any ``/etc/...`` path fails
   with ``EACCES`` as it did before the jail), no ``/root``, ``/home``,
   ``/tmp``, ``/var`` or ``/sys``, and no other instance's directory.

   There is no ``/proc`` either, as in Firecracker's jail: QEMU does not
   need it, and through ``/proc/PID/root`` any process of the same uid
   outside the jail (a helper such as swtpm) would lead back to the host's
   whole file system, whatever ``hidepid`` says.
4. ``chroot`` enters the jail and drops to the instance uid/gid with no
   supplementary group (only ``kvm`` under KVM) before it execs; ``setsid
   --fork`` detaches QEMU from popek as before (see ``process.py``).

All the mounts live in the namespace only: they disappear with QEMU, and
nothing is left to clean up on the host but the cgroup.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from popek import paths
from popek.engines import cgroupfs
from popek.engines.base import LaunchSpec
from popek.errors import EngineError

#: host directory holding the jail's mount point and the placeholders of its /dev
JAIL_DIR = Path("/run/popek/jail")
#: host directories bound read-only: QEMU, its libraries, firmware and the launcher's tools
SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
#: device nodes every QEMU gets; ``kvm`` is added when the accelerator is KVM
DEVICES = ("null", "zero", "random", "urandom")
KVM_DEVICE = "kvm"

MIB = 1 << 20
GIB = 1 << 30
#: memory QEMU needs beyond guest RAM: at least this much ...
MEMORY_OVERHEAD_MIN = 128 * MIB
#: ... or this fraction of guest RAM (1/4 = 25%), whichever is larger
MEMORY_OVERHEAD_DIVISOR = 4
#: QEMU's TCG translation cache: 1 GiB, or 1/8 of host RAM when that is smaller
#: (QEMU 7.2 tcg/region.c, size_code_gen_buffer); resident as the guest runs new code
TCG_CODE_BUFFER_MAX = 1 * GIB
#: CPU time beyond the vCPUs, for QEMU's main loop, I/O and RCU threads
CPU_MARGIN = 0.5
#: tasks beyond the vCPUs: QEMU's worker pool (up to 64 threads), main, RCU and
#: I/O threads, and the launcher (sh and mount) while it runs
PIDS_EXTRA = 96
#: the fewest tasks beyond the vCPUs popek sets even when ``limits.pids`` asks for less
PIDS_FLOOR = 16

BIND_RO = ("bind", "ro", "nosuid", "nodev", "private", "X-mount.mkdir")
BIND_DEV = ("bind", "nosuid", "noexec", "private")


@dataclass(frozen=True)
class Mount:
    """One line of the jail's fstab; ``target`` is the path *inside* the jail."""

    source: str
    target: str
    fstype: str = "none"
    options: tuple[str, ...] = ()


def cgroup_path(spec: LaunchSpec) -> str:
    """The cgroup of the QEMU of ``spec``, relative to each hierarchy (as for containers).

    It carries this home's id (:func:`popek.paths.home_id`): two homes with a
    VM of the same name never share one cgroup.
    """
    return f"popek/{paths.home_id()}-{spec.project}-{spec.name}"


def tcg_code_buffer(physmem: int) -> int:
    """The size of QEMU's TCG translation cache on a host with ``physmem`` bytes of RAM."""
    page = 4096
    return min(TCG_CODE_BUFFER_MAX, (physmem // 8) // page * page) or TCG_CODE_BUFFER_MAX


def host_memory() -> int:
    """Bytes of RAM on this host (what QEMU sizes its translation cache from)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def limits(spec: LaunchSpec, accel: str, physmem: int | None = None) -> cgroupfs.Limits:
    """The cgroup limits of the QEMU of ``spec`` under ``accel``.

    - CPU: ``vcpus + 0.5`` CPUs of time per period (the half for QEMU's own threads).
    - memory: guest RAM + max(128 MiB, 25% of guest RAM), plus the TCG
      translation cache under TCG; swap off.  QEMU is killed by the kernel's
      OOM killer of its cgroup if it goes beyond (a guest cannot, its RAM is fixed).
    - pids: ``vcpus + 96`` tasks; ``limits.pids`` replaces it, but never
      below ``vcpus + 16`` (QEMU aborts when it cannot make a thread).
    - I/O: the default weight, the same for every instance.
    """
    overhead = max(MEMORY_OVERHEAD_MIN, spec.memory // MEMORY_OVERHEAD_DIVISOR)
    if accel == "tcg":
        overhead += tcg_code_buffer(host_memory() if physmem is None else physmem)
    if "pids" in spec.limits:
        pids = max(int(spec.limits["pids"]), spec.vcpus + PIDS_FLOOR)
    else:
        pids = spec.vcpus + PIDS_EXTRA
    return cgroupfs.Limits(cpus=spec.vcpus + CPU_MARGIN, memory=spec.memory + overhead,
                           pids=pids)


def _under(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def system_dirs(host_root: Path = Path("/")) -> list[Path]:
    """The system directories of this host that the jail binds (those that exist)."""
    return [Path("/") / d for d in SYSTEM_DIRS if (host_root / d).exists()]


def mount_plan(workdir: Path, kvm: bool, qemu: str = "/usr/bin/qemu-system-x86_64",
               jail_dir: Path = JAIL_DIR, host_root: Path = Path("/")) -> list[Mount]:
    """The mounts that make the jail of the QEMU whose instance directory is ``workdir``.

    ``qemu`` is the binary's path: a QEMU installed outside the system
    directories (``/opt/qemu/bin/...``) gets its prefix bound read-only too.
    Raises :class:`EngineError` when ``workdir`` lies inside a directory the
    jail binds read-only (its neighbours would be visible).
    """
    if not workdir.is_absolute():
        raise EngineError(f"the instance directory {workdir} must be an absolute path")
    binds = system_dirs(host_root)
    real = Path(os.path.realpath(qemu))
    if not any(_under(real, d) for d in binds) and real.parent.parent != Path("/"):
        binds.append(real.parent.parent)
    for d in binds:
        if _under(workdir, d):
            raise EngineError(f"the instance directory {workdir} is under {d}, which every "
                              "QEMU sees read-only: put POPEK_HOME elsewhere (e.g. /var/lib)")
    devices = (*DEVICES, KVM_DEVICE) if kvm else DEVICES
    plan = [Mount("tmpfs", "/", "tmpfs",
                  ("mode=0755", "size=64k", "nr_inodes=256", "nosuid", "nodev", "noexec"))]
    plan += [Mount(str(d), str(d), "none", BIND_RO) for d in binds]
    plan.append(Mount(str(dev_skeleton(jail_dir, kvm)), "/dev", "none",
                      ("bind", "ro", "nosuid", "noexec", "private", "X-mount.mkdir")))
    plan += [Mount(f"/dev/{name}", f"/dev/{name}", "none", BIND_DEV) for name in devices]
    plan.append(Mount("tmpfs", "/etc", "tmpfs",
                      ("mode=0700", "size=4k", "nr_inodes=2", "ro", "nosuid", "nodev", "noexec",
                       "X-mount.mkdir")))
    plan.append(Mount(str(workdir), str(workdir), "none",
                      ("bind", "nosuid", "nodev", "noexec", "private", "X-mount.mkdir")))
    plan.append(Mount("tmpfs", "/", "tmpfs", ("remount", "ro", "nosuid", "nodev", "noexec")))
    return plan


def _escape(path: str) -> str:
    """Escape a path for an fstab field (as libmount unescapes it)."""
    out = path.replace("\\", "\\134")
    for ch, code in ((" ", "\\040"), ("\t", "\\011"), ("\n", "\\012")):
        out = out.replace(ch, code)
    return out


def fstab(plan: Sequence[Mount], root: Path) -> str:
    """The plan as an fstab for ``mount -a -T``, every target under the jail ``root``."""
    lines = []
    for m in plan:
        target = root if m.target == "/" else root / m.target.lstrip("/")
        opts = ",".join(m.options) or "defaults"
        lines.append(f"{_escape(m.source)} {_escape(str(target))} {m.fstype} {opts} 0 0")
    return "\n".join(lines) + "\n"


def dev_skeleton(jail_dir: Path, kvm: bool) -> Path:
    """The host directory bound at the jail's /dev (empty placeholder files to bind onto)."""
    return jail_dir / ("dev-kvm" if kvm else "dev")


def jail_root(jail_dir: Path = JAIL_DIR) -> Path:
    """The host directory the jail's tmpfs is mounted on (in the namespace only)."""
    return jail_dir / "root"


def prepare_host(jail_dir: Path = JAIL_DIR) -> None:
    """Create, once, the jail's mount point and its /dev placeholders (root-owned).

    The placeholder directories are bound at the jail's /dev and must be
    0755; the directories above them are never seen by QEMU.  Raises
    :class:`EngineError` when a path there is not a directory owned by root.
    """
    devs = [dev_skeleton(jail_dir, kvm) for kvm in (False, True)]
    try:
        for d in (jail_dir.parent, jail_dir, jail_root(jail_dir), *devs):
            d.mkdir(mode=0o755, exist_ok=True)
            st = d.lstat()
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
                raise EngineError(f"{d} must be a directory owned by root")
        for dev, names in zip(devs, (DEVICES, (*DEVICES, KVM_DEVICE)), strict=True):
            if stat.S_IMODE(dev.stat().st_mode) != 0o755:
                os.chmod(dev, 0o755)
            for name in names:
                if not (dev / name).exists():
                    os.close(os.open(dev / name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW
                                     | os.O_CLOEXEC, 0o644))
    except OSError as exc:
        raise EngineError(f"cannot prepare the QEMU jail under {jail_dir}: {exc}") from exc


#: the launcher's shell: join the cgroup (its first N arguments are the files to write
#: 0 into), mount the jail from the fstab on stdin, exec the rest of its arguments
SCRIPT = """set -e
n=$1; shift
while [ "$n" -gt 0 ]; do echo 0 >"$1"; shift; n=$((n - 1)); done
mount -a -T /dev/stdin
umask 077
exec "$@" </dev/null
"""


def launcher_argv(argv: Sequence[str], uid: int, gid: int, groups: Sequence[int],
                  cgroup_join: Sequence[Path], root: Path = jail_root(),
                  setsid: str = "setsid") -> list[str]:
    """The command that starts ``argv`` (QEMU) jailed, detached, as ``uid``/``gid``.

    ``cgroup_join`` are the files the launcher writes ``0`` into to join the
    instance's cgroup (``cgroupfs.create``).  Its stdin must be the fstab of
    the jail (see :func:`fstab`), readable by ``mount`` as ``/dev/stdin`` (a
    regular file or a memfd, not a pipe).  ``chroot`` takes the ids as
    ``+N``: numeric, never looked up in NSS.
    """
    return [
        "unshare", "--mount", "--propagation", "slave", "--",
        "sh", "-c", SCRIPT, "popek-jail", str(len(cgroup_join)), *map(str, cgroup_join),
        "chroot", f"--userspec=+{uid}:+{gid}", "--groups=" + ",".join(f"+{g}" for g in groups),
        str(root), setsid, "--fork", *argv,
    ]
