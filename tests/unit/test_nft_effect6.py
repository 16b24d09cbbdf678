"""What popek's nftables rules do to IPv6, routed and NATed traffic (popek.network.nft).

The companion of ``test_nft_effect.py`` (which disables IPv6 and stays on one
network): here the switch namespace runs IPv6 and routes between three popek
networks and an uplink to an "outside" namespace (and a second host interface
``side0`` to it).  Network A has an IPv6 subnet, NAT and the uplink ``up0``;
network B has an IPv6 subnet and no NAT; network C has an IPv6 subnet and NAT
without an uplink (any interface that is no popek bridge).
The rules are built by :func:`nft.build_ruleset` and loaded with
:func:`nft.apply` in every test (so a mutation tester credits each test with
the builder code it ran).  Guests send hand-made Ethernet frames (AF_PACKET)
and real datagrams from their IPv4 stack; the tests assert what arrives and
that the exact rule that must drop a frame counted it, once per frame.

Runs as root only (namespaces, nft), else skips.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from popek.network import nft
from popek.network.model import Network, Port
from unit import nftlab
from unit.nftlab import (
    BROADCAST,
    WAIT,
    arp,
    ether,
    frame6,
    icmp6,
    in_netns,
    ipv4,
    lla,
    na,
    ns,
    readable,
    rs,
    sock_in,
    tcp4,
    udp4,
    udp6,
)
from unit.nftlab import csum as _csum
from unit.nftlab import ip_bytes as _ip
from unit.nftlab import mac_bytes as _mac

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


QUIET = 0.3
"""Seconds a frame that must not arrive is given to arrive anyway."""

PREFIX = f"nf6-{os.getpid()}"


@dataclass
class UplinkNetwork(Network):
    """A network record with the ``uplink`` the rule builder reads when present."""

    uplink: str = ""


NET_A = UplinkNetwork(name="nf6a", subnet="10.97.0.0/24", gateway="10.97.0.1", bridge="br0",
                      nat=True, ipv6_subnet="fd42:97::/64", uplink="up0")
NET_B = Network(name="nf6b", subnet="10.96.0.0/24", gateway="10.96.0.1", bridge="br1",
                ipv6_subnet="fd42:96::/64")
NET_C = Network(name="nf6c", subnet="10.95.0.0/24", gateway="10.95.0.1", bridge="br2",
                nat=True, ipv6_subnet="fd42:95::/64")
"""A NAT network without an uplink: it may leave by any interface that is no popek bridge."""
NETS = (NET_A, NET_B, NET_C)
BRIDGE_MAC = {"br0": "02:00:00:00:97:01", "br1": "02:00:00:00:96:01",
              "br2": "02:00:00:00:95:01"}
GW6 = {"br0": "fd42:97::1", "br1": "fd42:96::1", "br2": "fd42:95::1"}
GW_LL = "fe80::1"
UPLINK_IP, OUTSIDE_IP = "192.0.2.1", "192.0.2.2"
UPLINK_IP6, OUTSIDE_IP6 = "fd00:2::1", "fd00:2::2"
OUTSIDE_MAC = "02:00:00:00:02:02"
SIDE_IP, SIDE_PEER_IP = "198.51.100.1", "198.51.100.2"


@dataclass(frozen=True)
class Guest:
    """One guest: its port record (switch end ``host_ifname``) and its network."""

    name: str
    port: Port
    net: Network

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
    def ll(self) -> str:
        """The guest's link-local IPv6 address."""
        return self.port.ipv6[0]

    @property
    def ip6(self) -> str:
        """The guest's global IPv6 address."""
        return self.port.ipv6[1]

    @property
    def chain(self) -> str:
        return nft.port_chain(self.port.host_ifname)


def _guest(name: str, net: Network, n: int) -> Guest:
    third = ipaddress.IPv4Network(net.subnet).network_address.packed[1]
    v6 = ipaddress.IPv6Network(net.ipv6_subnet).network_address
    return Guest(name, Port(network=net.name, instance=f"default/{name}", kind="veth",
                            host_ifname=f"p{name}", mac=f"52:54:00:{third:02x}:00:{n:02x}",
                            ipv4=f"10.{third}.0.{10 + n}",
                            ipv6=[f"fe80::{10 + n}", str(v6 + 10 + n)]), net)


G1, G2 = _guest("g1", NET_A, 1), _guest("g2", NET_A, 2)
G3 = _guest("g3", NET_B, 3)
G4 = _guest("g4", NET_C, 4)
GUESTS = (G1, G2, G3, G4)
EXT = _guest("ext", NET_A, 9)
"""A member of network A's bridge that is no popek port (no record, so no rules): an
interface someone else enslaved to the bridge, such as a bridged physical uplink."""


def switch() -> str:
    return f"{PREFIX}-sw"


def outside() -> str:
    return f"{PREFIX}-out"


class Counter(nftlab.Counter):
    """One rule's counter in the switch namespace, read when made."""

    def __init__(self, family: str, chain: str, comment: str) -> None:
        super().__init__(switch(), family, chain, comment)


def all_counters(family: str) -> dict[tuple[str, str], int]:
    """Packets counted so far by every counted rule of the switch's popek ``family`` table."""
    return nftlab.all_counters(switch(), family)


class Wire(nftlab.Wire):
    """A raw socket on ``guest``'s ``eth0``."""

    def __init__(self, guest: Guest) -> None:
        super().__init__(guest.ns, guest.name)
        self.guest = guest


# --------------------------------------------------------------------------- namespaces


def _setup_script() -> str:
    sw, out = switch(), outside()
    lines = [f"ip netns add {sw}",
             f"ip netns exec {sw} sysctl -qw net.ipv6.conf.all.accept_dad=0 "
             "net.ipv6.conf.default.accept_dad=0 net.ipv4.ip_forward=1 "
             "net.ipv6.conf.all.forwarding=1 net.ipv4.conf.all.send_redirects=0 "
             "net.ipv4.conf.default.send_redirects=0 net.ipv4.conf.all.rp_filter=0 "
             "net.ipv4.conf.default.rp_filter=0",
             f"ip netns add {out}",
             f"ip netns exec {out} sysctl -qw net.ipv6.conf.all.accept_dad=0 "
             "net.ipv6.conf.default.accept_dad=0",
             f"ip -n {sw} link add up0 type veth peer name eth0 netns {out}",
             f"ip -n {out} link set eth0 address {OUTSIDE_MAC}",
             f"ip -n {sw} addr add {UPLINK_IP}/24 dev up0",
             f"ip -n {sw} addr add {UPLINK_IP6}/64 dev up0 nodad",
             f"ip -n {out} addr add {OUTSIDE_IP}/24 dev eth0",
             f"ip -n {out} addr add {OUTSIDE_IP6}/64 dev eth0 nodad",
             f"ip -n {sw} link set up0 up",
             f"ip -n {out} link set eth0 up",
             f"ip -n {sw} -6 neigh add {OUTSIDE_IP6} lladdr {OUTSIDE_MAC} dev up0 "
             "nud permanent",
             # a second host interface that is not the uplink
             f"ip -n {sw} link add side0 type veth peer name eth1 netns {out}",
             f"ip -n {sw} addr add {SIDE_IP}/24 dev side0",
             f"ip -n {out} addr add {SIDE_PEER_IP}/24 dev eth1",
             f"ip -n {sw} link set side0 up",
             f"ip -n {out} link set eth1 up"]
    for net in NETS:
        br = net.bridge
        prefix = ipaddress.IPv4Network(net.subnet).prefixlen
        lines += [f"ip -n {sw} link add {br} address {BRIDGE_MAC[br]} type bridge "
                  "mcast_snooping 0",
                  f"ip -n {sw} addr add {net.gateway}/{prefix} dev {br}",
                  f"ip -n {sw} addr add {GW6[br]}/64 dev {br} nodad",
                  f"ip -n {sw} addr add {GW_LL}/64 dev {br} nodad",
                  f"ip -n {sw} link set {br} up",
                  f"ip -n {out} route add {net.subnet} via {UPLINK_IP}"]
    for g in (*GUESTS, EXT):
        br = g.net.bridge
        prefix = ipaddress.IPv4Network(g.net.subnet).prefixlen
        lines += [f"ip netns add {g.ns}",
                  # the guests' own IPv6 stacks stay silent; IPv6 is sent by hand
                  f"ip netns exec {g.ns} sysctl -qw net.ipv6.conf.all.disable_ipv6=1 "
                  "net.ipv6.conf.default.disable_ipv6=1 "
                  "net.ipv4.conf.all.accept_redirects=0 "
                  "net.ipv4.conf.default.accept_redirects=0",
                  f"ip -n {sw} link add {g.port.host_ifname} type veth "
                  f"peer name eth0 netns {g.ns}",
                  f"ip -n {g.ns} link set eth0 address {g.mac}",
                  f"ip -n {g.ns} addr add {g.ip}/{prefix} dev eth0",
                  f"ip -n {g.ns} link set eth0 up",
                  f"ip -n {g.ns} route add default via {g.net.gateway}",
                  f"ip -n {sw} link set {g.port.host_ifname} master {br} up",
                  f"ip -n {sw} -6 neigh add {g.ip6} lladdr {g.mac} dev {br} nud permanent",
                  f"ip -n {sw} -6 neigh add {g.ll} lladdr {g.mac} dev {br} nud permanent"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def namespaces() -> Iterator[None]:
    """The switch, outside and guest namespaces and their wires; removed even on failure.

    Named after the process that runs the tests, taken here rather than at
    import (forked mutation-test children run side by side).
    """
    global PREFIX
    PREFIX = f"nf6-{os.getpid()}"
    try:
        proc = subprocess.run(["sh", "-ec", _setup_script()], capture_output=True, text=True,
                              check=False)
        assert proc.returncode == 0, proc.stderr
        yield
    finally:
        for ns in (switch(), outside(), *(g.ns for g in (*GUESTS, EXT))):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


NO_ADDRESS = Port(network=NET_B.name, instance="default/bare", kind="tap",
                  host_ifname="pbare", mac="52:54:00:60:00:09", ipv4="")
"""A port with neither an IPv4 lease nor IPv6 addresses (no interface in the lab): the
rule set must load with it."""


@pytest.fixture
def lab(namespaces: None) -> None:
    """popek's rules, built and loaded afresh for each test (see test_nft_effect.lab)."""
    ports = [g.port for g in GUESTS] + [NO_ADDRESS]
    nft.apply(nft.build_ruleset(list(NETS), ports), netns=switch())


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


def _dropped(tx: Wire, rx: Wire, frame: bytes, rule: Counter) -> None:
    """Send ``frame``: ``rule`` counts it exactly once, no other rule of its table counts
    it (the rule dropped it rather than letting it on to a later drop) and ``rx`` never
    receives it (an IPv6 frame: its packet as far as the IPv6 length counts, which is all
    the bridge may pass on of a frame with bytes after the packet)."""
    others = all_counters(rule.where[0])
    tx.send(frame)
    rule.wait_rise()
    time.sleep(0.05)
    packet = frame
    if frame[12:14] == b"\x86\xdd":
        packet = frame[:54 + int.from_bytes(frame[18:20], "big")]
    assert not rx.seen(packet), f"{rx.guest.name} received a frame rule {rule.where} drops"
    assert rule.rose() == 1, f"rule {rule.where} counted {rule.rose()} packets, expected 1"
    after = all_counters(rule.where[0])
    key = rule.where[1:]
    rose = {k: after[k] - others.get(k, 0) for k in after
            if k != key and after[k] != others.get(k, 0)}
    assert not rose, f"rules other than {rule.where} counted the frame too: {rose}"


def _passes(tx: Wire, rx: Wire, frame: bytes, *rules: Counter) -> None:
    """Send ``frame``: ``rx`` receives it and none of ``rules`` counted anything."""
    tx.send(frame)
    rx.wait(frame)
    for rule in rules:
        assert rule.rose() == 0, f"rule {rule.where} counted a frame it must let pass"


# --------------------------------------------------------------------------- IPv6 port security


def test_ipv6_source_spoof_dropped_own_sources_pass(wires: dict[str, Wire]) -> None:
    """``ipv6-spoof`` drops (and counts) IPv6 from a source that is not the port's, even
    an address of another port; the port's link-local and global sources pass."""
    tx, rx = wires["g1"], wires["g2"]
    for fake in (G2.ip6, G2.ll, "fd42:97::99", "fe80::99", G3.ip6):
        frame = frame6(G1.mac, udp6(fake, G2.ip6, 4000, 4000), G2.mac)
        _dropped(tx, rx, frame, Counter("bridge", G1.chain, "ipv6-spoof"))
    rule = Counter("bridge", G1.chain, "ipv6-spoof")
    for own in (G1.ll, G1.ip6):
        _passes(tx, rx, frame6(G1.mac, udp6(own, G2.ip6, 4000, 4000), G2.mac), rule)


@pytest.mark.parametrize("case", ["neighbour's target", "gateway's target",
                                  "foreign tlla", "gateway mac tlla", "two options",
                                  "option not tlla"])
def test_spoofed_neighbour_advertisement_dropped(wires: dict[str, Wire], case: str) -> None:
    """An advertisement claiming another's address, or naming a MAC other than the
    port's, or with more than the one TLLA option, is dropped by ``na-spoof``."""
    opts = {
        "neighbour's target": (G2.ip6, b""),
        "gateway's target": (GW6["br0"], b""),
        "foreign tlla": (G1.ip6, lla(2, G2.mac)),
        "gateway mac tlla": (G1.ll, lla(2, BRIDGE_MAC["br0"])),
        "two options": (G1.ip6, lla(2, G1.mac) + lla(2, G1.mac)),
        "option not tlla": (G1.ip6, lla(1, G1.mac)),
    }[case]
    frame = frame6(G1.mac, na(G1.ll, *opts))
    _dropped(wires["g1"], wires["g2"], frame, Counter("bridge", G1.chain, "na-spoof"))


def test_own_neighbour_advertisement_passes(wires: dict[str, Wire]) -> None:
    """The port's own advertisements (each of its addresses, without an option or with
    its own MAC as TLLA) are delivered and counted by no drop rule."""
    rules = (Counter("bridge", G1.chain, "na-spoof"), Counter("bridge", "nd", "nd-spoof"))
    for target in (G1.ll, G1.ip6):
        for options in (b"", lla(2, G1.mac)):
            _passes(wires["g1"], wires["g2"], frame6(G1.mac, na(G1.ll, target, options)),
                    *rules)


@pytest.mark.parametrize("case", ["ns foreign slla", "rs foreign slla", "ns two options",
                                  "rs two options", "ns tlla option", "rs long option"])
def test_solicitation_with_foreign_link_layer_option_dropped(wires: dict[str, Wire],
                                                             case: str) -> None:
    """Solicitations whose link-layer option is not exactly the port's MAC are dropped by
    ``nd-spoof``."""
    packet = {
        "ns foreign slla": ns(G1.ll, G2.ll, lla(1, G2.mac)),
        "rs foreign slla": rs(G1.ll, lla(1, G2.mac)),
        "ns two options": ns(G1.ll, G2.ll, lla(1, G1.mac) + lla(1, G1.mac)),
        "rs two options": rs(G1.ll, lla(1, G1.mac) + lla(1, G1.mac)),
        "ns tlla option": ns(G1.ll, G2.ll, lla(2, G1.mac)),
        "rs long option": rs(G1.ll, bytes([1, 2]) + _mac(G1.mac) + bytes(8)),
    }[case]
    _dropped(wires["g1"], wires["g2"], frame6(G1.mac, packet),
             Counter("bridge", "nd", "nd-spoof"))


def test_own_solicitations_pass(wires: dict[str, Wire]) -> None:
    """Solicitations with the port's own SLLA, without option, and DAD (from ::) pass."""
    rules = (Counter("bridge", "nd", "nd-spoof"), Counter("bridge", G1.chain, "na-spoof"),
             Counter("bridge", G1.chain, "ipv6-spoof"))
    for packet in (ns(G1.ll, G2.ll, lla(1, G1.mac)), ns(G1.ip6, G2.ip6, lla(1, G1.mac)),
                   rs(G1.ll, lla(1, G1.mac)), ns(G1.ll, G2.ll), rs(G1.ll),
                   ns("::", "fd42:97::77"), ns("::", G1.ip6)):
        _passes(wires["g1"], wires["g2"], frame6(G1.mac, packet), *rules)


@pytest.mark.parametrize("case", ["ra", "ra unicast", "redirect", "dhcpv6 reply",
                                  "dhcpv6 advertise"])
def test_rogue_router_and_dhcpv6_server_dropped(wires: dict[str, Wire], case: str) -> None:
    """Router advertisements and redirects (``rogue-ra``) and DHCPv6 server messages
    (``rogue-dhcpv6``) from a guest are dropped, even from its own address."""
    ra_body = b"\x40\0\x07\x08" + bytes(8)
    packet, comment, dst = {
        "ra": (icmp6(G1.ll, "ff02::1", 134, ra_body), "rogue-ra", None),
        "ra unicast": (icmp6(G1.ll, G2.ll, 134, ra_body), "rogue-ra", G2.mac),
        "redirect": (icmp6(G1.ll, G2.ll, 137, bytes(4) + _ip(G1.ll) + _ip("fd00:9::1")),
                     "rogue-ra", G2.mac),
        "dhcpv6 reply": (udp6(G1.ll, G2.ll, 547, 546), "rogue-dhcpv6", G2.mac),
        "dhcpv6 advertise": (udp6(G1.ll, "ff02::1", 547, 546), "rogue-dhcpv6", None),
    }[case]
    _dropped(wires["g1"], wires["g2"], frame6(G1.mac, packet, dst),
             Counter("bridge", "prerouting", comment))


def test_guest_icmpv6_and_dhcpv6_client_pass(wires: dict[str, Wire]) -> None:
    """ICMPv6 other than RA/redirect (echo, router solicitation) and DHCPv6 client
    messages are forwarded; ``rogue-ra``/``rogue-dhcpv6`` count none of them."""
    rules = (Counter("bridge", "prerouting", "rogue-ra"),
             Counter("bridge", "prerouting", "rogue-dhcpv6"))
    for packet, dst in ((icmp6(G1.ip6, G2.ip6, 128, b"\0\1\0\1" + uuid.uuid4().bytes),
                         G2.mac),
                        (udp6(G1.ll, "ff02::1:2", 546, 547), None),
                        (udp6(G1.ll, G2.ll, 546, 548), G2.mac)):
        _passes(wires["g1"], wires["g2"], frame6(G1.mac, packet, dst), *rules)


# --------------------------------------------------------------------------- DHCP client rule


@pytest.mark.parametrize("case", ["other sport", "other dport", "subnet broadcast",
                                  "unicast to gateway", "tcp", "spoofed source"])
def test_unspecified_source_only_for_dhcp_client(wires: dict[str, Wire], case: str) -> None:
    """From 0.0.0.0 only UDP 68 -> 67 to 255.255.255.255 passes; anything else from
    0.0.0.0 is dropped by ``ipv4-spoof``."""
    packet = {
        "other sport": udp4("0.0.0.0", "255.255.255.255", 69, 67),
        "other dport": udp4("0.0.0.0", "255.255.255.255", 68, 68),
        "subnet broadcast": udp4("0.0.0.0", "10.97.0.255", 68, 67),
        "unicast to gateway": udp4("0.0.0.0", NET_A.gateway, 68, 67),
        "tcp": tcp4("0.0.0.0", "255.255.255.255", 68, 67),
        "spoofed source": udp4(G2.ip, "255.255.255.255", 68, 67),
    }[case]
    frame = ether(BROADCAST, G1.mac, 0x0800, packet)
    _dropped(wires["g1"], wires["g2"], frame, Counter("bridge", G1.chain, "ipv4-spoof"))


def test_dhcp_client_broadcast_passes(wires: dict[str, Wire]) -> None:
    """The DHCP discovery itself (0.0.0.0:68 -> 255.255.255.255:67) is delivered."""
    rule = Counter("bridge", G1.chain, "ipv4-spoof")
    frame = ether(BROADCAST, G1.mac, 0x0800, udp4("0.0.0.0", "255.255.255.255", 68, 67))
    _passes(wires["g1"], wires["g2"], frame, rule)


@pytest.mark.parametrize("sender", ["neighbour", "gateway", "foreign"])
def test_arp_spoof_dropped_by_its_rule(wires: dict[str, Wire], sender: str) -> None:
    """ARP naming another sender address is dropped by ``arp-spoof`` itself (not left to
    a later catch-all)."""
    spa = {"neighbour": G2.ip, "gateway": NET_A.gateway, "foreign": "192.0.2.9"}[sender]
    frame = ether(BROADCAST, G1.mac, 0x0806, arp(1, G1.mac, spa, G2.ip))
    _dropped(wires["g1"], wires["g2"], frame, Counter("bridge", G1.chain, "arp-spoof"))


def test_foreign_ethertype_dropped_by_its_rule(wires: dict[str, Wire]) -> None:
    """A frame of another ether type (0x88b5) is dropped by ``ethertype`` in prerouting
    and counted by no later rule."""
    frame = ether(G2.mac, G1.mac, 0x88B5, uuid.uuid4().bytes * 3)
    _dropped(wires["g1"], wires["g2"], frame, Counter("bridge", "prerouting", "ethertype"))


# --------------------------------------------------------------------------- the host


def _echo(src: str, dst: str) -> tuple[bytes, bytes]:
    """An ICMPv6 echo request and the identifier+sequence+data its reply carries."""
    body = b"\x77\x01\0\1" + uuid.uuid4().bytes
    return icmp6(src, dst, 128, body, hlim=64), body


def _is_echo_reply(body: bytes) -> Callable[[bytes], bool]:
    def pred(f: bytes) -> bool:
        return (f[12:14] == b"\x86\xdd" and f[20] == 58 and f[54] == 129
                and f[58:58 + len(body)] == body)
    return pred


def test_icmpv6_to_host_allowed_for_local_destinations(wires: dict[str, Wire]) -> None:
    """Echo to the gateway's global and link-local addresses is answered; echo to the
    host's address on another network is dropped by ``host-not-a-service``."""
    tx = wires["g1"]
    rule = Counter("inet", "host-br0", "host-not-a-service")
    for src, dst in ((G1.ip6, GW6["br0"]), (G1.ll, GW_LL)):
        packet, body = _echo(src, dst)
        tx.send(frame6(G1.mac, packet, BRIDGE_MAC["br0"]))
        tx.wait_for(_is_echo_reply(body), f"an echo reply from {dst}")
    assert rule.rose() == 0
    packet, body = _echo(G1.ip6, GW6["br1"])
    tx.send(frame6(G1.mac, packet, BRIDGE_MAC["br0"]))
    rule.wait_rise()
    time.sleep(QUIET)
    assert not tx.seen_any(_is_echo_reply(body)), \
        "the host answered an echo to its address on another network"


def test_dhcpv6_to_host_allowed_other_udp_dropped(wires: dict[str, Wire]) -> None:
    """A DHCPv6 client message to ff02::1:2 port 547 reaches the host; another port or
    another group or the gateway's unicast address is dropped by ``host-not-a-service``."""
    def open_() -> socket.socket:
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", 547))
        mreq = socket.inet_pton(socket.AF_INET6, "ff02::1:2") + struct.pack(
            "@I", socket.if_nametoindex("br0"))
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
        return s

    server = in_netns(switch(), open_)
    try:
        tx = wires["g1"]
        packet = udp6(G1.ll, "ff02::1:2", 546, 547)
        tx.send(frame6(G1.mac, packet))
        assert readable(server, WAIT), "the host never got the DHCPv6 solicit"
        assert server.recv(100) == packet[48:]
        for bad in (udp6(G1.ll, "ff02::1:2", 546, 548), udp6(G1.ll, "ff02::1", 546, 547),
                    udp6(G1.ip6, GW6["br0"], 546, 547),
                    udp6(G1.ip6, GW6["br0"], 68, 67)):
            rule = Counter("inet", "host-br0", "host-not-a-service")
            tx.send(frame6(G1.mac, bad, None if bad[24] == 0xFF else BRIDGE_MAC["br0"]))
            rule.wait_rise()
        assert not readable(server, 0)
    finally:
        server.close()


@pytest.mark.parametrize("case", ["dhcp renew", "dhcp other sport", "dhcp other dport",
                                  "dns to other gateway", "ping other gateway"])
def test_host_ipv4_services_exact(lab: None, case: str) -> None:
    """DHCP to the gateway from port 68 to 67 is accepted; another port pair, and DNS or
    ICMP to the host's address on another network, are dropped by ``host-not-a-service``."""
    sw = switch()
    if case.startswith("dhcp"):
        sport, dport = {"dhcp renew": (68, 67), "dhcp other sport": (69, 67),
                        "dhcp other dport": (68, 66)}[case]
        server = sock_in(sw, socket.AF_INET, socket.SOCK_DGRAM, (NET_A.gateway, dport))
        client = sock_in(G1.ns, socket.AF_INET, socket.SOCK_DGRAM, (G1.ip, sport))
        try:
            rule = Counter("inet", "host-br0", "host-not-a-service")
            client.sendto(b"renew", (NET_A.gateway, dport))
            if case == "dhcp renew":
                assert readable(server, WAIT), "DHCP to the gateway not accepted"
                assert rule.rose() == 0
            else:
                rule.wait_rise()
                assert not readable(server, QUIET)
        finally:
            server.close()
            client.close()
        return
    rule = Counter("inet", "host-br0", "host-not-a-service")
    if case == "dns to other gateway":
        server = sock_in(sw, socket.AF_INET, socket.SOCK_DGRAM, (NET_B.gateway, 53))
        client = sock_in(G1.ns, socket.AF_INET, socket.SOCK_DGRAM)
        try:
            client.sendto(b"query", (NET_B.gateway, 53))
            rule.wait_rise()
            assert not readable(server, QUIET)
        finally:
            server.close()
            client.close()
        return
    icmp = in_netns(G1.ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW,
                                                 socket.IPPROTO_ICMP))
    try:
        echo = b"\x08\x00\0\0\x12\x34\x00\x01" + uuid.uuid4().bytes
        echo = echo[:2] + _csum(echo).to_bytes(2, "big") + echo[4:]
        icmp.sendto(echo, (NET_B.gateway, 0))
        rule.wait_rise()
        assert not readable(icmp, QUIET), "the host answered a ping to another network"
    finally:
        icmp.close()


def test_host_initiated_flow_reply_accepted(lab: None) -> None:
    """A guest's reply to a flow the host opened passes ``host-`` (established), though
    its port is no service of the host."""
    server = sock_in(switch(), socket.AF_INET, socket.SOCK_DGRAM, (NET_A.gateway, 5300))
    guest = sock_in(G1.ns, socket.AF_INET, socket.SOCK_DGRAM, (G1.ip, 6000))
    try:
        rule = Counter("inet", "host-br0", "host-not-a-service")
        server.sendto(b"hello", (G1.ip, 6000))
        assert readable(guest, WAIT)
        data, peer = guest.recvfrom(100)
        guest.sendto(b"reply:" + data, peer)
        assert readable(server, WAIT), "the reply to the host's flow was dropped"
        assert server.recv(100) == b"reply:hello"
        assert rule.rose() == 0
        guest.sendto(b"unsolicited", (NET_A.gateway, 5301))
        rule.wait_rise()
    finally:
        server.close()
        guest.close()


# --------------------------------------------------------------------------- routing, NAT


def _isolated(src: Guest, dst: Guest, port: int) -> None:
    """An IPv4 datagram routed from ``src``'s network to ``dst``'s is dropped by the
    sending network's ``out-`` chain (its isolation counter rises) and never arrives."""
    rx = sock_in(dst.ns, socket.AF_INET, socket.SOCK_DGRAM, (dst.ip, port))
    tx = sock_in(src.ns, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rule = Counter("inet", f"out-{src.net.bridge}", "network-isolation")
        into = Counter("inet", f"in-{dst.net.bridge}", "network-isolation")
        tx.sendto(b"across", (dst.ip, port))
        rule.wait_rise()
        assert not readable(rx, QUIET), f"{dst.name} got a datagram from {src.name}"
        assert into.rose() == 0
    finally:
        rx.close()
        tx.close()


def test_networks_isolated_from_each_other(wires: dict[str, Wire]) -> None:
    """Routed traffic from one popek network to another is dropped by the sending
    network's ``out-`` chain (IPv4 and IPv6, both directions)."""
    for src, dst in ((G1, G3), (G3, G1)):
        _isolated(src, dst, 4000)
        rule = Counter("inet", f"out-{src.net.bridge}", "network-isolation")
        frame = frame6(src.mac, udp6(src.ip6, dst.ip6, 4000, 4000, hlim=64),
                       BRIDGE_MAC[src.net.bridge])
        _dropped(wires[src.name], wires[dst.name], frame, rule)


def test_routed_within_network_allowed(lab: None) -> None:
    """Traffic routed by the host back into the same network passes ``out-``."""
    subprocess.run(["ip", "-n", G1.ns, "route", "replace", f"{G2.ip}/32", "via",
                    NET_A.gateway], check=True)
    rx = sock_in(G2.ns, socket.AF_INET, socket.SOCK_DGRAM, (G2.ip, 4001))
    tx = sock_in(G1.ns, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rule = Counter("inet", "out-br0", "network-isolation")
        tx.sendto(b"hairpin", (G2.ip, 4001))
        assert readable(rx, WAIT), "routed traffic within the network was dropped"
        data, peer = rx.recvfrom(100)
        assert (data, peer[0]) == (b"hairpin", G1.ip), "traffic within the network was NATed"
        assert rule.rose() == 0
    finally:
        rx.close()
        tx.close()
        subprocess.run(["ip", "-n", G1.ns, "route", "del", f"{G2.ip}/32"], check=False)


def test_nat_network_masqueraded_to_uplink_replies_return(lab: None) -> None:
    """From the NAT network, traffic to the uplink leaves with the uplink's address
    (``nat-nf6a`` counts the flow) and the reply comes back (``in-`` established);
    unsolicited traffic from outside is dropped by ``in-``'s ``network-isolation``."""
    out = outside()
    far = sock_in(out, socket.AF_INET, socket.SOCK_DGRAM, (OUTSIDE_IP, 7000))
    guest = sock_in(G1.ns, socket.AF_INET, socket.SOCK_DGRAM, (G1.ip, 5000))
    try:
        nat = Counter("inet", "postrouting", "nat-nf6a")
        isolation = Counter("inet", "out-br0", "network-isolation")
        guest.sendto(b"out", (OUTSIDE_IP, 7000))
        assert readable(far, WAIT), "NAT traffic did not reach the uplink"
        data, peer = far.recvfrom(100)
        assert data == b"out"
        assert peer[0] == UPLINK_IP, f"source {peer[0]} was not masqueraded"
        far.sendto(b"back", peer)
        assert readable(guest, WAIT), "the reply to a NATed flow was dropped"
        assert guest.recv(100) == b"back"
        assert nat.rose() == 1
        assert isolation.rose() == 0
        into = Counter("inet", "in-br0", "network-isolation")
        far.sendto(b"unsolicited", (G1.ip, 5000))
        into.wait_rise()
        assert not readable(guest, QUIET)
    finally:
        far.close()
        guest.close()


def test_nat_network_reaches_only_its_uplink(lab: None) -> None:
    """A NAT network with an uplink may not send out of the host's other interfaces."""
    side = sock_in(outside(), socket.AF_INET, socket.SOCK_DGRAM, (SIDE_PEER_IP, 7003))
    guest = sock_in(G1.ns, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rule = Counter("inet", "out-br0", "network-isolation")
        guest.sendto(b"side", (SIDE_PEER_IP, 7003))
        rule.wait_rise()
        assert not readable(side, QUIET), "NAT traffic left by an interface not the uplink"
    finally:
        side.close()
        guest.close()


def test_non_nat_network_cannot_reach_uplink(lab: None) -> None:
    """A network without NAT can neither send to the uplink (``out-``) nor receive from
    it (``in-``), and its traffic is not masqueraded."""
    out = outside()
    far = sock_in(out, socket.AF_INET, socket.SOCK_DGRAM, (OUTSIDE_IP, 7001))
    guest = sock_in(G3.ns, socket.AF_INET, socket.SOCK_DGRAM, (G3.ip, 5002))
    try:
        rule = Counter("inet", "out-br1", "network-isolation")
        guest.sendto(b"out", (OUTSIDE_IP, 7001))
        rule.wait_rise()
        assert not readable(far, QUIET)
        into = Counter("inet", "in-br1", "network-isolation")
        far.sendto(b"in", (G3.ip, 5002))
        into.wait_rise()
        assert not readable(guest, QUIET)
    finally:
        far.close()
        guest.close()


def test_nat_network_ipv6_masqueraded(wires: dict[str, Wire]) -> None:
    """IPv6 from the NAT network's subnet leaves the uplink with the uplink's address
    (``nat6-nf6a``); a non-NAT network's IPv6 does not leave at all."""
    far = sock_in(outside(), socket.AF_INET6, socket.SOCK_DGRAM, ("::", 7002))
    try:
        nat6 = Counter("inet", "postrouting", "nat6-nf6a")
        packet = udp6(G1.ip6, OUTSIDE_IP6, 5003, 7002, hlim=64)
        wires["g1"].send(frame6(G1.mac, packet, BRIDGE_MAC["br0"]))
        assert readable(far, WAIT), "NAT IPv6 traffic did not reach the uplink"
        data, peer = far.recvfrom(100)
        assert data == packet[48:]
        assert peer[0] == UPLINK_IP6, f"source {peer[0]} was not masqueraded"
        assert nat6.rose() == 1
        packet = udp6(G1.ip6, G2.ip6, 5004, 7004, hlim=64)
        wires["g1"].send(frame6(G1.mac, packet, BRIDGE_MAC["br0"]))
        wires["g2"].wait_for(lambda f: f[12:14] == b"\x86\xdd" and f[22:38] == _ip(G1.ip6)
                             and f[38:54] == _ip(G2.ip6) and f[62:78] == packet[48:64],
                             "the IPv6 datagram g1 sent through the host, not NATed")
        assert nat6.rose() == 1
        rule = Counter("inet", "out-br1", "network-isolation")
        packet = udp6(G3.ip6, OUTSIDE_IP6, 5003, 7002, hlim=64)
        wires["g3"].send(frame6(G3.mac, packet, BRIDGE_MAC["br1"]))
        rule.wait_rise()
        assert not readable(far, QUIET)
    finally:
        far.close()


# --------------------------------------------------------------------------- NAT without uplink


def test_nat_network_without_uplink_leaves_by_any_host_interface(lab: None) -> None:
    """A NAT network with no uplink may leave by every interface that is no popek bridge
    (here ``up0`` and ``side0``), masqueraded to that interface's address by its own
    ``nat-nf6c``."""
    for dst, masq in ((OUTSIDE_IP, UPLINK_IP), (SIDE_PEER_IP, SIDE_IP)):
        far = sock_in(outside(), socket.AF_INET, socket.SOCK_DGRAM, (dst, 7010))
        guest = sock_in(G4.ns, socket.AF_INET, socket.SOCK_DGRAM, (G4.ip, 5010))
        try:
            nat = Counter("inet", "postrouting", "nat-nf6c")
            isolation = Counter("inet", "out-br2", "network-isolation")
            guest.sendto(b"out", (dst, 7010))
            assert readable(far, WAIT), f"NAT traffic without uplink did not reach {dst}"
            data, peer = far.recvfrom(100)
            assert (data, peer[0]) == (b"out", masq), f"source {peer[0]} not masqueraded"
            far.sendto(b"back", peer)
            assert readable(guest, WAIT), "the reply to a NATed flow was dropped"
            assert guest.recv(100) == b"back"
            assert nat.rose() == 1
            assert isolation.rose() == 0
        finally:
            far.close()
            guest.close()


def test_nat_network_without_uplink_isolated_from_other_networks(lab: None) -> None:
    """Any interface but the other popek bridges: traffic from network C to A
    (NAT) and B is dropped by C's own ``out-`` chain, not left to theirs."""
    for dst in (G1, G3):
        _isolated(G4, dst, 4010)


def test_ipv6_masqueraded_by_the_rule_of_its_own_network(wires: dict[str, Wire]) -> None:
    """IPv6 from network C leaves masqueraded and is counted by ``nat6-nf6c`` alone:
    network A's ``nat6-nf6a`` (earlier in the chain) takes only A's subnet."""
    far = sock_in(outside(), socket.AF_INET6, socket.SOCK_DGRAM, ("::", 7012))
    try:
        own = Counter("inet", "postrouting", "nat6-nf6c")
        other = Counter("inet", "postrouting", "nat6-nf6a")
        packet = udp6(G4.ip6, OUTSIDE_IP6, 5013, 7012, hlim=64)
        wires["g4"].send(frame6(G4.mac, packet, BRIDGE_MAC["br2"]))
        assert readable(far, WAIT), "NAT IPv6 traffic without uplink did not leave"
        data, peer = far.recvfrom(100)
        assert (data, peer[0]) == (packet[48:], UPLINK_IP6)
        assert own.rose() == 1
        assert other.rose() == 0
    finally:
        far.close()


# --------------------------------------------------------------------------- foreign bridge members


def test_bridge_member_that_is_no_port_is_not_policed(wires: dict[str, Wire]) -> None:
    """popek polices its own ports only: frames from another member of the bridge (a
    foreign ether type, DHCP and DHCPv6 server replies, a router advertisement) reach
    the guests, and a guest's unicast to that member is delivered, none of it counted
    by the port-security rules."""
    ext, rx = Wire(EXT), wires["g1"]
    try:
        rules = [Counter("bridge", hook, comment) for hook in ("prerouting", "input")
                 for comment in ("ethertype", "rogue-dhcp", "rogue-dhcpv6", "rogue-ra")]
        ra_body = b"\x40\0\x07\x08" + bytes(8)
        for frame in (ether(G1.mac, EXT.mac, 0x88B5, uuid.uuid4().bytes * 3),
                      ether(G1.mac, EXT.mac, 0x0800, udp4(EXT.ip, G1.ip, 67, 68)),
                      frame6(EXT.mac, udp6(EXT.ll, G1.ll, 547, 546), G1.mac),
                      frame6(EXT.mac, icmp6(EXT.ll, "ff02::1", 134, ra_body))):
            _passes(ext, rx, frame, *rules)
        # the bridge has learnt where EXT's MAC is: this goes to its port only
        unicast = Counter("bridge", "forward", "not-for-this-port")
        _passes(wires["g1"], ext, ether(EXT.mac, G1.mac, 0x0800,
                                        udp4(G1.ip, EXT.ip, 4020, 4020)), unicast)
    finally:
        ext.close()


def test_rogue_server_rules_match_their_own_ip_version_only(wires: dict[str, Wire]) -> None:
    """``rogue-dhcp`` is about IPv4 and ``rogue-dhcpv6``/``rogue-ra`` about IPv6: a guest's
    IPv6 datagram from UDP port 67, its IPv4 datagram from UDP port 547 and an IPv4
    packet of protocol 58 that starts like a router advertisement are delivered."""
    rules = [Counter("bridge", "prerouting", c)
             for c in ("rogue-dhcp", "rogue-dhcpv6", "rogue-ra")]
    proto58 = ipv4(G1.ip, G2.ip, 58, b"\x86\0\0\0" + uuid.uuid4().bytes)
    for frame in (frame6(G1.mac, udp6(G1.ll, G2.ll, 67, 68), G2.mac),
                  ether(G2.mac, G1.mac, 0x0800, udp4(G1.ip, G2.ip, 547, 546)),
                  ether(G2.mac, G1.mac, 0x0800, proto58)):
        _passes(wires["g1"], wires["g2"], frame, *rules)


# --------------------------------------------------------------------------- ND corner cases


def behind_hop_by_hop(src: str, dst: str, typ: int, body: bytes, length: int | None = None,
                      trailing: bytes = b"") -> bytes:
    """An ICMPv6 message of type ``typ`` behind a hop-by-hop options header (PadN only).

    ``length`` overrides the IPv6 payload length, and ``trailing`` follows the packet
    in the frame (the rules read what the frame holds, not only what the header counts).
    """
    payload = bytes([58, 0, 1, 4, 0, 0, 0, 0]) + bytes([typ, 0, 0, 0]) + body
    plen = len(payload) if length is None else length
    return (b"\x60\0\0\0" + plen.to_bytes(2, "big") + bytes([0, 255]) + _ip(src) + _ip(dst)
            + payload + trailing)


def test_dad_solicitation_with_nonce_passes(wires: dict[str, Wire]) -> None:
    """Duplicate address detection from :: carrying a nonce option (RFC 7527; Linux
    sends one) is delivered."""
    nonce = bytes([14, 1]) + uuid.uuid4().bytes[:6]
    rules = (Counter("bridge", "nd", "nd-spoof"), Counter("bridge", G1.chain, "ipv6-spoof"))
    _passes(wires["g1"], wires["g2"], frame6(G1.mac, ns("::", G1.ip6, nonce)), *rules)


@pytest.mark.parametrize("case", ["dad ns behind hop-by-hop", "ns behind hop-by-hop",
                                  "rs behind hop-by-hop", "rs from :: with foreign slla",
                                  "ns without target", "ns with slla behind hop-by-hop",
                                  "rs naming the own address", "rs with own slla after junk",
                                  "ns with tlla for its own address"])
def test_unusual_solicitation_dropped(wires: dict[str, Wire], case: str) -> None:
    """Solicitations that the accepting rules of ``nd`` do not describe exactly are
    dropped by ``nd-spoof``: behind an extension header (even one whose IPv6 length
    matches the plain message's), from :: with a foreign link-layer address, cut short
    before the target, or carrying the port's own address or MAC where only another
    message type has them."""
    group = "ff02::1:ff00:1"
    packet = {
        "dad ns behind hop-by-hop": behind_hop_by_hop("::", group, 135,
                                                      bytes(4) + _ip(G1.ip6)),
        # 8 + 16 bytes: the IPv6 length of a plain solicitation without option
        "ns behind hop-by-hop": behind_hop_by_hop(G1.ll, group, 135,
                                                  bytes(4) + _ip(G1.ip6)[:8]),
        # the IPv6 length of a plain router solicitation: the message is left outside it
        "rs behind hop-by-hop": behind_hop_by_hop(G1.ll, "ff02::2", 133, bytes(4),
                                                  length=8),
        "rs from :: with foreign slla": rs("::", lla(1, G2.mac)),
        "ns without target": icmp6(G1.ll, group, 135, bytes(4)),
        "ns with slla behind hop-by-hop": behind_hop_by_hop(
            G1.ll, group, 135, bytes(4) + _ip(G2.ll), trailing=lla(1, G1.mac)),
        # 16 bytes of "options" where an advertisement has its target: the port's address
        "rs naming the own address": rs(G1.ll, _ip(G1.ip6)),
        # the port's SLLA where a solicitation's would be, but in a router solicitation
        "rs with own slla after junk": rs(G1.ll, bytes(16) + lla(1, G1.mac)),
        "ns with tlla for its own address": ns(G1.ll, G1.ip6, lla(2, G1.mac)),
    }[case]
    _dropped(wires["g1"], wires["g2"], frame6(G1.mac, packet),
             Counter("bridge", "nd", "nd-spoof"))


@pytest.mark.parametrize("case", ["behind hop-by-hop", "short behind hop-by-hop",
                                  "neighbour's target with own tlla"])
def test_unusual_advertisement_dropped(wires: dict[str, Wire], case: str) -> None:
    """Advertisements the accepting rules do not describe exactly are dropped by
    ``na-spoof``: behind an extension header (also when the IPv6 length is that of a
    plain advertisement and the target lies beyond it), or for a neighbour's target
    even with the port's own MAC as TLLA."""
    packet = {
        "behind hop-by-hop": behind_hop_by_hop(G1.ll, "ff02::1", 136,
                                               b"\x20\0\0\0" + _ip(G1.ip6),
                                               trailing=lla(2, G1.mac)),
        "short behind hop-by-hop": behind_hop_by_hop(G1.ll, "ff02::1", 136,
                                                     b"\x20\0\0\0" + _ip(G1.ip6)[:8],
                                                     trailing=_ip(G1.ip6)[8:]),
        "neighbour's target with own tlla": na(G1.ll, G2.ip6, lla(2, G1.mac)),
    }[case]
    _dropped(wires["g1"], wires["g2"], frame6(G1.mac, packet),
             Counter("bridge", G1.chain, "na-spoof"))
