"""Attacks between guests on a popek network: each must fail.

Real guests and containers share one network with port security on (it is
always on); a second network holds a container that nobody on the first may
reach.  The attacker is a VM: root in a VM may send any frame it likes
(containers lack CAP_NET_RAW, so the VM is the stronger attacker).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from framework import popek, popek_json, tcp_reach

NET_A, NET_B = "seca", "secb"
ATTACKER, VICTIM, PEER, OTHER = "mallory", "victim", "peer", "faraway"


def sh(name: str, script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return popek("exec", name, "--timeout", str(int(timeout)), "--", "sh", "-c", script,
                 check=False, timeout=timeout + 30)


def _port(name: str, network: str) -> dict[str, Any]:
    info = popek_json("network", "info", network)
    for port in info["ports"]:
        if port["instance"].endswith("/" + name):
            return dict(port)
    raise AssertionError(f"{name} has no port on {network}: {info['ports']}")


def _wait_ip(name: str, ip: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ip in sh(name, "ip -4 addr show").stdout:
            return
        time.sleep(1)
    raise AssertionError(f"{name} never got {ip} by DHCP")


@pytest.fixture(scope="module")
def lab(minimal_image: str) -> Iterator[dict[str, Any]]:
    popek("network", "create", NET_A)
    popek("network", "create", NET_B)
    try:
        for vm in (ATTACKER, VICTIM):
            popek("launch", minimal_image, vm, "--memory", "192MiB", "--network", NET_A)
        popek("launch", minimal_image, PEER, "--container", "--network", NET_A)
        popek("launch", minimal_image, OTHER, "--container", "--network", NET_B)
        net = popek_json("network", "info", NET_A)
        ports = {n: _port(n, NET_A) for n in (ATTACKER, VICTIM, PEER)}
        for vm in (ATTACKER, VICTIM):
            _wait_ip(vm, ports[vm]["ipv4"])
        yield {"net": net, "ports": ports, "other": _port(OTHER, NET_B)}
    finally:
        for name in (ATTACKER, VICTIM, PEER, OTHER):
            popek("delete", "--force", name, check=False)
        popek("network", "delete", "--force", NET_A, check=False)
        popek("network", "delete", "--force", NET_B, check=False)


def _gateway(lab: dict[str, Any]) -> str:
    return str(lab["net"]["gateway"])


def _guest_arp(name: str, ip: str) -> str | None:
    for line in sh(name, "cat /proc/net/arp").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == ip:
            return fields[3]
    return None


def _host_neigh(bridge: str, ip: str) -> str | None:
    out = subprocess.run(["ip", "-j", "neigh", "show", "dev", bridge], capture_output=True,
                         text=True, check=True).stdout
    for entry in json.loads(out or "[]"):
        if entry.get("dst") == ip:
            return str(entry.get("lladdr"))
    return None


def test_legitimate_traffic_flows(lab: dict[str, Any]) -> None:
    peer_ip = lab["ports"][PEER]["ipv4"]
    assert sh(VICTIM, f"ping -c 2 -W 2 {_gateway(lab)}").returncode == 0
    assert sh(VICTIM, f"ping -c 2 -W 2 {peer_ip}").returncode == 0


def test_arp_spoof_gateway(lab: dict[str, Any]) -> None:
    gw, victim_ip = _gateway(lab), lab["ports"][VICTIM]["ipv4"]
    sh(VICTIM, f"ping -c 1 -W 2 {gw}")
    before = _guest_arp(VICTIM, gw)
    assert before is not None
    sh(ATTACKER, f"arping -U -c 3 -s {gw} -I eth0 {victim_ip}; "
                 f"arping -A -c 3 -s {gw} -I eth0 {victim_ip}")
    time.sleep(1)
    assert _guest_arp(VICTIM, gw) == before  # still the gateway's real MAC


def test_arp_spoof_other_guest(lab: dict[str, Any]) -> None:
    gw, victim_ip = _gateway(lab), lab["ports"][VICTIM]["ipv4"]
    bridge = lab["net"]["bridge"]["name"]
    sh(VICTIM, f"ping -c 1 -W 2 {gw}")
    before = _host_neigh(bridge, victim_ip)
    assert before == lab["ports"][VICTIM]["mac"]
    sh(ATTACKER, f"arping -U -c 3 -s {victim_ip} -I eth0 {gw}")
    time.sleep(1)
    assert _host_neigh(bridge, victim_ip) == before  # the gateway was not poisoned


def test_changed_mac_cannot_send(lab: dict[str, Any]) -> None:
    gw, mac = _gateway(lab), lab["ports"][ATTACKER]["mac"]
    try:
        out = sh(ATTACKER, "ip link set eth0 down; ip link set eth0 address 02:de:ad:be:ef:01;"
                           f" ip link set eth0 up; sleep 1; ping -c 3 -W 1 {gw}")
        assert out.returncode != 0 and " 0 packets received" in out.stdout
    finally:
        sh(ATTACKER, f"ip link set eth0 down; ip link set eth0 address {mac}; ip link set eth0 up")
    assert sh(ATTACKER, f"ping -c 2 -W 2 {gw}").returncode == 0  # its own MAC works again


def test_changed_ip_cannot_send(lab: dict[str, Any]) -> None:
    gw = _gateway(lab)
    fake = lab["ports"][PEER]["ipv4"].rsplit(".", 1)[0] + ".250"
    out = sh(ATTACKER, f"ip addr add {fake}/24 dev eth0; ping -c 3 -W 1 -I {fake} {gw}; "
                       f"rc=$?; ip addr del {fake}/24 dev eth0; exit $rc")
    assert out.returncode != 0


def test_promiscuous_guest_sees_no_unicast(lab: dict[str, Any]) -> None:
    peer_ip = lab["ports"][PEER]["ipv4"]
    sh(ATTACKER, "ip link set eth0 promisc on")
    rx = "cat /sys/class/net/eth0/statistics/rx_bytes"
    popek("exec", PEER, "--", "sh", "-c", "nc -l -p 5001 >/dev/null 2>&1 </dev/null &")
    time.sleep(0.5)
    before = int(sh(ATTACKER, rx).stdout)
    sent = sh(VICTIM, f"dd if=/dev/zero bs=1024 count=2048 2>/dev/null | nc -w 5 {peer_ip} 5001",
              timeout=120)
    assert sent.returncode == 0, sent.stderr
    after = int(sh(ATTACKER, rx).stdout)
    # 2 MiB went from the victim to the peer; the attacker saw at most background noise
    assert after - before < 64 * 1024, after - before


def test_rogue_dhcp_server(lab: dict[str, Any]) -> None:
    conf = ("start 10.66.0.10\\nend 10.66.0.20\\ninterface eth0\\n"
            "opt router 10.66.0.1\\nopt subnet 255.255.255.0\\n")
    sh(ATTACKER, f"printf '{conf}' > /tmp/udhcpd.conf; touch /var/lib/udhcpd.leases 2>/dev/null;"
                 " mkdir -p /var/lib/misc; udhcpd /tmp/udhcpd.conf")
    try:
        for _ in range(3):
            out = sh(VICTIM, "udhcpc -n -q -i eth0 -s /bin/true -t 3 -T 1 2>&1")
            assert "10.66.0." not in out.stdout, out.stdout
            assert lab["ports"][VICTIM]["ipv4"] in out.stdout, out.stdout
    finally:
        sh(ATTACKER, "killall udhcpd")


def test_other_network_unreachable(lab: dict[str, Any]) -> None:
    other_ip = lab["other"]["ipv4"]
    assert sh(VICTIM, f"ping -c 2 -W 1 {other_ip}").returncode != 0
    victim_ip = lab["ports"][VICTIM]["ipv4"]
    other_gw = popek_json("network", "info", NET_B)["gateway"]
    assert tcp_reach(OTHER, other_gw, 53)  # its own network works
    sh(VICTIM, "nc -l -p 7001 > /tmp/got 2>/dev/null </dev/null &")
    time.sleep(0.5)
    assert not tcp_reach(OTHER, victim_ip, 7001)
    assert sh(VICTIM, "cat /tmp/got").stdout == ""
