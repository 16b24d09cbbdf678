"""Networks on the real host: bridges, taps and veths over netlink, dnsmasq, reconcile.

Needs root.  Every client runs in a network namespace the test creates; the
CLI is the real one (``python -m popek network ...``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import POPEK, popek, processes_mentioning, wait_for
from popek import proc
from popek.network import Networks


def net_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return popek("network", *args, check=check)


def net_json(*args: str) -> object:
    return json.loads(net_cli(*args, "--format", "json").stdout)


def links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def dnsmasq_pids(home: Path) -> list[int]:
    return [p for p in processes_mentioning(f"--pid-file={home}/networks/")
            if proc.start_time(p) is not None]


@pytest.fixture
def home(popek_home: Path) -> Iterator[Path]:
    yield popek_home
    for n in Networks(reconcile=False).list():
        net_cli("delete", "--force", n.name, check=False)


@pytest.fixture
def netns() -> Iterator[str]:
    from pyroute2 import netns as pnetns

    name = f"pktest{os.getpid()}"
    pnetns.create(name)
    yield name
    pnetns.remove(name)


def test_create_list_info_delete(home: Path) -> None:
    before = links()
    out = net_cli("create", "lan", "--subnet", "10.201.0.0/24").stdout
    assert "Network lan created (10.201.0.0/24, gateway 10.201.0.1" in out
    [entry] = net_json("list")  # type: ignore[misc]
    assert entry["name"] == "lan" and entry["subnet"] == "10.201.0.0/24" and entry["ports"] == 0
    info = net_json("info", "lan")
    assert isinstance(info, dict)
    bridge = info["bridge"]
    assert bridge["exists"] and bridge["up"] and bridge["addresses"] == ["10.201.0.1/24"]
    assert Path(f"/sys/class/net/{bridge['name']}/bridge/stp_state").read_text().strip() == "0"
    assert Path(f"/sys/class/net/{bridge['name']}/bridge/forward_delay").read_text().strip() \
        == "0"
    assert info["dnsmasq"]["alive"]
    pid = info["dnsmasq"]["pid"]
    assert "lan" in net_cli("list").stdout and "10.201.0.1/24" in net_cli("info", "lan").stdout
    net_cli("delete", "lan")
    assert links() == before
    assert not proc.start_time(pid) and dnsmasq_pids(home) == []
    assert not (home / "networks" / "lan").exists()
    assert net_json("list") == []


def test_bad_input_changes_nothing(home: Path) -> None:
    from pyroute2 import IPRoute

    net_cli("create", "lan", "--subnet", "10.202.0.0/16")
    state = net_json("list")
    devs = links()
    cases = [
        (["create", "other", "--subnet", "10.202.5.0/24"],
         "overlaps 10.202.0.0/16 (popek network lan)"),
        (["create", "other", "--subnet", "10.202.0.1/24"], "host bits are set"),
        (["create", "other", "--subnet", "8.8.8.0/24"], "not a private range"),
        (["create", "other", "--subnet", "10.9.0.0/30"], "out of range"),
        (["create", "lan"], "network 'lan' already exists"),
        (["create", "Bad_Name"], "invalid network name"),
        (["info", "nope"], "existing networks: lan"),
        (["delete", "nope"], "existing networks: lan"),
    ]
    for args, message in cases:
        res = net_cli(*args, check=False)
        assert res.returncode != 0, args
        assert message in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
    # a subnet the host already uses (an address on a device of its own)
    with IPRoute() as ip:
        ip.link("add", ifname="pktdummy0", kind="veth", peer="pktdummy1")
        idx = ip.link_lookup(ifname="pktdummy0")[0]
        ip.addr("add", index=idx, address="10.203.7.1", prefixlen=24)
        try:
            res = net_cli("create", "other", "--subnet", "10.203.0.0/16", check=False)
        finally:
            ip.link("del", index=idx)
    assert res.returncode != 0 and "pktdummy0" in res.stderr
    # delete refused while a port exists
    port = Networks().create_port("lan", "vm1", "tap", 900000123)
    res = net_cli("delete", "lan", check=False)
    assert res.returncode != 0 and port.host_ifname in res.stderr and "--force" in res.stderr
    assert port.host_ifname in links()
    assert [{**e, "ports": 0} for e in net_json("list")] == state  # type: ignore[attr-defined]
    net_cli("delete", "lan", "--force")
    assert net_json("list") == []
    assert links() == {d for d in devs if not d.startswith("pk-")}


def test_subnet_inside_a_host_route_is_refused(home: Path) -> None:
    """A subnet inside a route the host has (``10.0.0.0/8 via`` a gateway) is refused.

    The host is a private network namespace with only that route (and its
    link's): popek runs there in-process.  The error names the route, so the
    refusal is the route check's and nothing else's; nothing is created.
    """
    ns = f"h4-routes-{os.getpid()}"
    ip = ["ip", "-n", ns]
    subprocess.run(["ip", "netns", "add", ns], check=True)
    env = {**os.environ, "POPEK_CLI_SERVER": "off"}
    cli = ["ip", "netns", "exec", ns, *POPEK, "network"]
    try:
        for cmd in (["link", "add", "upl0", "type", "veth", "peer", "name", "upl1"],
                    ["link", "set", "upl0", "up"], ["link", "set", "upl1", "up"],
                    ["addr", "add", "198.51.100.2/24", "dev", "upl0"],
                    ["route", "add", "10.0.0.0/8", "via", "198.51.100.1"]):
            subprocess.run([*ip, *cmd], check=True)
        res = subprocess.run([*cli, "create", "inroute", "--subnet", "10.123.0.0/24"],
                             capture_output=True, text=True, env=env, timeout=120, check=False)
        links_after = subprocess.run([*ip, "-o", "link"], capture_output=True, text=True,
                                     check=True).stdout
        listed = subprocess.run([*cli, "list", "--format", "json"], capture_output=True,
                                text=True, env=env, timeout=120, check=True).stdout
    finally:
        subprocess.run([*cli, "delete", "--force", "inroute"], capture_output=True, env=env,
                       timeout=120, check=False)
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    assert res.returncode != 0, res.stdout
    assert ("subnet 10.123.0.0/24 overlaps 10.0.0.0/8 (host route 10.0.0.0/8 via "
            "198.51.100.1 dev upl0)") in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert "pk-" not in links_after and json.loads(listed) == []


def _brport(dev: str, flag: str) -> str:
    return Path(f"/sys/class/net/{dev}/brport/{flag}").read_text().strip()


def _fdb_static(dev: str) -> set[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ip:
        idx = ip.link_lookup(ifname=dev)[0]
        return {m.get_attr("NDA_LLADDR") for m in ip.fdb("dump", ifindex=idx)
                if m["ifindex"] == idx and m["state"] & 0x40 and m.get_attr("NDA_MASTER")}


def test_tap_and_veth_ports(home: Path) -> None:
    nets = Networks()
    net = nets.create("lan", subnet="10.204.0.0/24")
    tap = nets.create_port("lan", "vm1", "tap", 900000321)
    veth = nets.create_port("lan", "ct1", "veth", 1000000000, ipv4="10.204.0.50")
    assert tap.ipv4 == "10.204.0.2" and veth.ipv4 == "10.204.0.50"
    assert Path(f"/sys/class/net/{tap.host_ifname}/owner").read_text().strip() == "900000321"
    flags = int(Path(f"/sys/class/net/{tap.host_ifname}/tun_flags").read_text(), 16)
    tap_, no_pi, persist, vnet_hdr, multi_queue = 0x2, 0x1000, 0x800, 0x4000, 0x100
    assert flags & (tap_ | no_pi | persist | vnet_hdr) == tap_ | no_pi | persist | vnet_hdr
    assert not flags & multi_queue
    for port in (tap, veth):
        dev = port.host_ifname
        assert Path(f"/sys/class/net/{dev}/master").resolve().name == net.bridge
        assert _brport(dev, "learning") == "0" and _brport(dev, "unicast_flood") == "0"
        assert _brport(dev, "multicast_flood") == "1"
        assert port.mac in _fdb_static(dev)
    assert veth.peer_ifname in links()
    hosts = (home / "networks" / "lan" / "dhcp-hosts").read_text()
    assert f"{tap.mac},{tap.ipv4}" in hosts and f"{veth.mac},{veth.ipv4}" in hosts
    nets.delete_port(tap)
    assert tap.host_ifname not in links()
    assert [p.host_ifname for p in nets.ports(network="lan")] == [veth.host_ifname]


def test_dhcp_gives_the_leased_address(home: Path, netns: str) -> None:
    from pyroute2 import IPRoute, NetNS

    nets = Networks()
    nets.create("lan", subnet="10.205.0.0/24")
    nets.create_port("lan", "vm0", "tap", 900000001)  # takes .2: the client must get its own
    port = nets.create_port("lan", "ct1", "veth", 1000000000)
    assert port.ipv4 == "10.205.0.3"
    with IPRoute() as ip:
        ip.link("set", index=ip.link_lookup(ifname=port.peer_ifname)[0], net_ns_fd=netns)
    with NetNS(netns) as ns:
        ns.link("set", index=ns.link_lookup(ifname=port.peer_ifname)[0], ifname="eth0",
                state="up")
    script = ('#!/bin/sh\n[ "$1" = bound ] && echo "LEASED $ip"\nexit 0\n')
    hook = home / "udhcpc-hook.sh"
    hook.write_text(script)
    hook.chmod(0o755)
    res = subprocess.run(["ip", "netns", "exec", netns, "busybox", "udhcpc", "-i", "eth0",
                          "-n", "-q", "-f", "-t", "5", "-T", "2", "-s", str(hook)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert "LEASED 10.205.0.3" in res.stdout, res.stdout + res.stderr


def test_reconcile_restores_and_removes_strays(home: Path) -> None:
    from pyroute2 import IPRoute

    nets = Networks()
    net = nets.create("lan", subnet="10.206.0.0/24")
    tap = nets.create_port("lan", "vm1", "tap", 900000555)
    with IPRoute() as ip:
        ip.link("del", index=ip.link_lookup(ifname=net.bridge)[0])
        ip.link("add", ifname="pk-stray0", kind="bridge")
    os.kill(net.dnsmasq_pid, signal.SIGKILL)
    wait_for(lambda: not proc.alive(net.dnsmasq_pid, net.dnsmasq_start), 5, "dnsmasq to die")
    nets2 = Networks()  # a new Networks() reconciles
    info = nets2.info("lan")
    assert info["bridge"]["exists"] and info["bridge"]["addresses"] == ["10.206.0.1/24"]
    assert tap.host_ifname in info["bridge"]["ports"]
    assert tap.mac in _fdb_static(tap.host_ifname)
    assert info["dnsmasq"]["alive"] and info["dnsmasq"]["pid"] != net.dnsmasq_pid
    assert "pk-stray0" not in links()
    assert Networks().reconcile() == []  # settled: nothing more to do


def test_delete_leaves_nothing(home: Path) -> None:
    import shutil

    before = links()
    nets = Networks()
    nets.create("lan", subnet="10.207.0.0/24")
    nets.create_port("lan", "vm1", "tap", 900000001)
    nets.create_port("lan", "ct1", "veth", 1000000000)
    nets.delete("lan", force=True)
    assert links() == before
    assert dnsmasq_pids(home) == []
    assert [p.name for p in (home / "networks").iterdir()] in ([], [".lock"])
    assert nets.store.range("/popek/networks/") == [] and nets.store.range("/popek/ports/") == []
    assert nets.store.range("/popek/leases/") == [] and nets.store.range("/popek/macs/") == []
    nft = shutil.which("nft") or "/usr/sbin/nft"
    tables = subprocess.run([nft, "-j", "list", "tables"], capture_output=True, text=True,
                            check=True).stdout
    from popek.network.nft import table_name

    assert f'"name": "{table_name()}"' not in tables
