"""The metrics collector (core/metrics.py) on fake cgroup and sysfs trees, and its rendering."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from popek.api.metrics import UsageCollector, render, scope_of
from popek.core.lifecycle import State
from popek.core.metrics import Collector, Snapshot
from popek.core.model import Instance, InstanceSpec
from popek.engines import cgroupfs
from popek.network.model import Network, Port
from popek.state.schema import instance_key, network_key, port_key
from popek.state.store import SQLiteStore

HOME_ID = "0123456789ab"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v1_cgroup(root: Path, rel: str, cpu_ns: int, memory: int, read: int, write: int) -> None:
    """Make the v1 files of one cgroup, as the kernel shows them."""
    for ctl in ("cpu", "memory", "pids", "cpuacct", "blkio"):
        (root / ctl / rel).mkdir(parents=True, exist_ok=True)
    _write(root / "cpuacct" / rel / "cpuacct.usage", f"{cpu_ns}\n")
    _write(root / "memory" / rel / "memory.usage_in_bytes", f"{memory}\n")
    _write(root / "blkio" / rel / "blkio.throttle.io_service_bytes_recursive",
           f"7:3 Read {read - 100}\n7:3 Write {write}\n7:3 Sync 0\n7:3 Async {write}\n"
           f"7:3 Total {read - 100 + write}\n8:0 Read 100\n8:0 Write 0\nTotal {read + write}\n")


def v2_cgroup(root: Path, rel: str, cpu_us: int, memory: int, read: int, write: int) -> None:
    """Make the v2 files of one cgroup."""
    _write(root / "cgroup.controllers", "cpu io memory pids\n")
    _write(root / rel / "cpu.stat", f"usage_usec {cpu_us}\nuser_usec 1\nsystem_usec 2\n")
    _write(root / rel / "memory.current", f"{memory}\n")
    _write(root / rel / "io.stat",
           f"7:3 rbytes={read} wbytes={write - 1} rios=3 wios=4 dbytes=0 dios=0\n"
           f"8:0 rbytes=0 wbytes=1 rios=0 wios=1 dbytes=0 dios=0\n")


def device(sysfs: Path, name: str, rx: int, tx: int, rxp: int, txp: int) -> None:
    """Make the statistics of one host network device."""
    for field, value in (("rx_bytes", rx), ("tx_bytes", tx), ("rx_packets", rxp),
                         ("tx_packets", txp)):
        _write(sysfs / name / "statistics" / field, f"{value}\n")


def put_instance(store: SQLiteStore, name: str, engine: str, state: State,
                 project: str = "default") -> None:
    inst = Instance(name=name, spec=InstanceSpec(image="minimal", engine=engine), state=state,
                    uid=1000, created="now", project=project)
    store.put(instance_key(project, name), inst.to_json())


def put_port(store: SQLiteStore, network: str, instance: str, ifname: str) -> None:
    port = Port(network=network, instance=instance, kind="veth", host_ifname=ifname,
                mac="02:00:00:00:00:01", ipv4="10.9.0.2")
    store.put(port_key(network, ifname), port.to_json())


@pytest.fixture
def store(tmp_path: Path) -> SQLiteStore:
    return SQLiteStore(tmp_path / "state.db")


def test_v1_counters_ports_and_bridges(tmp_path: Path, store: SQLiteStore,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    cg, sysfs = tmp_path / "cgroup", tmp_path / "net"
    put_instance(store, "web", "container", State.RUNNING)
    put_instance(store, "db", "container", State.PAUSED, project="p2")
    put_instance(store, "off", "container", State.STOPPED)
    v1_cgroup(cg, f"popek/{HOME_ID}-default-web", 2_500_000_000, 64 << 20, 4096, 8192)
    v1_cgroup(cg, f"popek/{HOME_ID}-p2-db", 1_000_000_000, 32 << 20, 0, 0)
    v1_cgroup(cg, f"popek/{HOME_ID}-default-off", 7, 7, 7, 7)  # stopped: never read
    store.put(network_key("lan"), Network(name="lan", subnet="10.9.0.0/24", gateway="10.9.0.1",
                                          bridge="pk-br1").to_json())
    put_port(store, "lan", "default/web", "pk-v1")
    put_port(store, "lan", "default/web", "pk-v2")
    device(sysfs, "pk-v1", rx=100, tx=1000, rxp=1, txp=10)  # host side: rx = what web sent
    device(sysfs, "pk-v2", rx=200, tx=2000, rxp=2, txp=20)
    device(sysfs, "pk-br1", rx=5, tx=6, rxp=7, txp=8)

    snap = Collector(store, cgroup_root=cg, sysfs_net=sysfs, home_id=HOME_ID).collect()

    by_name = {u.name: u for u in snap.instances}
    assert sorted(by_name) == ["db", "web"]
    web = by_name["web"]
    assert (web.type, web.state, web.cpu_seconds, web.memory_bytes) == \
        ("container", "running", 2.5, 64 << 20)
    assert (web.disk_read_bytes, web.disk_write_bytes) == (4096, 8192)
    assert (web.network_rx_bytes, web.network_tx_bytes) == (3000, 300)
    assert (web.network_rx_packets, web.network_tx_packets) == (30, 3)
    db = by_name["db"]
    assert (db.project, db.state, db.memory_bytes, db.network_rx_bytes) == \
        ("p2", "paused", 32 << 20, None)
    [lan] = snap.networks
    assert (lan.name, lan.rx_bytes, lan.tx_bytes, lan.rx_packets, lan.tx_packets) == \
        ("lan", 5, 6, 7, 8)

    # a token of project p2 sees p2's instances only, and no host-wide network
    scoped = Collector(store, cgroup_root=cg, sysfs_net=sysfs, home_id=HOME_ID).collect("p2")
    assert [u.name for u in scoped.instances] == ["db"]
    assert scoped.networks == []


def test_scope_of_an_identity() -> None:
    from popek.core.auth import Identity, host_admin

    assert scope_of(host_admin()) is None
    assert scope_of(Identity("token t (x)", "p2", "viewer")) == "p2"


def test_v2_counters(tmp_path: Path, store: SQLiteStore,
                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    cg = tmp_path / "cgroup2"
    v2_cgroup(cg, f"popek/{HOME_ID}-default-web", 1_500_000, 10 << 20, 300, 400)
    assert cgroupfs.is_v2(cg)
    put_instance(store, "web", "container", State.RUNNING)
    [web] = Collector(store, cgroup_root=cg, sysfs_net=tmp_path / "net",
                      home_id=HOME_ID).collect().instances
    assert (web.cpu_seconds, web.memory_bytes, web.disk_read_bytes, web.disk_write_bytes) == \
        (1.5, 10 << 20, 300, 400)


def test_gone_cgroup_and_missing_qemu_leave_counters_out(tmp_path: Path, store: SQLiteStore,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An instance whose cgroup or QMP socket is gone (it is dying) has no counters: no error."""
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    put_instance(store, "vm1", "qemu", State.RUNNING)
    put_port(store, "lan", "default/vm1", "pk-gone")
    [vm] = Collector(store, cgroup_root=tmp_path / "cg", sysfs_net=tmp_path / "net",
                     home_id=HOME_ID).collect().instances
    assert vm.type == "vm"
    assert [vm.cpu_seconds, vm.memory_bytes, vm.disk_read_bytes, vm.network_rx_bytes] == \
        [None] * 4


def test_two_hundred_instances_in_one_cheap_pass(tmp_path: Path, store: SQLiteStore,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    cg, sysfs = tmp_path / "cgroup", tmp_path / "net"
    for i in range(200):
        put_instance(store, f"c{i}", "container", State.RUNNING)
        v1_cgroup(cg, f"popek/{HOME_ID}-default-c{i}", i, i << 20, i, i)
        put_port(store, "lan", f"default/c{i}", f"pk-v{i}")
        device(sysfs, f"pk-v{i}", i, i, i, i)
    collector = Collector(store, cgroup_root=cg, sysfs_net=sysfs, home_id=HOME_ID)
    started = time.perf_counter()
    snap = collector.collect()
    elapsed = time.perf_counter() - started
    assert len(snap.instances) == 200
    assert all(u.memory_bytes is not None for u in snap.instances)
    # well under a second on this 2-core host, even with others' tests running (about 40 ms)
    assert elapsed < 0.5, f"a scrape of 200 instances took {elapsed:.3f} s"


def test_rendering_in_the_prometheus_text_format(tmp_path: Path, store: SQLiteStore,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    cg, sysfs = tmp_path / "cgroup", tmp_path / "net"
    put_instance(store, "web", "container", State.RUNNING)
    v1_cgroup(cg, f"popek/{HOME_ID}-default-web", 2_000_000_000, 5 << 20, 10, 20)
    store.put(network_key("lan"), Network(name="lan", subnet="10.9.0.0/24", gateway="10.9.0.1",
                                          bridge="pk-br1").to_json())
    device(sysfs, "pk-br1", rx=5, tx=6, rxp=7, txp=8)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(UsageCollector(
        Collector(store, cgroup_root=cg, sysfs_net=sysfs, home_id=HOME_ID).collect))

    text = render(registry).decode()

    assert 'popek_instance_memory_bytes{name="web",project="default",type="container"} ' in text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    web = (("name", "web"), ("project", "default"), ("type", "container"))
    assert samples[("popek_instance_cpu_seconds_total", web)] == 2.0
    assert samples[("popek_instance_memory_bytes", web)] == 5 << 20
    assert samples[("popek_instance_disk_write_bytes_total", web)] == 20
    assert samples[("popek_network_tx_bytes_total", (("network", "lan"),))] == 6
    assert ("popek_instance_network_rx_bytes_total", web) not in samples  # no port: no series
    assert "# TYPE popek_instance_cpu_seconds_total counter" in text


def test_an_empty_home_renders_the_families_without_samples() -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(UsageCollector(Snapshot))
    text = render(registry).decode()
    assert "# TYPE popek_instance_memory_bytes gauge" in text
    assert "popek_metrics_collect_seconds 0.0" in text


def test_the_api_serves_metrics_and_counts_its_requests(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """GET /metrics of the application, after a 404 on a route and one on no route at all."""
    from fastapi.testclient import TestClient

    from popek.api.app import create_app

    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    with TestClient(create_app()) as client:
        assert client.get("/1.0/instances/nope").status_code == 404
        assert client.get("/no/such/thing").status_code == 404
        answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(answer.text) for s in fam.samples}
    route = (("method", "GET"), ("route", "/1.0/instances/{name}"))
    assert samples[("popek_api_requests_total", (*route, ("status", "404")))] == 1
    assert samples[("popek_api_requests_total", (("method", "GET"), ("route", "unmatched"),
                                                 ("status", "404")))] == 1
    assert samples[("popek_api_request_seconds_count", route)] == 1
    assert ("popek_metrics_collect_seconds", ()) in samples


def test_the_two_listeners_of_one_server_count_into_one_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local socket's application and the TCP one share their runner: and their counters."""
    from fastapi.testclient import TestClient

    from popek.api.app import create_app
    from popek.api.runner import Runner

    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    runner = Runner()
    local, tcp = create_app(runner, local=True), create_app(runner, local=False)
    other = create_app(Runner(), local=True)
    with TestClient(local) as client:
        client.get("/1.0/instances/nope")
    assert tcp.state.metrics is local.state.metrics
    assert other.state.metrics is not local.state.metrics
    text = render(tcp.state.metrics.registry).decode()
    assert 'popek_api_requests_total{method="GET",route="/1.0/instances/{name}",status="404"} 1.0' \
        in text


def test_qmp_blockstats_never_waits_for_a_busy_or_absent_qemu(tmp_path: Path) -> None:
    """A VM whose QMP lock another command holds is skipped at once; one not answering too."""
    import fcntl
    import socket

    from popek.engines.qemu import qmp

    busy, silent = tmp_path / "busy" / "qmp.sock", tmp_path / "silent" / "qmp.sock"
    for sock in (busy, silent):
        sock.parent.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(silent))
    listener.listen(1)  # accepts, never greets: a QEMU that hangs
    with open(busy.with_suffix(".lock"), "a") as held, listener:
        fcntl.flock(held, fcntl.LOCK_EX)
        started = time.monotonic()
        assert qmp.blockstats([busy, silent], timeout=0.3) == {}
        assert time.monotonic() - started < 2


def test_storage_pools_are_gauges_of_the_host_not_of_a_project(tmp_path: Path,
                                                              store: SQLiteStore,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    from popek.storage.service import Storage

    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    Storage(store).create_volume("local", "default", "data", 16 << 20)
    collector = Collector(store, cgroup_root=tmp_path / "cg", sysfs_net=tmp_path / "net",
                          home_id=HOME_ID)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(UsageCollector(collector.collect))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(render(registry).decode())
               for s in fam.samples}
    local = (("driver", "dir"), ("pool", "local"))
    assert samples[("popek_storage_pool_volumes", local)] == 1
    assert 0 < samples[("popek_storage_pool_used_bytes", local)] < 16 << 20  # thin
    assert 0 < samples[("popek_storage_pool_free_bytes", local)] <= \
        samples[("popek_storage_pool_size_bytes", local)]
    assert collector.collect(project="default").pools == []  # a project's scrape: none
