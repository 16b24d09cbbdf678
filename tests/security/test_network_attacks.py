"""Attacks between guests on a popek network: each must fail.

Real guests and containers share one network with port security on (it is
always on); a second network holds a container that nobody on the first may
reach.  The attacker is a VM: root in a VM may send any frame it likes
(containers lack CAP_NET_RAW, so the VM is the stronger attacker).

Each attack test shows that the attack was really attempted (the tool's exit
status and output, the counter of the nftables rule that dropped the frames
rising) and, where the control can be switched off from the test, that the
same attack succeeds without it: :func:`_unprotected` removes the attacker's
port from popek's bridge table (its entry in the ``port_chains`` verdict map
and the ``ports`` set, and its ``port-<ifname>`` chain), and popek restores
the rules itself: any ``popek network`` command reconciles, sees a port chain
missing and reloads the whole rule set.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from framework import popek, popek_json, tcp_reach, wait_for
from popek.network import nft

NET_A, NET_B = "seca", "secb"
ATTACKER, VICTIM, PEER, OTHER = "mallory", "victim", "peer", "faraway"

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
"""``sll_pkttype`` of a frame the host sends out of an interface (to the guest behind it)."""


def sh(name: str, script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with ``sh -c`` in instance ``name``; the result is not checked."""
    return popek("exec", name, "--timeout", str(int(timeout)), "--", "sh", "-c", script,
                 check=False, timeout=timeout + 30)


def _port(name: str, network: str) -> dict[str, Any]:
    info = popek_json("network", "info", network)
    for port in info["ports"]:
        if port["instance"].endswith("/" + name):
            return dict(port)
    raise AssertionError(f"{name} has no port on {network}: {info['ports']}")


def _wait_ip(name: str, ip: str, timeout: float = 60) -> None:
    wait_for(lambda: ip in sh(name, "ip -4 addr show").stdout, timeout,
             f"{name} to get {ip} by DHCP")


def _wait_listening(name: str, tcp_port: int, timeout: float = 30) -> None:
    """Wait until a TCP socket of instance ``name`` listens on ``tcp_port`` (/proc/net/tcp)."""
    local = f":{tcp_port:04X}"

    def listening() -> bool:
        for line in sh(name, "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null").stdout.splitlines():
            fields = line.split()
            if len(fields) > 3 and fields[1].endswith(local) and fields[3] == "0A":
                return True
        return False

    wait_for(listening, timeout, f"{name} to listen on TCP port {tcp_port}")


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
        # arping binds its socket to the spoofed sender address: without this
        # it dies with "bind: Cannot assign requested address" and sends nothing
        out = sh(ATTACKER, "echo 1 > /proc/sys/net/ipv4/ip_nonlocal_bind")
        assert out.returncode == 0, out.stderr
        yield {"net": net, "ports": ports, "other": _port(OTHER, NET_B)}
    finally:
        for name in (ATTACKER, VICTIM, PEER, OTHER):
            popek("delete", "--force", name, check=False)
        popek("network", "delete", "--force", NET_A, check=False)
        popek("network", "delete", "--force", NET_B, check=False)


def _gateway(lab: dict[str, Any]) -> str:
    return str(lab["net"]["gateway"])


def _bridge(lab: dict[str, Any]) -> str:
    return str(lab["net"]["bridge"]["name"])


def _ifname(lab: dict[str, Any], name: str) -> str:
    return str(lab["ports"][name]["host_ifname"])


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


# --------------------------------------------------------------------------- rules


def _counter(chain: str, comment: str) -> int:
    """Packets counted by the rule of popek's bridge table in ``chain`` with ``comment``."""
    for item in nft.current("bridge")["nftables"]:
        rule = item.get("rule")
        if rule and rule["chain"] == chain and rule.get("comment") == comment:
            for expr in rule["expr"]:
                if "counter" in expr:
                    return int(expr["counter"]["packets"])
    raise AssertionError(f"no rule {comment!r} with a counter in chain {chain}")


def _wait_counter(chain: str, comment: str, at_least: int, what: str) -> int:
    """Wait until the ``comment`` rule of ``chain`` counted ``at_least`` packets; return it."""
    seen: list[int] = []

    def risen() -> bool:
        seen.append(_counter(chain, comment))
        return seen[-1] >= at_least

    wait_for(risen, 30, f"{what}: counter {chain}/{comment} to reach {at_least}")
    return seen[-1]


def _protected(ifname: str) -> bool:
    """Whether popek's bridge table holds ``ifname``'s port chain, map entry and set entry."""
    data = nft.current("bridge")["nftables"]
    chains = {i["chain"]["name"] for i in data if "chain" in i}
    sets = {i["set"]["name"]: i["set"].get("elem", []) for i in data if "set" in i}
    maps = {i["map"]["name"]: i["map"].get("elem", []) for i in data if "map" in i}
    in_map = any(e[0] == ifname for e in maps.get("port_chains", []))
    return nft.port_chain(ifname) in chains and ifname in sets.get("ports", []) and in_map


@contextmanager
def _unprotected(ifname: str) -> Iterator[None]:
    """Switch port security off for the port ``ifname``; popek restores it on exit.

    The port leaves the ``ports`` set (the base chains' checks, rogue DHCP
    among them, match ``iifname @ports``) and the ``port_chains`` verdict map,
    and its chain is deleted, in one nft transaction.  On exit ``popek network
    list`` reconciles: a port chain is missing, so popek reloads its rules;
    the port is checked to be protected again.
    """
    table = nft.table_name()
    batch = (f'delete element bridge {table} port_chains {{ "{ifname}" }}\n'
             f'delete element bridge {table} ports {{ "{ifname}" }}\n'
             f"delete chain bridge {table} {nft.port_chain(ifname)}\n")
    assert _protected(ifname)
    subprocess.run(["nft", "-f", "-"], input=batch, text=True, check=True)
    assert not _protected(ifname)
    try:
        yield
    finally:
        popek("network", "list", "--format", "json")
        assert _protected(ifname), "popek did not restore the port's rules"


def _arping(mode: str, sender: str, target: str) -> None:
    """Send three spoofed ARP frames from the attacker (``mode``: -U request, -A reply)."""
    out = sh(ATTACKER, f"arping {mode} -c 3 -s {sender} -I eth0 {target}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Sent 3 probe(s)" in out.stdout, out.stdout


# --------------------------------------------------------------------------- frames


class Capture:
    """The frames the host sends out of interface ``ifname`` (to the guest) from now on."""

    def __init__(self, ifname: str) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((ifname, 0))
        self.sock.setblocking(False)
        self.frames: list[bytes] = []

    def read(self) -> list[bytes]:
        """Every outgoing frame seen so far."""
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
            except BlockingIOError:
                return self.frames
            if addr[2] == PACKET_OUTGOING:
                self.frames.append(data)

    def close(self) -> None:
        self.sock.close()


@contextmanager
def _capture(ifname: str) -> Iterator[Capture]:
    cap = Capture(ifname)
    try:
        yield cap
    finally:
        cap.close()


def _dhcp_server_frame(src_mac: str) -> Callable[[bytes], bool]:
    """A predicate: an IPv4 UDP frame from source port 67 (a DHCP server) sent by ``src_mac``."""
    mac = bytes.fromhex(src_mac.replace(":", ""))

    def match(frame: bytes) -> bool:
        if len(frame) < 42 or frame[6:12] != mac or frame[12:14] != b"\x08\x00":
            return False
        ihl = (frame[14] & 0x0F) * 4
        return frame[23] == 17 and frame[14 + ihl:16 + ihl] == (67).to_bytes(2, "big")

    return match


# --------------------------------------------------------------------------- tests


def test_legitimate_traffic_flows(lab: dict[str, Any]) -> None:
    peer_ip = lab["ports"][PEER]["ipv4"]
    assert sh(VICTIM, f"ping -c 2 -W 2 {_gateway(lab)}").returncode == 0
    assert sh(VICTIM, f"ping -c 2 -W 2 {peer_ip}").returncode == 0


def test_arp_spoof_gateway(lab: dict[str, Any]) -> None:
    """The attacker claims the gateway's address to the victim: dropped by ``arp-spoof``.

    With the attacker's port chain removed (:func:`_unprotected`) the same
    ARP frames replace the gateway's MAC in the victim's cache with the
    attacker's: the test checks that positive control, then that popek's
    restored rules drop the attack again.
    """
    gw, victim_ip = _gateway(lab), lab["ports"][VICTIM]["ipv4"]
    attacker_mac = lab["ports"][ATTACKER]["mac"]
    chain = nft.port_chain(_ifname(lab, ATTACKER))
    assert sh(VICTIM, f"ping -c 1 -W 2 {gw}").returncode == 0
    real = _guest_arp(VICTIM, gw)
    assert real is not None and real != attacker_mac

    before = _counter(chain, "arp-spoof")
    _arping("-U", gw, victim_ip)
    _arping("-A", gw, victim_ip)
    _wait_counter(chain, "arp-spoof", before + 6, "six spoofed ARP frames dropped")
    assert _guest_arp(VICTIM, gw) == real  # still the gateway's real MAC

    try:
        with _unprotected(_ifname(lab, ATTACKER)):
            _arping("-U", gw, victim_ip)
            _arping("-A", gw, victim_ip)
            wait_for(lambda: _guest_arp(VICTIM, gw) == attacker_mac, 30,
                     "the victim's ARP cache poisoned without the control")
        assert sh(VICTIM, "ip neigh flush dev eth0").returncode == 0
        assert sh(VICTIM, f"ping -c 1 -W 2 {gw}").returncode == 0
        assert _guest_arp(VICTIM, gw) == real

        before = _counter(chain, "arp-spoof")
        _arping("-A", gw, victim_ip)
        _wait_counter(chain, "arp-spoof", before + 3, "restored rules drop the spoof")
        assert _guest_arp(VICTIM, gw) == real
    finally:
        sh(VICTIM, "ip neigh flush dev eth0")


def test_arp_spoof_other_guest(lab: dict[str, Any]) -> None:
    """The attacker claims the victim's address to the gateway: dropped by ``arp-spoof``.

    Without the attacker's port chain (:func:`_unprotected`) the host's
    neighbour entry for the victim turns into the attacker's MAC.
    """
    gw, victim_ip = _gateway(lab), lab["ports"][VICTIM]["ipv4"]
    victim_mac, attacker_mac = lab["ports"][VICTIM]["mac"], lab["ports"][ATTACKER]["mac"]
    bridge, chain = _bridge(lab), nft.port_chain(_ifname(lab, ATTACKER))
    assert sh(VICTIM, f"ping -c 1 -W 2 {gw}").returncode == 0
    assert _host_neigh(bridge, victim_ip) == victim_mac

    before = _counter(chain, "arp-spoof")
    _arping("-U", victim_ip, gw)
    _wait_counter(chain, "arp-spoof", before + 3, "three spoofed ARP frames dropped")
    assert _host_neigh(bridge, victim_ip) == victim_mac  # the gateway was not poisoned

    try:
        with _unprotected(_ifname(lab, ATTACKER)):
            _arping("-U", victim_ip, gw)
            wait_for(lambda: _host_neigh(bridge, victim_ip) == attacker_mac, 30,
                     "the host's neighbour entry poisoned without the control")
    finally:
        subprocess.run(["ip", "neigh", "del", victim_ip, "dev", bridge], check=False)
    assert sh(VICTIM, f"ping -c 1 -W 2 {gw}").returncode == 0
    assert _host_neigh(bridge, victim_ip) == victim_mac
    before = _counter(chain, "arp-spoof")
    _arping("-U", victim_ip, gw)
    _wait_counter(chain, "arp-spoof", before + 3, "restored rules drop the spoof")
    assert _host_neigh(bridge, victim_ip) == victim_mac


def test_changed_mac_cannot_send(lab: dict[str, Any]) -> None:
    """A guest that changes its MAC cannot send: its frames hit ``mac-spoof``.

    The rule's counter shows the frames left the guest and that this rule
    refused them: a build without it fails the counter lookup, and one whose
    rule matched nothing would leave the count unchanged.  (No positive
    control: with the port chain removed the gateway still answers to the
    old MAC, which the guest's NIC then filters.)
    """
    gw, mac = _gateway(lab), lab["ports"][ATTACKER]["mac"]
    chain = nft.port_chain(_ifname(lab, ATTACKER))
    before = _counter(chain, "mac-spoof")
    try:
        out = sh(ATTACKER, "ip link set eth0 down && ip link set eth0 address 02:de:ad:be:ef:01"
                           " && ip link set eth0 up && cat /sys/class/net/eth0/address")
        assert out.returncode == 0 and out.stdout.strip() == "02:de:ad:be:ef:01", out
        out = sh(ATTACKER, f"ping -c 3 -W 1 {gw}")
        assert out.returncode != 0 and " 0 packets received" in out.stdout, out.stdout
        _wait_counter(chain, "mac-spoof", before + 1, "frames with the new MAC dropped")
    finally:
        sh(ATTACKER, f"ip link set eth0 down; ip link set eth0 address {mac}; ip link set eth0 up")
    assert sh(ATTACKER, f"ping -c 2 -W 2 {gw}").returncode == 0  # its own MAC works again


def test_changed_ip_cannot_send(lab: dict[str, Any]) -> None:
    """A guest that takes another address cannot send from it: ``ipv4-spoof`` drops it.

    The attacker learns the gateway's MAC first (so the spoofed pings leave
    as IPv4, not as ARP that ``arp-spoof`` would stop).  Without its port
    chain (:func:`_unprotected`) the same pings are answered.
    """
    gw = _gateway(lab)
    fake = lab["ports"][PEER]["ipv4"].rsplit(".", 1)[0] + ".250"
    chain = nft.port_chain(_ifname(lab, ATTACKER))
    assert sh(ATTACKER, f"ping -c 1 -W 2 {gw}").returncode == 0
    added = sh(ATTACKER, f"ip addr add {fake}/32 dev eth0 && ip -4 addr show dev eth0")
    assert added.returncode == 0 and f"inet {fake}/32" in added.stdout, added
    try:
        before = _counter(chain, "ipv4-spoof")
        out = sh(ATTACKER, f"ping -c 3 -W 1 -I {fake} {gw}")
        assert out.returncode != 0 and " 0 packets received" in out.stdout, out.stdout
        _wait_counter(chain, "ipv4-spoof", before + 3, "pings from the stolen address dropped")

        with _unprotected(_ifname(lab, ATTACKER)):
            out = sh(ATTACKER, f"ping -c 3 -W 2 -I {fake} {gw}")
            assert out.returncode == 0, f"without the control the pings pass: {out.stdout}"
    finally:
        sh(ATTACKER, f"ip addr del {fake}/32 dev eth0")
        subprocess.run(["ip", "neigh", "del", fake, "dev", _bridge(lab)], check=False,
                       capture_output=True)


def test_promiscuous_guest_sees_no_unicast(lab: dict[str, Any]) -> None:
    peer_ip = lab["ports"][PEER]["ipv4"]
    sh(ATTACKER, "ip link set eth0 promisc on")
    rx = "cat /sys/class/net/eth0/statistics/rx_bytes"
    popek("exec", PEER, "--", "sh", "-c", "nc -l -p 5001 >/dev/null 2>&1 </dev/null &")
    _wait_listening(PEER, 5001)
    before = int(sh(ATTACKER, rx).stdout)
    sent = sh(VICTIM, f"dd if=/dev/zero bs=1024 count=2048 2>/dev/null | nc -w 5 {peer_ip} 5001",
              timeout=120)
    assert sent.returncode == 0, sent.stderr
    after = int(sh(ATTACKER, rx).stdout)
    # 2 MiB went from the victim to the peer; the attacker saw at most background noise
    assert after - before < 64 * 1024, after - before


def test_rogue_dhcp_server(lab: dict[str, Any]) -> None:
    """A DHCP server in a guest: its offers are dropped by ``rogue-dhcp``.

    The test checks that udhcpd runs, that its offer left the attacker (the
    rule's counter rises) and never reached the victim's port.  Without the
    control (:func:`_unprotected` takes the port out of the ``ports`` set
    the rule matches) the rogue offer is delivered to the victim's port.
    """
    attacker_mac = lab["ports"][ATTACKER]["mac"]
    rogue = _dhcp_server_frame(attacker_mac)
    conf = ("start 10.66.0.10\\nend 10.66.0.20\\ninterface eth0\\n"
            "opt router 10.66.0.1\\nopt subnet 255.255.255.0\\n"
            "lease_file /tmp/udhcpd.leases\\n")
    # -a 1: answer after a 1 ms ARP check of the offered address (default 2 s)
    started = sh(ATTACKER, f"printf '{conf}' > /tmp/udhcpd.conf && touch /tmp/udhcpd.leases && "
                           "(udhcpd -f -a 1 /tmp/udhcpd.conf >/tmp/udhcpd.log 2>&1 &)")
    assert started.returncode == 0, started
    try:
        wait_for(lambda: "udhcpd: started" in sh(ATTACKER, "cat /tmp/udhcpd.log").stdout
                 and sh(ATTACKER, "pidof udhcpd").returncode == 0, 30, "udhcpd to start")

        def lease() -> None:
            out = sh(VICTIM, "udhcpc -n -q -i eth0 -s /bin/true -t 3 -T 1 2>&1")
            assert "10.66.0." not in out.stdout, out.stdout
            assert f"lease of {lab['ports'][VICTIM]['ipv4']} obtained" in out.stdout, out.stdout

        with _capture(_ifname(lab, VICTIM)) as cap:
            before = _counter("prerouting", "rogue-dhcp")
            lease()
            _wait_counter("prerouting", "rogue-dhcp", before + 1, "the rogue offer dropped")
            assert not any(rogue(f) for f in cap.read()), "a rogue offer reached the victim"

        with _unprotected(_ifname(lab, ATTACKER)), _capture(_ifname(lab, VICTIM)) as cap:
            sh(VICTIM, "udhcpc -n -q -i eth0 -s /bin/true -t 3 -T 1 2>&1")
            wait_for(lambda: any(rogue(f) for f in cap.read()), 30,
                     "the rogue offer delivered to the victim's port without the control")
    finally:
        sh(ATTACKER, "killall udhcpd")


def test_other_network_unreachable(lab: dict[str, Any]) -> None:
    other_ip = lab["other"]["ipv4"]
    assert sh(VICTIM, f"ping -c 2 -W 1 {other_ip}").returncode != 0
    victim_ip = lab["ports"][VICTIM]["ipv4"]
    other_gw = popek_json("network", "info", NET_B)["gateway"]
    assert tcp_reach(OTHER, other_gw, 53)  # its own network works
    sh(VICTIM, "nc -l -p 7001 > /tmp/got 2>/dev/null </dev/null &")
    _wait_listening(VICTIM, 7001)
    assert not tcp_reach(OTHER, victim_ip, 7001)
    assert sh(VICTIM, "cat /tmp/got").stdout == ""
