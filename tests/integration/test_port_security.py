"""Port security attacked from guests on a real kernel bridge, without VMs.

The topology lives entirely in network namespaces created here (names start
with ``pktest-``), so no frame ever leaves them and the root namespace's
nftables tables are never touched:

    host ns:  bridge pk-a (10.77.0.1/24, fd42:77::1/64)  bridge pk-b (10.78.0.1/24, NAT,
              port isolation)  veth pkup 198.51.100.1/24 --- "wan" ns 198.51.100.2
    guests:   g1 .11, g2 .12, g3 .13 (the attacker) on A; g4 .14, g5 .15 on B;
              each a namespace joined to its bridge by a veth pair (host end pkt<n>)

Both bridges are set to ``ageing_time 0``: they never learn and flood every
unicast frame to every port, so what protects the guests is the rule set and
not the forwarding database.  Each attack is first run with popek's tables
removed (the control: it must succeed, proving the test can see it), then with
the rules applied (it must fail).  Frames are crafted in Python and sent and
received on AF_PACKET sockets opened inside the guest namespaces (setns).
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import select
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from framework import wait_for
from popek.network import nft
from popek.network.model import Network, Port

pytestmark = pytest.mark.security

CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
_libc = ctypes.CDLL(None, use_errno=True)

# --------------------------------------------------------------------------- namespaces


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command; fail with its output when ``check`` and it fails."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return proc


@contextmanager
def in_ns(name: str) -> Iterator[None]:
    """Run the block (this thread) inside network namespace ``name``; sockets opened
    there stay in it after the block."""
    orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        yield
    finally:
        if _libc.setns(orig, CLONE_NEWNET) != 0:  # pragma: no cover - would be fatal
            os._exit(99)
        os.close(orig)
        os.close(target)


def ping(ns: str, addr: str, timeout: float = 1.0) -> bool:
    """Whether ``addr`` answers an ICMP echo sent from namespace ``ns`` (``addr%dev`` for
    link-local IPv6).  A raw socket, so no ping binary is needed."""
    host, _, dev = addr.partition("%")
    six = ":" in host
    ident = secrets.randbits(16)
    with in_ns(ns):
        if six:
            s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
            dest: tuple[Any, ...] = (host, 0, 0, socket.if_nametoindex(dev) if dev else 0)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            dest = (host, 0)
    try:
        msg = struct.pack("!BBHHH", 128 if six else 8, 0, 0, ident, 1) + b"popek-pktest"
        if not six:
            msg = msg[:2] + struct.pack("!H", _csum(msg)) + msg[4:]
        s.sendto(msg, dest)  # the kernel fills in the ICMPv6 checksum
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([s], [], [], left)[0]:
                break
            data, src = s.recvfrom(2048)
            icmp = data if six else data[(data[0] & 15) * 4:]
            if (src[0] == host and icmp[0] == (129 if six else 0)
                    and struct.unpack("!H", icmp[4:6])[0] == ident):
                return True
        return False
    finally:
        s.close()


def neigh(ns: str, dev: str) -> dict[str, str]:
    """The neighbour table of ``dev`` in ``ns``: address -> link-layer address."""
    out = json.loads(sh("ip", "-n", ns, "-j", "neigh", "show", "dev", dev).stdout or "[]")
    return {e["dst"]: e.get("lladdr", "") for e in out}


# --------------------------------------------------------------------------- frames


def _mac(m: str) -> bytes:
    return bytes.fromhex(m.replace(":", ""))


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def eth(dst: str, src: str, etype: int, payload: bytes) -> bytes:
    return _mac(dst) + _mac(src) + struct.pack("!H", etype) + payload


def ip4(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, 64, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    return hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:] + payload


def udp4(src: str, dst: str, sport: int, dport: int, data: bytes) -> bytes:
    u = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 17, len(u))
    c = _csum(pseudo + u) or 0xFFFF
    return ip4(src, dst, 17, u[:6] + struct.pack("!H", c) + u[8:])


def arp(op: int, sha: str, spa: str, tha: str, tpa: str) -> bytes:
    return (struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + _mac(sha) + socket.inet_aton(spa)
            + _mac(tha) + socket.inet_aton(tpa))


def ip6(src: str, dst: str, nh: int, payload: bytes) -> bytes:
    s, d = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    if nh in (58, 17):
        pseudo = s + d + struct.pack("!I3xB", len(payload), nh)
        off = 2 if nh == 58 else 6
        c = _csum(pseudo + payload[:off] + b"\0\0" + payload[off + 2:]) or 0xFFFF
        payload = payload[:off] + struct.pack("!H", c) + payload[off + 2:]
    return struct.pack("!IHBB", 6 << 28, len(payload), nh, 255) + s + d + payload


def udp6(src: str, dst: str, sport: int, dport: int, data: bytes) -> bytes:
    return ip6(src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data)


def nd_adv(src: str, dst: str, target: str, lladdr: str | None) -> bytes:
    """An unsolicited, overriding neighbour advertisement (optionally with a TLLA option)."""
    body = struct.pack("!BBHI", 136, 0, 0, 0x20000000) + socket.inet_pton(socket.AF_INET6, target)
    if lladdr is not None:
        body += bytes([2, 1]) + _mac(lladdr)
    return ip6(src, dst, 58, body)


def router_adv(src: str, lladdr: str) -> bytes:
    """A router advertisement (router lifetime 0: harmless even where it is accepted)."""
    body = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 0, 0, 0) + bytes([1, 1]) + _mac(lladdr)
    return ip6(src, "ff02::1", 58, body)


def send(ns: str, *frames: bytes, ifname: str = "eth0") -> None:
    """Send raw Ethernet frames from ``ifname`` in ``ns``."""
    with in_ns(ns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        s.bind((ifname, 0))
        for f in frames:
            s.send(f)
    finally:
        s.close()


class Sniffer:
    """Every frame arriving on ``ifname`` in ``ns`` (AF_PACKET, all protocols)."""

    def __init__(self, ns: str, ifname: str = "eth0") -> None:
        with in_ns(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((ifname, 0))
        self.sock.setblocking(False)

    def frames(self, seconds: float = 0.6) -> list[bytes]:
        """Frames received (not sent) during the next ``seconds``."""
        out: list[bytes] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if select.select([self.sock], [], [], left)[0]:
                data, addr = self.sock.recvfrom(65535)
                if addr[2] != PACKET_OUTGOING:
                    out.append(data)
        return out

    def count(self, pred: Callable[[bytes], bool] | bytes, seconds: float = 0.6) -> int:
        """How many frames of the next ``seconds`` satisfy ``pred`` (or contain those bytes)."""
        test = pred if callable(pred) else (lambda f, m=pred: m in f)
        return sum(1 for f in self.frames(seconds) if test(f))

    def __enter__(self) -> Sniffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def icmp6_type(frame: bytes) -> int:
    """ICMPv6 type of an untagged Ethernet/IPv6 frame without extension headers, else -1."""
    if frame[12:14] == b"\x86\xdd" and frame[20] == 58:
        return frame[54]
    return -1


# --------------------------------------------------------------------------- topology


def eui64_ll(mac: str) -> str:
    b = bytearray(_mac(mac))
    b[0] ^= 2
    iid = bytes(b[:3]) + b"\xff\xfe" + bytes(b[3:])
    return socket.inet_ntop(socket.AF_INET6, b"\xfe\x80" + b"\0" * 6 + iid)


@dataclass
class Guest:
    name: str
    ns: str
    port: Port
    lladdr6: str
    global6: str = ""

    @property
    def ip(self) -> str:
        return self.port.ipv4

    @property
    def mac(self) -> str:
        return self.port.mac


@dataclass
class Topology:
    prefix: str
    host: str
    wan: str
    networks: list[Network]
    guests: dict[str, Guest] = field(default_factory=dict)
    bridge_mac: dict[str, str] = field(default_factory=dict)

    @property
    def ports(self) -> list[Port]:
        return [g.port for g in self.guests.values()]

    def apply(self) -> None:
        nft.apply(nft.build_ruleset(self.networks, self.ports), netns=self.host)

    @contextmanager
    def rules_off(self) -> Iterator[None]:
        """The control: popek's tables removed for the block, restored after."""
        nft.remove_all(netns=self.host)
        try:
            yield
        finally:
            self.apply()

    def counter(self, family: str, chain: str, comment: str) -> int:
        """Packets counted by the rule with ``comment`` in ``chain``."""
        for item in nft.current(family, netns=self.host)["nftables"]:
            r = item.get("rule")
            if r and r["chain"] == chain and r.get("comment") == comment:
                for e in r["expr"]:
                    if "counter" in e:
                        return int(e["counter"]["packets"])
        raise AssertionError(f"no counted rule {comment!r} in {family} {chain}")


NETS = [
    Network("a", "10.77.0.0/24", "10.77.0.1", "pk-a", ipv6_subnet="fd42:77::/64"),
    Network("b", "10.78.0.0/24", "10.78.0.1", "pk-b", nat=True, port_isolation=True),
]
GUESTS = {"g1": ("a", 11), "g2": ("a", 12), "g3": ("a", 13), "g4": ("b", 14), "g5": ("b", 15)}


def _build(t: Topology) -> None:
    h = t.host
    for ns in (h, t.wan, *(g.ns for g in t.guests.values())):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "netns", "exec", h, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    for i, net in enumerate(t.networks):
        mac = f"02:00:00:00:aa:0{i + 1}"
        t.bridge_mac[net.name] = mac
        sh("ip", "-n", h, "link", "add", net.bridge, "address", mac, "type", "bridge",
           "stp_state", "0", "forward_delay", "0", "ageing_time", "0")
        prefix = net.subnet.split("/")[1]
        sh("ip", "-n", h, "addr", "add", f"{net.gateway}/{prefix}", "dev", net.bridge)
        if net.ipv6_subnet:
            sh("ip", "-n", h, "addr", "add", net.ipv6_subnet.replace("::/", "::1/"), "dev",
               net.bridge, "nodad")
        sh("ip", "-n", h, "link", "set", net.bridge, "up")
    for g in t.guests.values():
        net = next(n for n in t.networks if n.name == g.port.network)
        hif = g.port.host_ifname
        sh("ip", "-n", h, "link", "add", hif, "type", "veth", "peer", "name", "eth0",
           "netns", g.ns)
        sh("ip", "-n", h, "link", "set", hif, "master", net.bridge, "up")
        sh("ip", "-n", g.ns, "link", "set", "eth0", "address", g.mac)
        sh("ip", "-n", g.ns, "addr", "add", f"{g.ip}/24", "dev", "eth0")
        if g.global6:
            sh("ip", "-n", g.ns, "addr", "add", f"{g.global6}/64", "dev", "eth0", "nodad")
        sh("ip", "-n", g.ns, "link", "set", "eth0", "up")
        sh("ip", "-n", g.ns, "route", "add", "default", "via", net.gateway)
    sh("ip", "-n", h, "link", "add", "pkup", "type", "veth", "peer", "name", "eth0",
       "netns", t.wan)
    sh("ip", "-n", h, "addr", "add", "198.51.100.1/24", "dev", "pkup")
    sh("ip", "-n", t.wan, "addr", "add", "198.51.100.2/24", "dev", "eth0")
    sh("ip", "-n", h, "link", "set", "pkup", "up")
    sh("ip", "-n", t.wan, "link", "set", "eth0", "up")
    # Without popek's rules the wan could answer the guests directly (the control).
    sh("ip", "-n", t.wan, "route", "add", "10.76.0.0/14", "via", "198.51.100.1")
    for g in t.guests.values():  # wait for DAD of the link-local addresses
        wait_for(lambda g=g: "tentative" not in sh("ip", "-n", g.ns, "-6", "addr", "show",
                                                   "dev", "eth0").stdout,
                 10, f"DAD of {g.name} to finish")


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    if os.geteuid() != 0:
        pytest.skip("port security tests need root (namespaces, nftables)")
    prefix = f"pktest-{secrets.token_hex(3)}"
    t = Topology(prefix, f"{prefix}-host", f"{prefix}-wan", [Network(**vars(n)) for n in NETS])
    for name, (netname, host) in GUESTS.items():
        net = next(n for n in t.networks if n.name == netname)
        third = net.subnet.split(".")[1]
        mac = f"02:00:00:00:{int(third):02x}:{host:02x}"
        ll = eui64_ll(mac)
        g6 = f"fd42:{third}::{host}" if net.ipv6_subnet else ""
        port = Port(network=netname, instance=f"default/{name}", kind="veth",
                    host_ifname=f"pkt{name}", mac=mac, ipv4=f"10.{third}.0.{host}",
                    ipv6=[ll] + ([g6] if g6 else []))
        t.guests[name] = Guest(name, f"{prefix}-{name}", port, ll, g6)
    try:
        _build(t)
        t.apply()
        yield t
    finally:
        for ns in (t.host, t.wan, *(g.ns for g in t.guests.values())):
            sh("ip", "netns", "del", ns, check=False)


def _flush_neighbours(t: Topology) -> None:
    """Forget every learnt neighbour (after a control run that poisoned some)."""
    for g in t.guests.values():
        sh("ip", "-n", g.ns, "neigh", "flush", "dev", "eth0")
    for n in t.networks:
        sh("ip", "-n", t.host, "neigh", "flush", "dev", n.bridge)


def _refresh_neighbours(t: Topology) -> None:
    """Fresh, correct ARP entries g1 <-> gateway, older than the 1 s ARP locktime."""
    g1 = t.guests["g1"]
    sh("ip", "-n", g1.ns, "neigh", "flush", "dev", "eth0")
    sh("ip", "-n", t.host, "neigh", "flush", "dev", "pk-a")
    assert ping(g1.ns, "10.77.0.1")
    # not synchronisation: the kernel ignores ARP updates to an entry younger than
    # its locktime (1 s); the control's poisoning needs that time to have passed
    time.sleep(1.2)


# --------------------------------------------------------------------------- legitimate traffic


def test_legitimate_traffic_passes(topo: Topology) -> None:
    g1, g2 = topo.guests["g1"], topo.guests["g2"]
    assert ping(g1.ns, g2.ip)
    assert ping(g1.ns, "10.77.0.1")
    assert ping(g1.ns, g2.global6)
    assert ping(g1.ns, f"{g2.lladdr6}%eth0")
    assert ping(g1.ns, "fd42:77::1")
    # TCP between guests, and DNS over TCP to the gateway
    for server_ns, addr, port in ((g2.ns, g2.ip, 5001), (topo.host, "10.77.0.1", 53)):
        with in_ns(server_ns):
            srv = socket.create_server((addr, port))
        with in_ns(g1.ns):
            cli = socket.socket()
        try:
            cli.settimeout(3)
            cli.connect((addr, port))
            conn, _ = srv.accept()
            cli.sendall(b"hello")
            assert conn.recv(5) == b"hello"
            conn.close()
        finally:
            cli.close()
            srv.close()


def test_dhcp_discovery_passes_and_other_host_services_do_not(topo: Topology) -> None:
    g1 = topo.guests["g1"]
    marker = secrets.token_bytes(12)
    with in_ns(topo.host):
        dhcp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        dhcp.bind(("0.0.0.0", 67))
        other.bind(("0.0.0.0", 5555))
        dhcp.settimeout(2)
        other.settimeout(1)
        send(g1.ns, eth("ff:ff:ff:ff:ff:ff", g1.mac, 0x0800,
                        udp4("0.0.0.0", "255.255.255.255", 68, 67, marker)))
        assert dhcp.recv(100) == marker
        send(g1.ns, eth(topo.bridge_mac["a"], g1.mac, 0x0800,
                        udp4(g1.ip, "10.77.0.1", 4000, 5555, marker)))
        with pytest.raises(TimeoutError):
            other.recv(100)
    finally:
        dhcp.close()
        other.close()
    # the host is not a service: TCP to another port of the gateway is dropped, not refused
    with in_ns(g1.ns):
        cli = socket.socket()
    with in_ns(topo.host):
        srv = socket.create_server(("10.77.0.1", 2222))
    try:
        cli.settimeout(1)
        with pytest.raises(TimeoutError):
            cli.connect(("10.77.0.1", 2222))
    finally:
        cli.close()
        srv.close()
    assert topo.counter("inet", "host-pk-a", "host-not-a-service") > 0


# --------------------------------------------------------------------------- attacks


def test_arp_spoof_gateway(topo: Topology) -> None:
    """g3 claims the gateway's IP to g1 and g1's IP to the gateway (ARP replies)."""
    g1, g3 = topo.guests["g1"], topo.guests["g3"]
    br = topo.bridge_mac["a"]
    attack = [
        eth(g1.mac, g3.mac, 0x0806, arp(2, g3.mac, "10.77.0.1", g1.mac, g1.ip)),
        eth(br, g3.mac, 0x0806, arp(2, g3.mac, g1.ip, br, "10.77.0.1")),
        eth("ff:ff:ff:ff:ff:ff", g3.mac, 0x0806,
            arp(1, g3.mac, "10.77.0.1", "00" * 6, "10.77.0.1")),
    ]

    def dropped() -> int:
        return topo.counter("bridge", nft.port_chain(g3.port.host_ifname), "arp-spoof")

    for protected in (False, True):
        ctx = topo.rules_off() if not protected else _nothing()
        with ctx:
            _refresh_neighbours(topo)
            assert neigh(g1.ns, "eth0")["10.77.0.1"] == br
            assert neigh(topo.host, "pk-a")[g1.ip] == g1.mac
            spoofs = dropped() if protected else 0  # no counter while the tables are off
            send(g3.ns, *attack)
            if protected:  # the event: the rule dropped all three frames
                wait_for(lambda s=spoofs: dropped() >= s + 3, 10,
                         "the arp-spoof rule to drop the three frames")
            else:  # the event: the frames reached and poisoned both tables
                wait_for(lambda: (neigh(g1.ns, "eth0").get("10.77.0.1"),
                                  neigh(topo.host, "pk-a").get(g1.ip)) == (g3.mac, g3.mac),
                         10, "the control's frames to poison both tables")
            victim, gateway = neigh(g1.ns, "eth0"), neigh(topo.host, "pk-a")
        if protected:
            assert victim["10.77.0.1"] == br
            assert gateway[g1.ip] == g1.mac
        else:  # the control: the same frames poison both tables without the rules
            assert victim["10.77.0.1"] == g3.mac
            assert gateway[g1.ip] == g3.mac
    assert topo.counter("bridge", nft.port_chain(g3.port.host_ifname), "arp-spoof") >= 2
    _refresh_neighbours(topo)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _attack(topo: Topology, attacker: str, victim: str, frames: list[bytes],
            pred: Callable[[bytes], bool] | bytes) -> tuple[int, int]:
    """(frames seen by the victim without rules, with rules) when ``attacker`` sends ``frames``."""
    seen = []
    for protected in (False, True):
        with topo.rules_off() if not protected else _nothing(), \
                Sniffer(topo.guests[victim].ns) as sniff:
            send(topo.guests[attacker].ns, *frames)
            seen.append(sniff.count(pred))
    return seen[0], seen[1]


def test_mac_spoof(topo: Topology) -> None:
    """g3 changes its MAC and sends: nothing reaches g1."""
    g1, g3 = topo.guests["g1"], topo.guests["g3"]
    fake = "02:00:00:00:66:66"
    marker = secrets.token_bytes(12)
    frames = [eth("ff:ff:ff:ff:ff:ff", fake, 0x0800,
                  udp4(g3.ip, "10.77.0.255", 4000, 4000, marker)),
              eth(g1.mac, fake, 0x0800, udp4(g3.ip, g1.ip, 4000, 4000, marker))]
    sh("ip", "-n", g3.ns, "link", "set", "eth0", "address", fake)
    try:
        before, after = _attack(topo, "g3", "g1", frames, marker)
        assert before == 2 and after == 0
        with Sniffer(g1.ns) as sniff:
            assert not ping(g3.ns, g1.ip)
            assert sniff.count(lambda f: f[6:12] == _mac(fake), 0.2) == 0
    finally:
        sh("ip", "-n", g3.ns, "link", "set", "eth0", "address", g3.mac)
        _flush_neighbours(topo)  # the control let g3 answer ARP with the fake MAC
    assert topo.counter("bridge", nft.port_chain(g3.port.host_ifname), "mac-spoof") > 0


def test_ipv4_source_spoof(topo: Topology) -> None:
    g1, g3 = topo.guests["g1"], topo.guests["g3"]
    marker = secrets.token_bytes(12)
    frames = [eth(g1.mac, g3.mac, 0x0800, udp4(src, g1.ip, 4000, 4000, marker))
              for src in (topo.guests["g2"].ip, "10.77.0.1", "10.77.0.200", "192.0.2.9")]
    assert _attack(topo, "g3", "g1", frames, marker) == (4, 0)
    # the real source still works
    with Sniffer(g1.ns) as sniff:
        send(g3.ns, eth(g1.mac, g3.mac, 0x0800, udp4(g3.ip, g1.ip, 4000, 4000, marker)))
        assert sniff.count(marker) == 1


def test_ipv6_source_spoof(topo: Topology) -> None:
    g1, g2, g3 = (topo.guests[n] for n in ("g1", "g2", "g3"))
    marker = secrets.token_bytes(12)
    frames = [eth(g1.mac, g3.mac, 0x86DD, udp6(src, g1.global6, 4000, 4000, marker))
              for src in (g2.global6, g2.lladdr6, "fd42:77::99", "fd42:77::1")]
    assert _attack(topo, "g3", "g1", frames, marker) == (4, 0)


def test_promiscuous_guest_sees_no_foreign_unicast(topo: Topology) -> None:
    """g3 in promiscuous mode while g1 talks to g2 and the gateway talks to g1 (flooded)."""
    g1, g2, g3 = (topo.guests[n] for n in ("g1", "g2", "g3"))
    sh("ip", "-n", g3.ns, "link", "set", "eth0", "promisc", "on")
    try:
        for protected in (False, True):
            marker = secrets.token_bytes(12)
            with topo.rules_off() if not protected else _nothing(), \
                    Sniffer(g3.ns) as spy, Sniffer(g2.ns) as peer:
                with in_ns(g1.ns):
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                with in_ns(topo.host):
                    h = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                for _ in range(3):  # then collected for a fixed window (spy.frames)
                    s.sendto(marker + b"g1->g2", (g2.ip, 4000))
                    h.sendto(marker + b"gw->g1", (g1.ip, 4000))
                s.close()
                h.close()
                frames = spy.frames()
                spied = sum(1 for f in frames if marker in f)
                unicast_foreign = sum(1 for f in frames if not f[0] & 1 and f[:6] != _mac(g3.mac))
                assert peer.count(marker + b"g1->g2", 0.1) == 3
            if protected:
                assert spied == 0 and unicast_foreign == 0
            else:  # the control: the bridge really floods (g1->g2, gw->g1, g2's ICMP errors)
                assert spied >= 6
        assert topo.counter("bridge", "forward", "not-for-this-port") > 0
        assert topo.counter("bridge", "output", "not-for-this-port") > 0
    finally:
        sh("ip", "-n", g3.ns, "link", "set", "eth0", "promisc", "off")


def test_rogue_dhcp_server(topo: Topology) -> None:
    g1, g3 = topo.guests["g1"], topo.guests["g3"]
    marker = secrets.token_bytes(12)
    frames = [
        eth("ff:ff:ff:ff:ff:ff", g3.mac, 0x0800,
            udp4(g3.ip, "255.255.255.255", 67, 68, marker)),
        eth(g1.mac, g3.mac, 0x0800, udp4(g3.ip, g1.ip, 67, 68, marker)),
        eth(g1.mac, g3.mac, 0x86DD, udp6(g3.lladdr6, g1.lladdr6, 547, 546, marker)),
    ]
    assert _attack(topo, "g3", "g1", frames, marker) == (3, 0)


def test_rogue_router_advertisement(topo: Topology) -> None:
    g3 = topo.guests["g3"]
    frames = [eth("33:33:00:00:00:01", g3.mac, 0x86DD, router_adv(g3.lladdr6, g3.mac))]
    assert _attack(topo, "g3", "g1", frames, lambda f: icmp6_type(f) == 134) == (1, 0)


def test_neighbour_advertisement_spoof(topo: Topology) -> None:
    """g3 advertises the gateway's and g1's IPv6 addresses as its own (NA poisoning)."""
    g1, g3 = topo.guests["g1"], topo.guests["g3"]
    honest = nd_adv(g3.lladdr6, "ff02::1", g3.global6, g3.mac)
    forged = [
        nd_adv(g3.lladdr6, "ff02::1", "fd42:77::1", g3.mac),  # the gateway's address
        nd_adv(g3.lladdr6, "ff02::1", g1.global6, g3.mac),    # a neighbour's address
        nd_adv(g3.lladdr6, "ff02::1", g3.global6, g1.mac),    # own address, foreign MAC
        # own address and MAC, then a second, foreign link-layer option
        ip6(g3.lladdr6, "ff02::1", 58, honest[40:] + bytes([2, 1]) + _mac(g1.mac)),
    ]
    frames = [eth("33:33:00:00:00:01", g3.mac, 0x86DD, f) for f in forged]
    assert _attack(topo, "g3", "g1", frames, lambda f: icmp6_type(f) == 136) == (4, 0)
    # the honest advertisement (own address, own MAC) passes
    with Sniffer(g1.ns) as sniff:
        send(g3.ns, eth("33:33:00:00:00:01", g3.mac, 0x86DD, honest))
        assert sniff.count(lambda f: icmp6_type(f) == 136) == 1


def test_non_ip_ethertypes_dropped(topo: Topology) -> None:
    g3 = topo.guests["g3"]
    marker = secrets.token_bytes(12)
    inner = udp4(g3.ip, "10.77.0.255", 4000, 4000, marker)
    frames = [
        eth("ff:ff:ff:ff:ff:ff", g3.mac, 0x88B5, marker),                         # local exp.
        eth("ff:ff:ff:ff:ff:ff", g3.mac, 0x8100, struct.pack("!HH", 5, 0x0800) + inner),  # VLAN
        eth("ff:ff:ff:ff:ff:ff", g3.mac, 0x88A8, struct.pack("!HH", 5, 0x0800) + inner),  # QinQ
        _mac("ff:ff:ff:ff:ff:ff") + _mac(g3.mac) + struct.pack("!H", 3 + len(marker))
        + b"\x42\x42\x03" + marker,                                                 # 802.3/LLC
    ]
    assert _attack(topo, "g3", "g1", frames, marker) == (4, 0)


def test_port_isolation(topo: Topology) -> None:
    g4, g5 = topo.guests["g4"], topo.guests["g5"]
    with topo.rules_off():
        assert ping(g4.ns, g5.ip)
    assert not ping(g4.ns, g5.ip)
    assert not ping(g5.ns, g4.ip)
    assert ping(g4.ns, "10.78.0.1")
    assert ping(g5.ns, "10.78.0.1")
    assert topo.counter("bridge", "forward", "port-isolation") > 0
    # g1..g3 are on a network without isolation: they still reach each other
    assert ping(topo.guests["g1"].ns, topo.guests["g3"].ip)


def test_networks_are_isolated_and_nat_masquerades(topo: Topology) -> None:
    g1, g4 = topo.guests["g1"], topo.guests["g4"]
    with topo.rules_off():  # the control: the host routes between everything
        assert ping(g1.ns, g4.ip)
        assert ping(g1.ns, "198.51.100.2")
    assert not ping(g1.ns, g4.ip)           # A -> B
    assert not ping(g4.ns, g1.ip)           # B -> A (B has NAT: still not to another bridge)
    assert not ping(g1.ns, "198.51.100.2")  # A has no NAT: nothing out
    assert topo.counter("inet", "out-pk-a", "network-isolation") > 0
    # B has NAT: out to the "wan" namespace, masqueraded to the host's address there
    before = topo.counter("inet", "postrouting", "nat-b")
    with Sniffer(topo.wan) as wan:
        assert ping(g4.ns, "198.51.100.2")
        sources = {socket.inet_ntoa(f[26:30]) for f in wan.frames(0.3) if f[12:14] == b"\x08\x00"}
    assert topo.counter("inet", "postrouting", "nat-b") == before + 1
    assert "10.78.0.14" not in sources
    # and nothing from outside comes into B unless it is a reply
    assert not ping(topo.wan, g4.ip)


def test_failed_apply_changes_nothing(topo: Topology) -> None:
    """A batch nft refuses leaves the rules in force untouched (one transaction)."""
    before = {i["chain"]["name"] for i in nft.current(netns=topo.host)["nftables"]
              if "chain" in i}
    broken = nft.build_ruleset(topo.networks, topo.ports[:2])
    broken.append({"add": {"rule": {"family": "bridge", "table": nft.table_name(),
                                    "chain": "missing",
                                    "expr": [{"drop": None}]}}})
    with pytest.raises(nft.NftError, match="apply failed"):
        nft.apply(broken, netns=topo.host)
    after = {i["chain"]["name"] for i in nft.current(netns=topo.host)["nftables"]
             if "chain" in i}
    assert after == before
    assert {nft.port_chain(p.host_ifname) for p in topo.ports} <= after


def test_remove_all_and_missing_table(topo: Topology) -> None:
    nft.remove_all(netns=topo.host)
    try:
        with pytest.raises(nft.NftTableMissing):
            nft.current(netns=topo.host)
        nft.remove_all(netns=topo.host)  # removing what is not there is not an error
    finally:
        topo.apply()
    assert nft.current("inet", netns=topo.host)["nftables"]

