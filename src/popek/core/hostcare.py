"""Host hygiene: take what one ``POPEK_HOME`` made off the host (reset), put it back (boot).

:func:`reset` (``popek admin reset``) stops every instance of this home (or,
with ``purge``, deletes it), takes its networks off the host (bridges, tap
and veth devices tagged with this home, dnsmasqs, this home's nftables
tables), and removes its cgroups under every hierarchy, v1 and v2
(``popek/<home id>-*``), killing any process left in one.  The records,
images, keys and audit log stay unless ``purge``: then the instances and
networks are deleted and, last, the home itself (:func:`remove_home`).

Reset is per home: it touches only what carries this home's id or tag.
The pieces homes share, ``/run/popek/jail`` (the QEMU jails' mount point),
``/run/popek-sandbox`` and the empty ``popek`` parent cgroups, go only when
no other home has anything on the host (:func:`other_homes`).

:func:`boot` (``popek admin boot``, run by ``popek-boot.service`` at the
host's boot) settles the records with a host that lost everything (the
instances' processes are gone: they are marked stopped), brings the
networks back (bridges, rules, dnsmasq) and starts the instances whose
``boot.autostart`` is true.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from popek import paths, proc
from popek.core.lifecycle import State
from popek.errors import PopekError
from popek.names import DEFAULT_PROJECT

if TYPE_CHECKING:
    from popek.core.service import Core

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: the cgroup every popek cgroup lives under, in each hierarchy
CGROUP_PARENT = "popek"
#: host directories every home shares (see the module's text)
SHARED_DIRS = (Path("/run/popek/jail"), Path("/run/popek-sandbox"))
#: how long a stray process of this home's cgroups gets to die after SIGKILL
KILL_TIMEOUT = 5.0


@dataclass
class Report:
    """What a reset or boot did: one line per change, and what failed."""

    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def step(self, what: str, fn: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        """Run ``fn(*args, **kwargs)``; note ``what`` when it worked, the error when it raised."""
        try:
            fn(*args, **kwargs)
        except (PopekError, OSError) as exc:
            self.failed.append(f"{what}: {exc}")
        else:
            self.done.append(what)


# -- cgroups -------------------------------------------------------------------------
def hierarchies(root: Path = CGROUP_ROOT) -> list[Path]:
    """Every mounted cgroup hierarchy (each v1 controller, the v2 one), each once."""
    mounts: list[Path] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            fstype = right.split(" ", 1)[0]
            where = Path(left.split(" ")[4].replace("\\040", " "))
            if fstype in ("cgroup", "cgroup2") and (where == root or root in where.parents) \
                    and where not in mounts:
                mounts.append(where)
    return mounts


def home_cgroups(home_id: str, root: Path = CGROUP_ROOT) -> list[Path]:
    """The cgroup directories of home ``home_id``: ``popek/<home id>-*`` in every hierarchy."""
    out: list[Path] = []
    for h in hierarchies(root):
        parent = h / CGROUP_PARENT
        with contextlib.suppress(OSError):
            out += sorted(d for d in parent.iterdir()
                          if d.is_dir() and d.name.startswith(f"{home_id}-"))
    return out


def _pids(d: Path) -> list[int]:
    """The pids in cgroup directory ``d`` and below (living ones)."""
    pids: list[int] = []
    for sub, _, _ in os.walk(d):
        with contextlib.suppress(OSError, ValueError):
            pids += [int(x) for x in (Path(sub) / "cgroup.procs").read_text().split()]
    return [p for p in pids if proc.start_time(p) is not None]


def _kill_all(d: Path) -> list[int]:
    """SIGKILL every process of cgroup ``d`` and below until none is left."""
    from popek.engines.cgroupfs import kill_listed

    return kill_listed(lambda: _pids(d), f"cgroup {d}", KILL_TIMEOUT)


def _rmdir_tree(d: Path) -> None:
    """Remove cgroup directory ``d`` and its children, deepest first (EBUSY retried)."""
    from popek.engines import cgroupfs

    for sub, _, _ in sorted(os.walk(d), key=lambda w: -len(Path(w[0]).parts)):
        cgroupfs.rmdir(Path(sub), time.monotonic() + 2.0)


def remove_cgroups(home_id: str, report: Report, root: Path = CGROUP_ROOT) -> None:
    """Kill what is left in this home's cgroups and remove them, in every hierarchy."""
    def one(d: Path) -> None:
        if killed := _kill_all(d):
            report.done.append(f"killed stray processes {killed} of cgroup {d}")
        _rmdir_tree(d)

    for d in home_cgroups(home_id, root):
        report.step(f"removed cgroup {d}", one, d)


# -- processes ---------------------------------------------------------------------
#: the commands popek starts for a home: QEMU, swtpm, dnsmasq, the console logger (Python)
HELPER_COMMS = ("qemu-system", "swtpm", "dnsmasq", "python")


def home_processes(home: Path, proc_root: Path = Path("/proc")) -> dict[int, str]:
    """The processes popek started for ``home`` that still run: pid -> command name.

    One of :data:`HELPER_COMMS` with an argument in the home's ``instances/``
    or ``networks/`` (a QEMU's files, swtpm's state, dnsmasq's pid file, the
    console logger's fifo); nothing else, whatever its arguments name.
    """
    marks = {f"{h}/{sub}/" for h in {str(home), str(home.resolve())}
             for sub in ("instances", "networks")}
    found: dict[int, str] = {}
    for d in proc_root.iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            comm = (d / "comm").read_text().strip()
            if not comm.startswith(HELPER_COMMS):
                continue
            args = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(m in a for a in args for m in marks):
            found[int(d.name)] = comm
    return found


# -- other homes ---------------------------------------------------------------------
def other_homes(home_id: str, tag: str, root: Path = CGROUP_ROOT) -> list[str]:
    """What shows that another home uses this host (empty: this home is alone).

    A cgroup under ``popek/`` that is not this home's (another home's
    instance or a sandbox), a ``pk-*`` device tagged with another home, a
    popek nftables table of another home, or another home in the host-wide
    registries whose state store still exists.
    """
    seen: list[str] = []
    for h in hierarchies(root):
        with contextlib.suppress(OSError):
            seen += [f"cgroup {d}" for d in (h / CGROUP_PARENT).iterdir()
                     if d.is_dir() and not d.name.startswith(f"{home_id}-")]
    with contextlib.suppress(PopekError, OSError):
        from popek.network.netlink import PREFIX, NetlinkHost

        seen += [f"device {name}" for name, link in NetlinkHost().links().items()
                 if name.startswith(PREFIX) and link.alias.startswith("popek:")
                 and link.alias != tag]
    with contextlib.suppress(PopekError, OSError):
        from popek.network import nft

        mine = nft.table_name()
        seen += [f"nftables table {t}" for t in _nft_tables()
                 if (t == nft.TABLE or t.startswith(f"{nft.TABLE}-")) and t != mine]
    seen += [f"home {h}" for h in _registered_homes() if h != str(paths.home().resolve())]
    return seen


def _nft_tables() -> list[str]:
    import json
    import subprocess

    nft = proc.tool("nft")
    if not nft:
        return []
    out = subprocess.run([nft, "-j", "list", "tables"], capture_output=True, text=True,
                         timeout=30, check=False)
    if out.returncode != 0:
        return []
    return [item["table"]["name"] for item in json.loads(out.stdout).get("nftables", [])
            if "table" in item]


def _registered_homes() -> set[str]:
    """Homes named in the host-wide registry whose state store still exists."""
    from popek.state import hostwide

    try:
        return hostwide.homes()
    except (PopekError, OSError):
        return set()


def _mounts_under(top: Path) -> list[Path]:
    out: list[Path] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            where = Path(line.split(" ")[4].replace("\\040", " "))
            if where == top or top in where.parents:
                out.append(where)
    return out


def remove_shared(report: Report, shared: tuple[Path, ...] = SHARED_DIRS,
                  root: Path = CGROUP_ROOT) -> None:
    """Remove what homes share: ``shared`` directories (never one with a mount below
    it) and the ``popek`` parent cgroups of the hierarchies under ``root`` when empty."""
    for top in shared:
        if not top.exists():
            continue
        if mounts := _mounts_under(top):
            report.failed.append(f"kept {top}: {mounts[0]} is mounted")
            continue
        report.step(f"removed {top}", shutil.rmtree, top)  # nothing is mounted below it
    for h in hierarchies(root):
        with contextlib.suppress(OSError):
            os.rmdir(h / CGROUP_PARENT)
            report.done.append(f"removed cgroup {h / CGROUP_PARENT}")


# -- reset ---------------------------------------------------------------------------
def _purge_storage(core: Core, report: Report) -> None:
    """Delete every volume (clones before their origins; each an audited request) and
    every pool but ``local``: a pool's files may be outside the home ``--purge`` removes."""
    from popek.core.requests import PoolDelete, VolumeDelete
    from popek.storage.model import DEFAULT_POOL
    from popek.storage.service import Storage

    storage = Storage(core.store)
    tried: set[tuple[str, str, str]] = set()
    while True:  # a volume goes once no clone of it is left (a clone of a clone first)
        ready = [v for v in storage.volumes() if (v.pool, v.project, v.name) not in tried
                 and not storage.clones_of(v.pool, v.project, v.name)]
        if not ready:
            break
        for vol in ready:
            tried.add((vol.pool, vol.project, vol.name))
            report.step(f"deleted volume {vol.pool}/{vol.name} of project {vol.project}",
                        core.in_project(vol.project).handle, VolumeDelete(vol.pool, vol.name))
    for pool in storage.pools():
        if pool.name != DEFAULT_POOL:
            report.step(f"deleted storage pool {pool.name}", core.handle, PoolDelete(pool.name))


def reset(core: Core, purge: bool = False) -> Report:
    """Take this home off the host; ``purge``: delete its instances, networks and volumes
    too.

    Runs every step even when one fails (each failure is reported).  The
    nested stops and deletes are requests of their own, each audited.  With
    ``purge`` the home itself is removed by :func:`remove_home`, after the
    reset's own audit record is written.
    """
    from popek.core.requests import Delete, NetworkDelete, Stop
    from popek.network import dnsmasq, nft
    from popek.network.host import HostBackend, home_tag, networks_dir
    from popek.network.netlink import PREFIX
    from popek.network.service import Networks

    report = Report()
    for inst in core.instances.all(None):
        where = core.in_project(inst.project)  # an instance's name is of its project
        if purge:
            report.step(f"deleted instance {inst.name}", where.handle,
                        Delete(inst.name, force=True))
        elif inst.state != State.STOPPED:
            report.step(f"stopped instance {inst.name}", where.handle,
                        Stop(inst.name, force=True, timeout=10))
    nets = Networks(core.store, reconcile=False)
    backend = HostBackend()
    for net in nets.list():
        if purge:  # a network is named in its project (NetworkDelete acts in the core's)
            of = "" if net.project == DEFAULT_PROJECT else f" of project {net.project}"
            report.step(f"deleted network {net.short}{of} (bridge {net.bridge})",
                        core.in_project(net.project).handle,
                        NetworkDelete(net.short, force=True))
        else:
            report.step(f"removed bridge {net.bridge} and dnsmasq of network {net.name}",
                        backend.teardown_network, net)
    if purge:
        _purge_storage(core, report)
    tag = home_tag()
    for name, link in backend.nl.links().items():
        if name.startswith(PREFIX) and link.alias == tag:
            report.step(f"removed device {name}", backend.nl.delete, name)
    for pid in dnsmasq.running(networks_dir()):
        report.step(f"stopped dnsmasq {pid}", dnsmasq.stop, pid, proc.start_time(pid) or 0)
    left = home_processes(paths.home())
    if left:  # helpers whose records are gone (a lost store, an interrupted launch)
        from popek.engines.cgroupfs import kill_listed

        report.step(f"killed stray processes of this home: "
                    f"{', '.join(f'{p} ({c})' for p, c in sorted(left.items()))}",
                    kill_listed, lambda: [p for p in home_processes(paths.home()) if p in left],
                    "this home's helpers")
    tables = [t for t in _nft_tables() if t == nft.table_name()]
    if tables:
        report.step(f"removed nftables tables bridge/inet {nft.table_name()}", nft.remove_all)
    remove_cgroups(paths.home_id(), report)
    with contextlib.suppress(PopekError, OSError):  # sandboxes' whose popek process is gone
        from popek.engines.sandbox import cgroup as sandbox_cgroup

        sandbox_cgroup.sweep()
    others = other_homes(paths.home_id(), tag)
    if others:
        report.done.append(f"kept what homes share ({others[0]} shows another home)")
    else:
        remove_shared(report)
    return report


def remove_home(home: Path | None = None) -> list[str]:
    """Remove the home (``purge``, after :func:`reset`); unmount what is left in it first."""
    home = home or paths.home()
    lines: list[str] = []
    for where in sorted(_mounts_under(home), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            _umount(where)
            lines.append(f"unmounted {where}")
    shutil.rmtree(home)
    lines.append(f"removed {home} (state, images, keys, audit log)")
    return lines


def _umount(where: Path) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(str(where).encode(), 2) != 0:  # MNT_DETACH
        raise OSError(ctypes.get_errno(), f"umount {where}")


# -- boot ----------------------------------------------------------------------------
def boot(core: Core, progress: Callable[[str], None] | None = None) -> Report:
    """Bring this home back after the host booted: records settled, networks, autostart.

    Instances whose processes are gone are marked stopped (reconcile); the
    host-wide registry is made to match this home's store (uid ranges, CPU
    pins: :meth:`popek.core.records.Records.heal_host`); the
    networks' bridges, nftables rules and dnsmasqs are restored; then every
    stopped instance with ``boot.autostart`` true is started (each start a
    request of its own, audited).  A start that fails is reported and the
    others still start.
    """
    from popek.core.requests import Start
    from popek.network.service import Networks

    report = Report()
    report.done += core.instances.reconcile(None)
    report.step("host-wide uid ranges and CPU pins matched to this home",
                core.instances.records.heal_host)
    report.done += Networks(core.store, reconcile=False).reconcile()
    for inst in core.instances.all(None):
        if inst.spec.autostart and inst.state == State.STOPPED:
            start = Start(inst.name) if progress is None else Start(inst.name, progress=progress)
            report.step(f"started instance {inst.name} (boot.autostart)",
                        core.in_project(inst.project).handle, start)
    return report
