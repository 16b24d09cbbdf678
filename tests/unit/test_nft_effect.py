"""What popek's nftables rules do to real frames (popek.network.nft), not how they look.

The rule set is built by :func:`nft.build_ruleset` from two networks' records
and loaded with :func:`nft.apply` into a private network namespace (the
"switch") holding one Linux bridge per network, each with the gateway address.
Every guest is a network namespace of its own behind a veth pair whose switch
end is the port.  Guests send hand-made Ethernet frames (AF_PACKET) and real
UDP/TCP from their own IP stack; the tests assert what arrives (at another
guest's ``eth0`` or at a socket of the host) and which rule's counter rose.
A frame that should be dropped is checked against the exact rule that must
drop it: the port chains end in a catch-all ``default`` drop, so "not
delivered" alone would not notice a missing rule.

Runs as root only (namespaces, nft), else skips; the tests take under two seconds.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from popek.network import nft
from popek.network.model import Network, Port
from unit import nftlab
from unit.nftlab import BROADCAST, WAIT, arp, ether, in_netns, readable, udp4
from unit.nftlab import csum as _csum

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


PREFIX = f"nfx-{os.getpid()}"
SWITCH = f"{PREFIX}-sw"

NET_A = Network(name="nfxa", subnet="10.99.0.0/24", gateway="10.99.0.1", bridge="br0")
NET_B = Network(name="nfxb", subnet="10.98.0.0/24", gateway="10.98.0.1", bridge="br1",
                port_isolation=True)


@dataclass(frozen=True)
class Guest:
    """One guest: its namespace, its port record (switch end ``host_ifname``)."""

    name: str
    port: Port

    @property
    def ns(self) -> str:
        return f"{PREFIX}-{self.name}"

    @property
    def mac(self) -> str:
        return self.port.mac

    @property
    def ip(self) -> str:
        return self.port.ipv4

    @property
    def chain(self) -> str:
        return nft.port_chain(self.port.host_ifname)


def _guest(name: str, net: Network, n: int) -> Guest:
    third = ipaddress.IPv4Network(net.subnet).network_address.packed[1]
    return Guest(name, Port(network=net.name, instance=f"default/{name}", kind="veth",
                            host_ifname=f"p{name}", mac=f"52:54:00:{third:02x}:00:{n:02x}",
                            ipv4=f"10.{third}.0.{10 + n}"))


G1, G2 = _guest("g1", NET_A, 1), _guest("g2", NET_A, 2)
G3, G4 = _guest("g3", NET_B, 3), _guest("g4", NET_B, 4)
GUESTS = (G1, G2, G3, G4)


# --------------------------------------------------------------------------- namespaces


def counter(family: str, chain: str, comment: str) -> int:
    """Packets counted so far by the rule with ``comment`` in ``chain`` of the switch's
    popek table."""
    return nftlab.counter(SWITCH, family, chain, comment)


class Counter(nftlab.Counter):
    """One rule's counter in the switch namespace, read when made; :meth:`wait_rise`
    waits until it rose by at least ``by``."""

    def __init__(self, family: str, chain: str, comment: str) -> None:
        super().__init__(SWITCH, family, chain, comment)

    def wait_rise(self, by: int = 1, exact: bool = False) -> None:
        super().wait_rise(by, exact)


class Wire(nftlab.Wire):
    """A raw socket on ``guest``'s ``eth0``."""

    def __init__(self, guest: Guest) -> None:
        super().__init__(guest.ns, guest.name)
        self.guest = guest



def _setup_script() -> str:
    lines = [f"ip netns add {SWITCH}",
             f"ip netns exec {SWITCH} sysctl -qw net.ipv6.conf.all.disable_ipv6=1 "
             "net.ipv6.conf.default.disable_ipv6=1"]
    for net in (NET_A, NET_B):
        prefix = ipaddress.IPv4Network(net.subnet).prefixlen
        lines += [f"ip -n {SWITCH} link add {net.bridge} type bridge",
                  f"ip -n {SWITCH} addr add {net.gateway}/{prefix} dev {net.bridge}",
                  f"ip -n {SWITCH} link set {net.bridge} up"]
    for g in GUESTS:
        net = NET_A if g.port.network == NET_A.name else NET_B
        prefix = ipaddress.IPv4Network(net.subnet).prefixlen
        lines += [f"ip netns add {g.ns}",
                  # no IPv6 chatter (DAD, router solicitations) on the wires
                  f"ip netns exec {g.ns} sysctl -qw net.ipv6.conf.all.disable_ipv6=1 "
                  "net.ipv6.conf.default.disable_ipv6=1",
                  f"ip -n {SWITCH} link add {g.port.host_ifname} type veth "
                  f"peer name eth0 netns {g.ns}",
                  f"ip -n {g.ns} link set eth0 address {g.mac}",
                  f"ip -n {g.ns} addr add {g.ip}/{prefix} dev eth0",
                  f"ip -n {g.ns} link set eth0 up",
                  f"ip -n {SWITCH} link set {g.port.host_ifname} master {net.bridge} up"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def namespaces() -> Iterator[None]:
    """The switch and guest namespaces and their wires; removed even on failure.

    Named after the process that runs the tests, taken here rather than at
    import: a mutation tester imports this module once and runs the tests in
    forked children side by side, which would otherwise share the names.
    """
    global PREFIX, SWITCH
    PREFIX = f"nfx-{os.getpid()}"
    SWITCH = f"{PREFIX}-sw"
    try:
        proc = subprocess.run(["sh", "-ec", _setup_script()], capture_output=True, text=True,
                              check=False)
        assert proc.returncode == 0, proc.stderr
        yield
    finally:
        for ns in (SWITCH, *(g.ns for g in GUESTS)):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


@pytest.fixture
def lab(namespaces: None) -> None:
    """popek's rules, built and loaded afresh for each test.

    Built in every test rather than once per module, so that each test runs
    the rule builder itself: a mutation tester that maps mutants to the tests
    which reached the mutated code (``make mutants``) then runs every effect
    test against every builder mutant, not only the first test of the module.
    """
    nft.apply(nft.build_ruleset([NET_A, NET_B], [g.port for g in GUESTS]), netns=SWITCH)


# --------------------------------------------------------------------------- counters


# --------------------------------------------------------------------------- frames


@pytest.fixture
def wires(lab: None) -> Iterator[dict[str, Wire]]:
    """A raw socket on every guest, opened before the test sends anything."""
    opened = {g.name: Wire(g) for g in GUESTS}
    try:
        yield opened
    finally:
        for w in opened.values():
            w.close()


def _dropped(rx: Wire, frame: bytes, rule: Counter) -> None:
    """``rule`` counted the frame and ``rx`` did not receive it."""
    rule.wait_rise()
    assert not rx.seen(frame), f"{rx.guest.name} received a frame rule {rule.where} drops"


# --------------------------------------------------------------------------- host sockets


def host_socket(kind: int, port: int, addr: str = NET_A.gateway) -> socket.socket:
    """A UDP socket bound, or a TCP socket listening, at ``addr:port`` in the switch."""
    def open_() -> socket.socket:
        s = socket.socket(socket.AF_INET, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        if kind == socket.SOCK_STREAM:
            s.listen(4)
        return s

    return in_netns(SWITCH, open_)


def guest_socket(guest: Guest, kind: int) -> socket.socket:
    """A UDP or TCP socket of ``guest``'s own IP stack."""
    return in_netns(guest.ns, lambda: socket.socket(socket.AF_INET, kind))


# --------------------------------------------------------------------------- tests


def test_ipv4_source_spoof_dropped_own_source_passes(wires: dict[str, Wire]) -> None:
    """A guest may send IPv4 only from its lease: ``ipv4-spoof`` drops another source."""
    tx, rx = wires["g1"], wires["g2"]
    for fake in (G2.ip, "10.99.0.200", "192.0.2.1"):
        frame = ether(G2.mac, G1.mac, 0x0800, udp4(fake, G2.ip, 4000, 4000))
        rule = Counter("bridge", G1.chain, "ipv4-spoof")
        tx.send(frame)
        _dropped(rx, frame, rule)
    frame = ether(G2.mac, G1.mac, 0x0800, udp4(G1.ip, G2.ip, 4000, 4000))
    tx.send(frame)
    rx.wait(frame)
    assert counter("bridge", G1.chain, "ipv4-spoof") == rule.before + 1


def test_mac_spoof_dropped(wires: dict[str, Wire]) -> None:
    """A frame whose source MAC is not the port's is dropped by ``mac-spoof``."""
    tx, rx = wires["g1"], wires["g2"]
    for fake in ("02:00:00:00:00:99", G2.mac):
        frame = ether(G2.mac, fake, 0x0800, udp4(G1.ip, G2.ip, 4000, 4000))
        rule = Counter("bridge", G1.chain, "mac-spoof")
        tx.send(frame)
        _dropped(rx, frame, rule)


@pytest.mark.parametrize("case", ["foreign sender ip", "gateway's ip", "foreign sender mac",
                                  "reply with foreign ip", "not a request or reply",
                                  "not ethernet"])
def test_arp_spoof_dropped(wires: dict[str, Wire], case: str) -> None:
    """ARP that does not name the port as its sender is dropped by ``arp-spoof``.

    The last two cases pass the sender checks and fall to the catch-all drop.
    """
    tx, rx = wires["g1"], wires["g2"]
    packet = {
        "foreign sender ip": arp(1, G1.mac, G2.ip, NET_A.gateway),
        "gateway's ip": arp(1, G1.mac, NET_A.gateway, G2.ip),
        "foreign sender mac": arp(1, G2.mac, G1.ip, NET_A.gateway),
        "reply with foreign ip": arp(2, G1.mac, NET_A.gateway, G2.ip, G2.mac),
        "not a request or reply": arp(8, G1.mac, G1.ip, G2.ip),
        "not ethernet": arp(1, G1.mac, G1.ip, G2.ip, htype=6),
    }[case]
    frame = ether(BROADCAST, G1.mac, 0x0806, packet)
    rule = Counter("bridge", G1.chain, "arp-spoof")
    tx.send(frame)
    _dropped(rx, frame, rule)


def test_legitimate_arp_passes(wires: dict[str, Wire]) -> None:
    """ARP naming the port as sender (and an address probe from 0.0.0.0) is delivered."""
    tx, rx = wires["g1"], wires["g2"]
    rule = Counter("bridge", G1.chain, "arp-spoof")
    for packet in (arp(1, G1.mac, G1.ip, G2.ip), arp(1, G1.mac, "0.0.0.0", G1.ip),
                   arp(2, G1.mac, G1.ip, G2.ip, G2.mac)):
        frame = ether(BROADCAST if packet[7] == 1 else G2.mac, G1.mac, 0x0806, packet)
        tx.send(frame)
        rx.wait(frame)
    assert counter(*rule.where) == rule.before


def test_rogue_dhcp_server_reply_dropped(wires: dict[str, Wire]) -> None:
    """A DHCP server reply (UDP source port 67) from a guest is dropped by ``rogue-dhcp``,
    even from the guest's own address; the same datagram from another port passes."""
    tx, rx = wires["g1"], wires["g2"]
    for dst_mac, dst_ip in ((BROADCAST, "255.255.255.255"), (G2.mac, G2.ip)):
        frame = ether(dst_mac, G1.mac, 0x0800, udp4(G1.ip, dst_ip, 67, 68))
        rule = Counter("bridge", "prerouting", "rogue-dhcp")
        tx.send(frame)
        _dropped(rx, frame, rule)
    frame = ether(BROADCAST, G1.mac, 0x0800, udp4(G1.ip, "255.255.255.255", 1067, 68))
    tx.send(frame)
    rx.wait(frame)
    assert counter(*rule.where) == rule.before + 1


def test_dhcp_discover_reaches_host(wires: dict[str, Wire]) -> None:
    """A guest's DHCP discovery (0.0.0.0:68 to 255.255.255.255:67) reaches the host."""
    server = host_socket(socket.SOCK_DGRAM, 67, "0.0.0.0")
    try:
        packet = udp4("0.0.0.0", "255.255.255.255", 68, 67)
        wires["g1"].send(ether(BROADCAST, G1.mac, 0x0800, packet))
        assert readable(server, WAIT), "the host never got the DHCP discovery"
        assert server.recv(100) == packet[28:]
    finally:
        server.close()


@pytest.mark.parametrize("kind", [socket.SOCK_DGRAM, socket.SOCK_STREAM], ids=["udp", "tcp"])
def test_dns_to_gateway_allowed_other_ports_refused(lab: None, kind: int) -> None:
    """Guests reach the gateway's DNS (53, UDP and TCP); any other port of the host is
    dropped by ``host-not-a-service``."""
    chain = f"host-{NET_A.bridge}"
    for port, allowed in ((53, True), (54, False), (5353, False), (22, False)):
        server, client = host_socket(kind, port), guest_socket(G1, kind)
        try:
            rule = Counter("inet", chain, "host-not-a-service")
            if kind == socket.SOCK_DGRAM:
                client.sendto(b"query", (NET_A.gateway, port))
            else:
                client.setblocking(False)
                client.connect_ex((NET_A.gateway, port))
            if allowed:
                assert readable(server, WAIT), f"port {port} of the gateway not reached"
                assert counter(*rule.where) == rule.before
            else:
                rule.wait_rise()
                assert not readable(server, 0), f"port {port} of the host was reached"
        finally:
            server.close()
            client.close()


def test_ping_gateway_allowed(lab: None) -> None:
    """ICMP echo to the gateway is answered (the host's ``host-`` chain accepts ICMP)."""
    def open_() -> socket.socket:
        return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)

    sock = in_netns(G1.ns, open_)
    try:
        echo = b"\x08\x00\0\0\x12\x34\x00\x01" + uuid.uuid4().bytes
        echo = echo[:2] + _csum(echo).to_bytes(2, "big") + echo[4:]
        sock.sendto(echo, (NET_A.gateway, 0))
        deadline = time.monotonic() + WAIT
        while True:
            assert readable(sock, max(0.0, deadline - time.monotonic())), "no echo reply"
            reply = sock.recv(200)
            if reply[20] == 0 and reply[28:] == echo[8:]:
                break
    finally:
        sock.close()


def test_unicast_for_another_mac_not_flooded_to_ports(wires: dict[str, Wire]) -> None:
    """A unicast frame for a MAC no port has is flooded by the bridge, but
    ``not-for-this-port`` keeps it from every other port."""
    tx, rx = wires["g1"], wires["g2"]
    frame = ether("02:00:00:00:00:77", G1.mac, 0x0800, udp4(G1.ip, G2.ip, 4000, 4000))
    rule = Counter("bridge", "forward", "not-for-this-port")
    tx.send(frame)
    _dropped(rx, frame, rule)


def test_port_isolation(wires: dict[str, Wire]) -> None:
    """On a network with port isolation, ``port-isolation`` drops port-to-port frames;
    the gateway is still reached, and a network without it forwards them."""
    frame = ether(G4.mac, G3.mac, 0x0800, udp4(G3.ip, G4.ip, 4000, 4000))
    rule = Counter("bridge", "forward", "port-isolation")
    wires["g3"].send(frame)
    _dropped(wires["g4"], frame, rule)
    server = host_socket(socket.SOCK_DGRAM, 53, NET_B.gateway)
    client = guest_socket(G3, socket.SOCK_DGRAM)
    try:
        client.sendto(b"query", (NET_B.gateway, 53))
        assert readable(server, WAIT), "an isolated port cannot reach its gateway"
    finally:
        server.close()
        client.close()
    rule = Counter("bridge", "forward", "port-isolation")
    frame = ether(G2.mac, G1.mac, 0x0800, udp4(G1.ip, G2.ip, 4000, 4000))
    wires["g1"].send(frame)
    wires["g2"].wait(frame)
    assert counter(*rule.where) == rule.before


def test_ethertype_outside_allowlist_dropped(wires: dict[str, Wire]) -> None:
    """Frames of another ether type (here 0x88b5, local experimental) hit ``ethertype``."""
    tx, rx = wires["g1"], wires["g2"]
    frame = ether(G2.mac, G1.mac, 0x88B5, uuid.uuid4().bytes * 3)
    rule = Counter("bridge", "prerouting", "ethertype")
    tx.send(frame)
    _dropped(rx, frame, rule)
