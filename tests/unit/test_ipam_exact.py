"""IPAM's exact answers and messages at the edges (popek.network.ipam).

Written against the survivors of ``make mutants`` (bench/mutants.py): the
ranges a refusal offers, the last free subnet, the MAC generator's bound and
its one excluded address, non-string input.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterator

import pytest

from popek.errors import AlreadyExists, InvalidInput, ResourceError
from popek.network import ipam

NET = ipaddress.IPv4Network("10.9.0.0/29")  # .0 network, .1 gateway, .2-.6 usable, .7 broadcast
ALLOWED = ("an IPv4 CIDR such as 10.77.0.0/24, prefix /8 to /29, inside 10.0.0.0/8, "
           "172.16.0.0/12, 192.168.0.0/16")


def _msg(exc: pytest.ExceptionInfo[BaseException]) -> str:
    return str(exc.value)


def test_static_address_refusals_offer_the_usable_range() -> None:
    with pytest.raises(InvalidInput) as exc:
        ipam.allocate_ipv4(NET, [], "10.9.0")
    assert _msg(exc) == "invalid IPv4 address '10.9.0': expected dotted form such as 10.9.0.2"
    with pytest.raises(InvalidInput) as exc:
        ipam.allocate_ipv4(NET, [], "10.9.0.8")
    assert _msg(exc) == ("address 10.9.0.8 is outside the network's subnet 10.9.0.0/29; "
                         "allowed: 10.9.0.2 to 10.9.0.6")
    for reserved in ("10.9.0.0", "10.9.0.1", "10.9.0.7"):
        with pytest.raises(InvalidInput) as exc:
            ipam.allocate_ipv4(NET, [], reserved)
        assert _msg(exc) == (f"address {reserved} is reserved in 10.9.0.0/29 (network, gateway "
                             "10.9.0.1 or broadcast); allowed: 10.9.0.2 to 10.9.0.6")
    with pytest.raises(AlreadyExists) as exc:
        ipam.allocate_ipv4(NET, ["10.9.0.4"], "10.9.0.4")
    assert _msg(exc) == ("address 10.9.0.4 is already leased on this network; pick another or "
                         "omit it to get the lowest free one")


def test_every_usable_address_is_leased_then_the_subnet_is_full() -> None:
    leased: list[str] = []
    for _ in range(5):
        leased.append(ipam.allocate_ipv4(NET, leased))
    assert leased == ["10.9.0.2", "10.9.0.3", "10.9.0.4", "10.9.0.5", "10.9.0.6"]
    with pytest.raises(ResourceError) as exc:
        ipam.allocate_ipv4(NET, leased)
    assert _msg(exc) == "no free IPv4 address left in 10.9.0.0/29 (5 usable, all leased)"


def test_overlap_message() -> None:
    used = [ipam.Used(ipaddress.IPv4Network("10.9.0.0/24"), "network a")]
    with pytest.raises(AlreadyExists) as exc:
        ipam.check_overlap(NET, used)
    assert _msg(exc) == ("subnet 10.9.0.0/29 overlaps 10.9.0.0/24 (network a); pick a subnet "
                         "that no popek network and no host address or route uses, or omit "
                         "--subnet to get a free one")


def _all_but_the_last_auto_subnet() -> list[ipam.Used]:
    first = ipaddress.IPv4Address("10.200.0.0")
    last = ipaddress.IPv4Address("10.250.254.255")
    return [ipam.Used(n, "taken") for n in ipaddress.summarize_address_range(first, last)]


def test_the_last_auto_subnet_is_picked_and_then_none_is_left() -> None:
    used = _all_but_the_last_auto_subnet()
    assert ipam.pick_subnet(used) == ipaddress.IPv4Network("10.250.255.0/24")
    used.append(ipam.Used(ipaddress.IPv4Network("10.250.255.0/24"), "taken"))
    with pytest.raises(ResourceError) as exc:
        ipam.pick_subnet(used)
    assert _msg(exc) == ("no free /24 left between 10.200.0.0/24 and 10.250.255.0/24; give a "
                         "subnet with --subnet")


def test_subnet_refusals_name_the_allowed_forms() -> None:
    with pytest.raises(InvalidInput) as exc:
        ipam.parse_subnet("10.9.0.0")  # no prefix length
    assert _msg(exc) == f"invalid subnet '10.9.0.0': expected {ALLOWED}"
    with pytest.raises(InvalidInput) as exc:
        ipam.parse_subnet(None)  # type: ignore[arg-type]
    assert _msg(exc) == f"invalid subnet None: expected {ALLOWED}"
    with pytest.raises(InvalidInput) as exc:
        ipam.parse_subnet("8.8.8.0/24")
    assert _msg(exc) == f"invalid subnet '8.8.8.0/24': not a private range; expected {ALLOWED}"


def test_mac_generator_gives_up_after_exactly_1000_tries() -> None:
    calls = 0

    def same(n: int) -> bytes:
        nonlocal calls
        calls += 1
        return b"\x01" * n

    with pytest.raises(ResourceError) as exc:
        ipam.generate_mac("tap", ["52:54:00:01:01:01"], rand=same)
    assert _msg(exc) == "could not find a free MAC address after 1000 tries"
    assert calls == 1000


def test_mac_generator_never_returns_the_all_zero_veth_address() -> None:
    seq: Iterator[bytes] = iter([b"\x00" * 5, b"\x00\x00\x00\x00\x07"])
    assert ipam.generate_mac("veth", [], rand=lambda n: next(seq)) == "02:00:00:00:00:07"


def test_bridge_mac_is_the_prefix_and_three_digest_bytes() -> None:
    d = hashlib.sha256(b"popekbr0").digest()
    assert ipam.bridge_mac("popekbr0") == f"06:70:6b:{d[0]:02x}:{d[1]:02x}:{d[2]:02x}"


def test_normalize_mac_edges() -> None:
    assert ipam.normalize_mac(" A2-00-00-00-00-01 ") == "a2:00:00:00:00:01"
    with pytest.raises(InvalidInput) as exc:
        ipam.normalize_mac(None)  # type: ignore[arg-type]
    assert _msg(exc) == ("invalid MAC address None: expected six hex bytes such as "
                         "52:54:00:12:34:56")
    with pytest.raises(InvalidInput) as exc:
        ipam.normalize_mac("a3:00:00:00:00:01")
    assert _msg(exc) == ("invalid MAC address 'a3:00:00:00:00:01': a multicast address cannot "
                         "be a port's address (the first byte must be even)")
    with pytest.raises(InvalidInput) as exc:
        ipam.normalize_mac("06:70:6b:00:00:01")
    assert _msg(exc) == ("invalid MAC address '06:70:6b:00:00:01': 06:70:6b:... is kept for "
                         "popek bridges")


def test_instance_ref_that_is_not_a_string_is_refused() -> None:
    with pytest.raises(InvalidInput, match="expected NAME or PROJECT/NAME"):
        ipam.validate_instance_ref(None)  # type: ignore[arg-type]
