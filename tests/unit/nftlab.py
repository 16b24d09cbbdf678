"""Shared helpers of the nftables effect tests (test_nft_effect.py, test_nft_effect6.py).

Network namespaces entered from a thread, popek's rule counters as ``nft`` lists
them, hand-made Ethernet/ARP/IPv4/IPv6 frames and a raw socket ("wire") on a
guest's ``eth0``.  Nothing here names a namespace itself: each test module
computes its names when its fixture runs (forked mutation-test children run side
by side, so the names carry the pid of the process that runs the tests) and
passes them in.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import select
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TypeVar

from popek.network import nft

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
BROADCAST = "ff:ff:ff:ff:ff:ff"
WAIT = 5.0
"""Seconds to wait for an event (a frame, a counter) before failing."""


# --------------------------------------------------------------------------- namespaces


_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread that entered network namespace ``ns``; return its result.

    A socket keeps the namespace it was created in, so sockets made here
    send and receive inside ``ns`` while the test uses them from its own thread.
    """
    out: list[T] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {ns}")
            finally:
                os.close(fd)
            out.append(fn())
        except BaseException as exc:
            err.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if err:
        raise err[0]
    return out[0]


def sock_in(ns: str, family: int, kind: int, bind: tuple[str, int] | None = None
            ) -> socket.socket:
    """A socket of namespace ``ns``'s stack, bound to ``bind`` if given."""
    def open_() -> socket.socket:
        s = socket.socket(family, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if bind:
            s.bind(bind)
        return s

    return in_netns(ns, open_)


def readable(sock: socket.socket, timeout: float) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


# --------------------------------------------------------------------------- counters


def counter(netns: str, family: str, chain: str, comment: str) -> int:
    """Packets counted so far by the rule with ``comment`` in ``chain`` of popek's table."""
    for item in nft.current(family, netns=netns)["nftables"]:
        rule = item.get("rule")
        if rule and rule["chain"] == chain and rule.get("comment") == comment:
            for expr in rule["expr"]:
                if "counter" in expr:
                    return int(expr["counter"]["packets"])
    raise AssertionError(f"{family} table has no counted rule {comment!r} in chain {chain}")


def all_counters(netns: str, family: str) -> dict[tuple[str, str], int]:
    """Packets counted so far by every counted rule of popek's ``family`` table."""
    counts: dict[tuple[str, str], int] = {}
    for item in nft.current(family, netns=netns)["nftables"]:
        rule = item.get("rule")
        if rule:
            for expr in rule["expr"]:
                if "counter" in expr:
                    key = (rule["chain"], str(rule.get("comment")))
                    counts[key] = counts.get(key, 0) + int(expr["counter"]["packets"])
    return counts


class Counter:
    """One rule's counter in namespace ``netns``, read when made."""

    def __init__(self, netns: str, family: str, chain: str, comment: str) -> None:
        self.netns = netns
        self.where = (family, chain, comment)
        self.before = counter(netns, *self.where)

    def rose(self) -> int:
        """Packets counted since this object was made."""
        return counter(self.netns, *self.where) - self.before

    def wait_rise(self, by: int = 1, exact: bool = True) -> None:
        """Wait until ``by`` more packets hit the rule (fail after WAIT seconds); with
        ``exact``, check it is exactly ``by``."""
        deadline = time.monotonic() + WAIT
        while self.rose() < by:
            if time.monotonic() > deadline:
                raise AssertionError(f"rule {self.where} counted {self.rose()} packets, "
                                     f"expected {by}")
            select.select([], [], [], 0.02)  # let the softirq run; the counter is the event
        if exact:
            assert self.rose() == by, f"rule {self.where} counted {self.rose()}, expected {by}"


# --------------------------------------------------------------------------- frames


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def ip_bytes(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


def csum(data: bytes) -> int:
    """The Internet checksum of ``data``."""
    if len(data) % 2:
        data += b"\0"
    s = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ether(dst: str, src: str, etype: int, payload: bytes) -> bytes:
    """An Ethernet II frame."""
    return mac_bytes(dst) + mac_bytes(src) + etype.to_bytes(2, "big") + payload


def arp(op: int, sha: str, spa: str, tpa: str, tha: str = "00:00:00:00:00:00",
        htype: int = 1) -> bytes:
    """An Ethernet/IPv4 ARP packet, followed by a unique trailer (to recognise the frame)."""
    return (htype.to_bytes(2, "big") + b"\x08\x00\x06\x04" + op.to_bytes(2, "big")
            + mac_bytes(sha) + ip_bytes(spa) + mac_bytes(tha) + ip_bytes(tpa)
            + uuid.uuid4().bytes)


def ipv4(src: str, dst: str, proto: int, l4: bytes) -> bytes:
    """An IPv4 packet carrying ``l4``."""
    head = (b"\x45\x00" + (20 + len(l4)).to_bytes(2, "big") + b"\0\0\x40\x00\x40"
            + bytes([proto]) + b"\0\0" + ip_bytes(src) + ip_bytes(dst))
    return head[:10] + csum(head).to_bytes(2, "big") + head[12:] + l4


def udp4(src: str, dst: str, sport: int, dport: int) -> bytes:
    """An IPv4/UDP packet with a unique payload (UDP checksum left out: 0)."""
    data = uuid.uuid4().bytes
    udp = (sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
           + (8 + len(data)).to_bytes(2, "big") + b"\0\0" + data)
    return ipv4(src, dst, 17, udp)


def tcp4(src: str, dst: str, sport: int, dport: int) -> bytes:
    """An IPv4/TCP SYN (checksum left out) followed by a unique payload."""
    tcp = (sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + b"\0\0\0\1\0\0\0\0"
           + b"\x50\x02\x20\x00\0\0\0\0" + uuid.uuid4().bytes)
    return ipv4(src, dst, 6, tcp)


def mcast_mac(addr: str) -> str:
    """The Ethernet group address of IPv6 multicast ``addr``."""
    low = ip_bytes(addr)[-4:]
    return "33:33:" + ":".join(f"{b:02x}" for b in low)


def ipv6(src: str, dst: str, nh: int, l4: bytes, hlim: int = 255) -> bytes:
    """An IPv6 packet; the checksum at ``l4``'s offset 2 (ICMPv6) or 6 (UDP) is filled in."""
    pseudo = ip_bytes(src) + ip_bytes(dst) + len(l4).to_bytes(4, "big") + b"\0\0\0" + bytes([nh])
    at = 2 if nh == 58 else 6
    l4 = l4[:at] + csum(pseudo + l4).to_bytes(2, "big") + l4[at + 2:]
    return (b"\x60\0\0\0" + len(l4).to_bytes(2, "big") + bytes([nh, hlim]) + ip_bytes(src)
            + ip_bytes(dst) + l4)


def icmp6(src: str, dst: str, typ: int, body: bytes, hlim: int = 255) -> bytes:
    """An IPv6/ICMPv6 packet of type ``typ`` (code 0)."""
    return ipv6(src, dst, 58, bytes([typ, 0]) + b"\0\0" + body, hlim)


def udp6(src: str, dst: str, sport: int, dport: int, hlim: int = 255) -> bytes:
    """An IPv6/UDP packet with a unique payload and a valid checksum."""
    data = uuid.uuid4().bytes
    udp = (sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
           + (8 + len(data)).to_bytes(2, "big") + b"\0\0" + data)
    return ipv6(src, dst, 17, udp, hlim)


def lla(option: int, mac: str) -> bytes:
    """A source (1) or target (2) link-layer address option."""
    return bytes([option, 1]) + mac_bytes(mac)


def na(src: str, target: str, options: bytes = b"") -> bytes:
    """An unsolicited neighbour advertisement (override flag) to all nodes."""
    return icmp6(src, "ff02::1", 136, b"\x20\0\0\0" + ip_bytes(target) + options)


def ns(src: str, target: str, options: bytes = b"") -> bytes:
    """A neighbour solicitation for ``target`` to its solicited-node group."""
    group = str(ipaddress.IPv6Address("ff02::1:ff00:0")
                + (int(ip_bytes(target)[-3:].hex(), 16)))
    return icmp6(src, group, 135, b"\0\0\0\0" + ip_bytes(target) + options)


def rs(src: str, options: bytes = b"") -> bytes:
    """A router solicitation to all routers."""
    return icmp6(src, "ff02::2", 133, b"\0\0\0\0" + options)


def frame6(src_mac: str, packet: bytes, dst_mac: str | None = None) -> bytes:
    """``packet`` (IPv6) in an Ethernet frame to ``dst_mac`` or its multicast group."""
    dst = ipaddress.IPv6Address(packet[24:40])
    return ether(dst_mac or mcast_mac(str(dst)), src_mac, 0x86DD, packet)


# --------------------------------------------------------------------------- wires


class Wire:
    """A raw socket on ``eth0`` of namespace ``ns``: sends frames, records the frames it
    receives.  ``name`` names it in failures."""

    def __init__(self, ns: str, name: str) -> None:
        def open_() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.bind(("eth0", 0))
            return s

        self.name = name
        self.sock = in_netns(ns, open_)
        self.sock.setblocking(False)
        self.got: list[bytes] = []

    def send(self, frame: bytes) -> None:
        assert self.sock.send(frame) == len(frame)

    def _drain(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
            except BlockingIOError:
                return
            if addr[2] != PACKET_OUTGOING:
                self.got.append(data)

    def seen(self, frame: bytes) -> bool:
        """Whether ``frame`` arrived (byte for byte) so far."""
        self._drain()
        return any(f[:len(frame)] == frame for f in self.got)

    def seen_any(self, pred: Callable[[bytes], bool]) -> bool:
        """Whether a frame satisfying ``pred`` arrived so far."""
        self._drain()
        return any(pred(f) for f in self.got)

    def wait_for(self, pred: Callable[[bytes], bool], what: str) -> None:
        """Wait until a frame satisfying ``pred`` arrives; fail after WAIT seconds."""
        deadline = time.monotonic() + WAIT
        while True:
            self._drain()
            if any(pred(f) for f in self.got):
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.name} never received {what}")
            select.select([self.sock], [], [], left)

    def wait(self, frame: bytes) -> None:
        """Wait until ``frame`` arrives; fail after WAIT seconds."""
        self.wait_for(lambda f: f[:len(frame)] == frame, frame.hex())

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def fresh_netns(prefix: str) -> Iterator[str]:
    """A new, empty network namespace named ``PREFIX-PID-RANDOM``, deleted afterwards."""
    name = f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)
