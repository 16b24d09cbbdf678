"""The network service over a SQLiteStore in tmp_path, with a fake host (no root)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from popek.errors import AlreadyExists, InvalidInput, NotFound, ResourceError, StateError
from popek.network import Network, Networks, Port
from popek.network.host import Reconciled
from popek.network.ipam import Used
from popek.state.store import SQLiteStore


class FakeHost:
    """Records what the service asks of the host."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.host_subnets = [Used(ipaddress.IPv4Network("192.168.50.0/24"),
                                  "address 192.168.50.2/24 on host device eth9")]
        self.fail_port = False

    def used_subnets(self, own_bridges: set[str]) -> list[Used]:
        return list(self.host_subnets)

    def setup_network(self, net: Network) -> tuple[int, int]:
        self.calls.append(f"setup {net.name}")
        return 4242, 1

    def teardown_network(self, net: Network) -> None:
        self.calls.append(f"teardown {net.name}")

    def setup_port(self, net: Network, port: Port) -> None:
        if self.fail_port:
            raise InvalidInput("boom")
        self.calls.append(f"port {port.host_ifname}")

    def teardown_port(self, port: Port) -> None:
        self.calls.append(f"unport {port.host_ifname}")

    def ensure_port(self, net: Network, port: Port) -> bool:
        return False

    def dhcp_reload(self, net: Network, ports: Sequence[Port], restart: bool) -> tuple[int, int]:
        self.calls.append(f"dhcp {net.name} {len(ports)} {'restart' if restart else 'hup'}")
        return net.dnsmasq_pid, net.dnsmasq_start

    def apply_rules(self, networks: Sequence[Network], ports: Sequence[Port]) -> None:
        self.calls.append(f"rules {len(networks)} {len(ports)}")

    def reconcile(self, networks: Sequence[Network], ports: Sequence[Port],
                  active: set[str], keep: set[str]) -> Reconciled:
        return Reconciled()

    def status(self, net: Network, ports: Sequence[Port]) -> dict[str, Any]:
        return {}

    def shape_port(self, port: Port, rate: int | None, guest_pid: int | None) -> None:
        self.calls.append(f"shape {port.host_ifname} {rate}")


@pytest.fixture
def svc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Networks:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path))
    return Networks(SQLiteStore(tmp_path / "state.db"), backend=FakeHost())


def test_create_picks_subnet_and_records(svc: Networks) -> None:
    a = svc.create("a")
    b = svc.create("b")
    assert (a.subnet, a.gateway, a.state) == ("10.200.0.0/24", "10.200.0.1", "ready")
    assert b.subnet == "10.200.1.0/24"
    assert a.bridge.startswith("pk-") and len(a.bridge) <= 15 and a.bridge != b.bridge
    assert a.dnsmasq_pid == 4242
    assert [n.name for n in svc.list()] == ["a", "b"]


def test_create_refusals_change_nothing(svc: Networks) -> None:
    svc.create("a", subnet="10.5.0.0/16")
    rev = svc.store.revision()
    with pytest.raises(AlreadyExists, match="network 'a' already exists"):
        svc.create("a")
    with pytest.raises(AlreadyExists, match="overlaps 10.5.0.0/16 .popek network a"):
        svc.create("b", subnet="10.5.7.0/24")
    with pytest.raises(AlreadyExists, match="eth9"):
        svc.create("b", subnet="192.168.50.0/25")
    with pytest.raises(InvalidInput, match="invalid network name"):
        svc.create("B")
    assert svc.store.revision() == rev
    assert [n.name for n in svc.list()] == ["a"]


def test_get_not_found_lists_existing(svc: Networks) -> None:
    svc.create("a")
    with pytest.raises(NotFound, match="existing networks: a"):
        svc.get("zz")


def test_ports_ipam_and_macs(svc: Networks) -> None:
    svc.create("a", subnet="10.9.0.0/29")
    p1 = svc.create_port("a", "vm1", "tap", 900000001)
    p2 = svc.create_port("a", "prod/ct1", "veth", 1000000000)
    assert (p1.ipv4, p2.ipv4) == ("10.9.0.2", "10.9.0.3")
    assert p1.mac.startswith("52:54:00:") and p2.mac.startswith("02:")
    assert p1.ipv6[0].startswith("fe80::") and p1.uid == 900000001
    assert p2.peer_ifname == p2.host_ifname + "p" and len(p2.peer_ifname) <= 15
    assert p1.instance == "default/vm1" and p2.instance == "prod/ct1"
    with pytest.raises(AlreadyExists, match="already leased"):
        svc.create_port("a", "vm2", "tap", 1, ipv4="10.9.0.2")
    with pytest.raises(AlreadyExists, match="MAC address"):
        svc.create_port("a", "vm2", "tap", 1, mac=p1.mac)
    with pytest.raises(InvalidInput, match="outside"):
        svc.create_port("a", "vm2", "tap", 1, ipv4="10.8.0.2")
    with pytest.raises(InvalidInput, match="port kind"):
        svc.create_port("a", "vm2", "macvtap", 1)
    with pytest.raises(InvalidInput, match="uid"):
        svc.create_port("a", "vm2", "tap", -5)
    svc.create_port("a", "vm3", "tap", 1, ipv4="10.9.0.6")
    svc.create_port("a", "vm4", "tap", 1)
    svc.create_port("a", "vm5", "tap", 1)
    with pytest.raises(ResourceError, match="no free IPv4"):
        svc.create_port("a", "vm6", "tap", 1)
    assert [p.instance for p in svc.ports(instance="vm1")] == ["default/vm1"]
    assert len(svc.ports(network="a")) == 5
    svc.delete_port(p1)
    assert svc.create_port("a", "vm7", "tap", 1).ipv4 == "10.9.0.2"


def test_failed_port_leaves_nothing(svc: Networks) -> None:
    svc.create("a")
    host = svc.backend
    assert isinstance(host, FakeHost)
    host.fail_port = True
    before = {kv.key for kv in svc.store.range("/popek/")}
    with pytest.raises(InvalidInput, match="boom"):
        svc.create_port("a", "vm1", "tap", 1)
    assert {kv.key for kv in svc.store.range("/popek/")} == before


def test_delete_refused_with_ports_unless_force(svc: Networks) -> None:
    svc.create("a")
    port = svc.create_port("a", "vm1", "tap", 1)
    with pytest.raises(StateError, match=f"in use by 1 port.*{port.host_ifname}"):
        svc.delete("a")
    assert svc.get("a").state == "ready"
    svc.delete("a", force=True)
    assert svc.list() == [] and svc.ports() == []
    assert [kv.key for kv in svc.store.range("/popek/")] == ["/popek/netgen"]


def test_interrupted_intents_are_settled(svc: Networks) -> None:
    net = svc.create("a")
    port = svc.create_port("a", "vm1", "tap", 1)
    # a popek process that died (pid 1's start time never matches "0 0") mid-operation
    port.state, port.owner = "creating", "999999 0"
    svc.store.put(f"/popek/ports/a/{port.host_ifname}", port.to_json())
    net2 = Network(name="b", subnet="10.201.0.0/24", gateway="10.201.0.1", bridge="pk-dead",
                   state="deleting", owner="999999 0")
    svc.store.put("/popek/networks/b", net2.to_json())
    changes = svc.reconcile()
    assert any("interrupted delete finished" in c for c in changes)
    assert any(port.host_ifname in c for c in changes)
    assert [n.name for n in svc.list()] == [net.name]
    assert svc.ports() == []
    assert svc.store.range("/popek/leases/") == [] and svc.store.range("/popek/macs/") == []
