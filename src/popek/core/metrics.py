"""Usage counters of the instances and networks of this home, read in one pass.

:meth:`Collector.collect` is what a ``/metrics`` scrape runs.  It reads the
store once (the instance records and the port and network records), and for
each active instance (``starting``, ``running``, ``paused``, ``stopping``):

- CPU time, memory and block I/O from its cgroup,
  ``popek/<home id>-<project>-<name>`` on v1 or v2
  (:func:`popek.engines.cgroupfs.counters`: three or four small files);
- for a VM, the bytes its guest read and wrote on its block devices from
  QEMU itself (``query-blockstats`` over QMP, every VM asked at once:
  :func:`popek.engines.qemu.qmp.blockstats`), since the cgroup counts only
  what reaches a host block device, not what the page cache absorbs; a VM
  whose QMP socket is busy or silent is left out of the disk counters of
  that scrape (never counted from the cgroup instead: a counter must not
  jump between sources);
- network bytes and packets from the host side of its ports (the ``pk-*``
  taps and veths, :func:`popek.network.stats.read`), turned round so that
  ``rx`` is what the *instance* received (what the host device sent);

and for each network, the counters of its bridge device (traffic between the
network and the host: the gateway, DHCP and DNS, NAT); for each storage pool,
its size, used and free bytes and its volume count (a ``statvfs`` and a
``stat`` per volume file).  No process is
started and no lock is waited for: 200 instances take a few tens of
milliseconds (``tests/unit/test_metrics.py``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from popek import paths
from popek.core.lifecycle import ACTIVE
from popek.core.model import Instance
from popek.engines import cgroupfs
from popek.engines.qemu.cmdline import Paths as QemuPaths
from popek.network import stats as netstats
from popek.state.schema import NETWORKS_PREFIX, PORTS_PREFIX, instances_prefix
from popek.state.store import StateStore

#: the ``type`` label of each engine (incus's words)
TYPES = {"qemu": "vm", "container": "container"}


@dataclass
class InstanceUsage:
    """The counters of one active instance; ``None`` where no source said."""

    project: str
    name: str
    type: str
    state: str
    cpu_seconds: float | None = None
    memory_bytes: int | None = None
    disk_read_bytes: int | None = None
    disk_write_bytes: int | None = None
    #: from the instance's point of view (what the host side of its ports sent it)
    network_rx_bytes: int | None = None
    network_tx_bytes: int | None = None
    network_rx_packets: int | None = None
    network_tx_packets: int | None = None


@dataclass
class NetworkUsage:
    """The counters of one network's bridge, from the host's point of view."""

    name: str
    bridge: str
    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int


@dataclass
class PoolUsage:
    """The space of one storage pool, in bytes (``None`` where its filesystem is gone)."""

    name: str
    driver: str
    size: int | None
    used: int
    free: int | None
    volumes: int


@dataclass
class Snapshot:
    """One scrape: every active instance, network and storage pool, and what it cost."""

    instances: list[InstanceUsage] = field(default_factory=list)
    networks: list[NetworkUsage] = field(default_factory=list)
    pools: list[PoolUsage] = field(default_factory=list)
    seconds: float = 0.0


class Collector:
    """Reads the counters of this home's instances and networks (:meth:`collect`)."""

    def __init__(self, store: StateStore, cgroup_root: Path = cgroupfs.ROOT,
                 sysfs_net: Path = netstats.SYSFS_NET, qmp_timeout: float = 0.5,
                 home_id: str | None = None) -> None:
        """Read from ``store``; the roots and the QMP deadline can be changed for tests."""
        self.store = store
        self.cgroup_root = cgroup_root
        self.sysfs_net = sysfs_net
        self.qmp_timeout = qmp_timeout
        self.home_id = home_id

    def collect(self, project: str | None = None) -> Snapshot:
        """Read every active instance's and every network's counters once.

        With ``project``, only that project's instances, and no network (a
        network is host-wide: its counters are the host admin's to see).
        """
        started = time.perf_counter()
        home_id = self.home_id or paths.home_id()
        v2 = cgroupfs.is_v2(self.cgroup_root)
        active: list[Instance] = []
        for kv in self.store.range(instances_prefix(project)):
            inst = Instance.from_json(kv.value)
            if inst.state in ACTIVE:
                active.append(inst)
        ports: dict[str, list[str]] = {}
        for kv in self.store.range(PORTS_PREFIX):
            doc = json.loads(kv.value)
            ports.setdefault(str(doc.get("instance", "")), []).append(str(doc["host_ifname"]))
        snap = Snapshot()
        instances = paths.instances_dir()
        vms: dict[Path, InstanceUsage] = {}
        for inst in active:
            usage = InstanceUsage(inst.project, inst.name,
                                  TYPES.get(inst.spec.engine, inst.spec.engine), inst.state.value)
            c = cgroupfs.counters(f"popek/{home_id}-{inst.project}-{inst.name}",
                                  self.cgroup_root, v2)
            usage.cpu_seconds, usage.memory_bytes = c.cpu_seconds, c.memory
            if inst.spec.engine == "qemu":
                vms[QemuPaths(instances / inst.project / inst.name).qmp] = usage
            else:
                usage.disk_read_bytes, usage.disk_write_bytes = c.read_bytes, c.write_bytes
            self._network(usage, ports.get(f"{inst.project}/{inst.name}", []))
            snap.instances.append(usage)
        if vms:
            self._blockstats(vms)
        for kv in self.store.range(NETWORKS_PREFIX) if project is None else []:
            doc = json.loads(kv.value)
            dev = netstats.read(str(doc.get("bridge", "")), self.sysfs_net)
            if dev is not None:
                snap.networks.append(NetworkUsage(str(doc["name"]), str(doc["bridge"]),
                                                  dev.rx_bytes, dev.tx_bytes,
                                                  dev.rx_packets, dev.tx_packets))
        if project is None:  # pools are host-wide, as networks
            self._pools(snap)
        snap.seconds = time.perf_counter() - started
        return snap

    def _pools(self, snap: Snapshot) -> None:
        """Each pool's size, free and used bytes (its volumes' files: a stat each)."""
        from popek.storage.service import Storage

        storage = Storage(self.store)
        for pool in storage.pools():
            info = storage.pool_info(pool.name)
            ok = info["health"] == "ok"
            snap.pools.append(PoolUsage(pool.name, pool.driver, info["size"] if ok else None,
                                        int(info["used"]), info["free"] if ok else None,
                                        int(info["volumes"])))

    def _network(self, usage: InstanceUsage, ifnames: list[str]) -> None:
        """Add up the host side of the instance's ports, turned to the instance's view."""
        devs = [d for d in (netstats.read(n, self.sysfs_net) for n in ifnames) if d is not None]
        if not devs:
            return
        usage.network_rx_bytes = sum(d.tx_bytes for d in devs)
        usage.network_tx_bytes = sum(d.rx_bytes for d in devs)
        usage.network_rx_packets = sum(d.tx_packets for d in devs)
        usage.network_tx_packets = sum(d.rx_packets for d in devs)

    def _blockstats(self, vms: dict[Path, InstanceUsage]) -> None:
        from popek.engines.qemu import qmp

        live = [sock for sock in vms if sock.exists()]
        for sock, (read, write) in qmp.blockstats(live, self.qmp_timeout).items():
            vms[sock].disk_read_bytes, vms[sock].disk_write_bytes = read, write
