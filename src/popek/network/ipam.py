"""Validation and address management for networks: names, subnets, IPv4 leases, MACs.

Everything here is pure (no netlink, no store): the service passes in what
the store and the host already use, and gets back a value or an
:class:`~popek.errors.InvalidInput` / :class:`~popek.errors.ResourceError`
that says what was wrong and what is allowed.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from popek.errors import AlreadyExists, InvalidInput, ResourceError

#: the same rule as instance names (popek.core.model): a DNS label
NAME_RULE = ("1 to 63 characters: lower-case letters a-z, digits 0-9 and '-', "
             "starting with a letter and not ending with '-'")
_NAME = re.compile(r"^[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?$")

MIN_PREFIX = 8
MAX_PREFIX = 29
PRIVATE_RANGES = tuple(ipaddress.IPv4Network(n) for n in
                       ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
#: where subnets are picked when none is given: 10.200.0.0/24 ... 10.250.255.0/24
AUTO_FIRST = ipaddress.IPv4Network("10.200.0.0/24")
AUTO_LAST = ipaddress.IPv4Network("10.250.255.0/24")

TAP_MAC_PREFIX = "52:54:00"   # QEMU's OUI: what guests of VMs expect
VETH_MAC_PREFIX = "02"        # locally administered, unicast
BRIDGE_MAC_PREFIX = "06:70:6b"  # locally administered; never a port's prefix
_MAC = re.compile(r"^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$")


def validate_network_name(name: str) -> str:
    """Return ``name`` if it is a valid network name (a DNS label); raise :class:`InvalidInput`."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidInput(f"invalid network name {name!r}: use {NAME_RULE}")
    return name


def validate_instance_ref(instance: str) -> str:
    """Return ``project/name`` for ``instance`` (``name`` alone means project ``default``)."""
    parts = instance.split("/") if isinstance(instance, str) else []
    if len(parts) == 1:
        parts = ["default", *parts]
    if len(parts) != 2 or not all(_NAME.match(p) for p in parts):
        raise InvalidInput(f"invalid instance {instance!r}: expected NAME or PROJECT/NAME, "
                           f"each {NAME_RULE}")
    return f"{parts[0]}/{parts[1]}"


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    """Parse and check a subnet given by the user; raise :class:`InvalidInput` when refused.

    Allowed: an IPv4 CIDR with no host bits set, prefix /8 to /29, inside
    10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16.
    """
    allowed = (f"an IPv4 CIDR such as 10.77.0.0/24, prefix /{MIN_PREFIX} to /{MAX_PREFIX}, "
               "inside " + ", ".join(str(r) for r in PRIVATE_RANGES))
    if not isinstance(text, str) or "/" not in text:
        raise InvalidInput(f"invalid subnet {text!r}: expected {allowed}")
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError as exc:
        raise InvalidInput(f"invalid subnet {text!r} ({exc}): expected {allowed}") from exc
    if not isinstance(net, ipaddress.IPv4Network):
        raise InvalidInput(f"invalid subnet {text!r}: IPv6 subnets are not supported here; "
                           f"expected {allowed}")
    if str(net.network_address) != text.strip().split("/")[0]:
        raise InvalidInput(f"invalid subnet {text!r}: host bits are set; did you mean {net}?")
    if not MIN_PREFIX <= net.prefixlen <= MAX_PREFIX:
        raise InvalidInput(f"invalid subnet {text!r}: prefix /{net.prefixlen} is out of range; "
                           f"expected {allowed}")
    if not any(net.subnet_of(r) for r in PRIVATE_RANGES):
        raise InvalidInput(f"invalid subnet {text!r}: not a private range; expected {allowed}")
    return net


@dataclass(frozen=True)
class Used:
    """A subnet already in use, and by what (for error messages)."""

    subnet: ipaddress.IPv4Network
    what: str


def check_overlap(net: ipaddress.IPv4Network, used: Iterable[Used]) -> None:
    """Raise :class:`AlreadyExists` when ``net`` overlaps any subnet in ``used``."""
    for u in used:
        if net.overlaps(u.subnet):
            raise AlreadyExists(f"subnet {net} overlaps {u.subnet} ({u.what}); "
                                "pick a subnet that no popek network and no host address "
                                "or route uses, or omit --subnet to get a free one")


def pick_subnet(used: Iterable[Used]) -> ipaddress.IPv4Network:
    """Return the first free /24 from 10.200.0.0/24 to 10.250.255.0/24."""
    taken = list(used)
    first = int(AUTO_FIRST.network_address) >> 8
    last = int(AUTO_LAST.network_address) >> 8
    for n in range(first, last + 1):
        net = ipaddress.IPv4Network((n << 8, 24))
        if not any(net.overlaps(u.subnet) for u in taken):
            return net
    raise ResourceError(f"no free /24 left between {AUTO_FIRST} and {AUTO_LAST}; "
                        "give a subnet with --subnet")


def gateway_of(net: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """Return the gateway of ``net``: its first host address."""
    return net.network_address + 1


def allocate_ipv4(net: ipaddress.IPv4Network, used: Iterable[str],
                  static: str | None = None) -> str:
    """Return the address to lease: ``static`` when it is valid and free, else the lowest free.

    Never the network, gateway or broadcast address.  Raises
    :class:`InvalidInput` for a bad static address, :class:`AlreadyExists`
    when it is taken and :class:`ResourceError` when the subnet is full.
    """
    taken = set(used)
    gw = gateway_of(net)
    if static is not None:
        try:
            addr = ipaddress.IPv4Address(static)
        except ValueError as exc:
            raise InvalidInput(f"invalid IPv4 address {static!r}: expected dotted form such "
                               f"as {gw + 1}") from exc
        if addr not in net:
            raise InvalidInput(f"address {addr} is outside the network's subnet {net}; "
                               f"allowed: {gw + 1} to {net.broadcast_address - 1}")
        if addr in (net.network_address, gw, net.broadcast_address):
            raise InvalidInput(f"address {addr} is reserved in {net} (network, gateway "
                               f"{gw} or broadcast); allowed: {gw + 1} to "
                               f"{net.broadcast_address - 1}")
        if str(addr) in taken:
            raise AlreadyExists(f"address {addr} is already leased on this network; "
                                "pick another or omit it to get the lowest free one")
        return str(addr)
    addr = gw + 1
    while addr < net.broadcast_address:
        if str(addr) not in taken:
            return str(addr)
        addr += 1
    raise ResourceError(f"no free IPv4 address left in {net} "
                        f"({net.num_addresses - 3} usable, all leased)")


def normalize_mac(mac: str) -> str:
    """Return ``mac`` in lower case; raise :class:`InvalidInput` unless it is unicast and valid."""
    text = mac.strip().lower().replace("-", ":") if isinstance(mac, str) else ""
    if not _MAC.match(text):
        raise InvalidInput(f"invalid MAC address {mac!r}: expected six hex bytes such as "
                           "52:54:00:12:34:56")
    first = int(text[:2], 16)
    if first & 1:
        raise InvalidInput(f"invalid MAC address {mac!r}: a multicast address cannot be a "
                           "port's address (the first byte must be even)")
    if text == "00:00:00:00:00:00":
        raise InvalidInput(f"invalid MAC address {mac!r}: all zeros")
    if text.startswith(BRIDGE_MAC_PREFIX):
        raise InvalidInput(f"invalid MAC address {mac!r}: {BRIDGE_MAC_PREFIX}:... is kept "
                           "for popek bridges")
    return text


def generate_mac(kind: str, taken: Iterable[str],
                 rand: Callable[[int], bytes] = secrets.token_bytes) -> str:
    """Return a new MAC for a port of ``kind``: ``52:54:00:..`` (tap) or ``02:..`` (veth)."""
    used = set(taken)
    for _ in range(1000):
        if kind == "tap":
            mac = TAP_MAC_PREFIX + "".join(f":{b:02x}" for b in rand(3))
        else:
            mac = VETH_MAC_PREFIX + "".join(f":{b:02x}" for b in rand(5))
        if mac not in used and mac != "02:00:00:00:00:00":
            return mac
    raise ResourceError("could not find a free MAC address after 1000 tries")


def bridge_mac(bridge: str) -> str:
    """Return the fixed MAC of a bridge (so the gateway's MAC never changes with its ports)."""
    import hashlib

    digest = hashlib.sha256(bridge.encode()).digest()
    return BRIDGE_MAC_PREFIX + "".join(f":{b:02x}" for b in digest[:3])


def link_local(mac: str) -> str:
    """Return the IPv6 link-local address derived from ``mac`` (modified EUI-64)."""
    octets = [int(x, 16) for x in mac.split(":")]
    octets[0] ^= 0x02
    eui = [*octets[:3], 0xFF, 0xFE, *octets[3:]]
    iid = int.from_bytes(bytes(eui), "big")
    return str(ipaddress.IPv6Address((0xFE80 << 112) | iid))
