"""Network names, subnets, IPv4 allocation and MACs: validated with clear messages (no root)."""

from __future__ import annotations

import ipaddress

import pytest

from popek.errors import AlreadyExists, InvalidInput, ResourceError
from popek.network import ipam


@pytest.mark.parametrize("name", ["a", "lan", "web-01", "a" * 63])
def test_valid_network_names(name: str) -> None:
    assert ipam.validate_network_name(name) == name


@pytest.mark.parametrize("name", ["", "1net", "-n", "n-", "LAN", "a" * 64, "a_b", "a.b", "../x"])
def test_invalid_network_names(name: str) -> None:
    with pytest.raises(InvalidInput, match="lower-case letters"):
        ipam.validate_network_name(name)


@pytest.mark.parametrize("text", ["10.77.0.0/24", "172.16.0.0/12", "192.168.1.0/29", "10.0.0.0/8"])
def test_valid_subnets(text: str) -> None:
    assert str(ipam.parse_subnet(text)) == text


@pytest.mark.parametrize(("text", "why"), [
    ("10.77.0.1/24", "host bits are set; did you mean 10.77.0.0/24"),
    ("10.77.0.0", "expected an IPv4 CIDR"),
    ("nonsense/24", "expected an IPv4 CIDR"),
    ("10.77.0.0/30", "prefix /30 is out of range"),
    ("10.0.0.0/7", "expected an IPv4 CIDR"),
    ("8.8.8.0/24", "not a private range"),
    ("192.0.2.0/24", "not a private range"),
    ("fd00::/64", "IPv6 subnets are not supported"),
])
def test_invalid_subnets(text: str, why: str) -> None:
    with pytest.raises(InvalidInput, match=why.replace("/", ".")):
        ipam.parse_subnet(text)


def test_overlap_names_what_overlaps() -> None:
    used = [ipam.Used(ipaddress.IPv4Network("10.77.0.0/16"), "popek network lan")]
    with pytest.raises(AlreadyExists, match=r"10\.77\.5\.0/24 overlaps 10\.77\.0\.0/16 "
                                            r"\(popek network lan\)"):
        ipam.check_overlap(ipaddress.IPv4Network("10.77.5.0/24"), used)
    ipam.check_overlap(ipaddress.IPv4Network("10.78.0.0/24"), used)


def test_pick_subnet_skips_used() -> None:
    used = [ipam.Used(ipaddress.IPv4Network("10.200.0.0/23"), "x"),
            ipam.Used(ipaddress.IPv4Network("10.200.2.128/25"), "host route")]
    assert str(ipam.pick_subnet(used)) == "10.200.3.0/24"
    assert str(ipam.pick_subnet([])) == "10.200.0.0/24"


def test_pick_subnet_exhausted() -> None:
    used = [ipam.Used(ipaddress.IPv4Network("10.192.0.0/10"), "everything")]
    with pytest.raises(ResourceError, match="no free /24"):
        ipam.pick_subnet(used)


def test_allocate_lowest_free_skips_reserved() -> None:
    net = ipaddress.IPv4Network("10.1.0.0/29")
    assert ipam.allocate_ipv4(net, []) == "10.1.0.2"
    assert ipam.allocate_ipv4(net, ["10.1.0.2", "10.1.0.4"]) == "10.1.0.3"


def test_allocate_exhaustion() -> None:
    net = ipaddress.IPv4Network("10.1.0.0/29")
    used = [f"10.1.0.{i}" for i in range(2, 7)]
    with pytest.raises(ResourceError, match="no free IPv4 address left in 10.1.0.0/29"):
        ipam.allocate_ipv4(net, used)


def test_allocate_static() -> None:
    net = ipaddress.IPv4Network("10.1.0.0/24")
    assert ipam.allocate_ipv4(net, ["10.1.0.2"], "10.1.0.50") == "10.1.0.50"
    with pytest.raises(AlreadyExists, match="already leased"):
        ipam.allocate_ipv4(net, ["10.1.0.50"], "10.1.0.50")
    with pytest.raises(InvalidInput, match="outside the network's subnet"):
        ipam.allocate_ipv4(net, [], "10.2.0.5")
    for reserved in ("10.1.0.0", "10.1.0.1", "10.1.0.255"):
        with pytest.raises(InvalidInput, match="reserved"):
            ipam.allocate_ipv4(net, [], reserved)
    with pytest.raises(InvalidInput, match="invalid IPv4 address"):
        ipam.allocate_ipv4(net, [], "10.1.0.300")


def test_generated_macs() -> None:
    tap = ipam.generate_mac("tap", [])
    veth = ipam.generate_mac("veth", [])
    assert tap.startswith("52:54:00:") and len(tap) == 17
    assert veth.startswith("02:") and len(veth) == 17
    seq = iter([b"\x00\x00\x01", b"\x00\x00\x02"])
    assert ipam.generate_mac("tap", ["52:54:00:00:00:01"], lambda n: next(seq)) == \
        "52:54:00:00:00:02"
    assert ipam.normalize_mac(tap) == tap


@pytest.mark.parametrize(("mac", "why"), [("01:00:5e:00:00:01", "multicast"),
                                          ("00:00:00:00:00:00", "all zeros"),
                                          ("52:54:00:zz:00:01", "six hex bytes"),
                                          ("06:70:6b:00:00:01", "popek bridges")])
def test_invalid_macs(mac: str, why: str) -> None:
    with pytest.raises(InvalidInput, match=why):
        ipam.normalize_mac(mac)


def test_link_local_is_eui64() -> None:
    assert ipam.link_local("52:54:00:12:34:56") == "fe80::5054:ff:fe12:3456"
    assert ipam.link_local("02:00:00:00:00:01") == "fe80::ff:fe00:1"


def test_bridge_mac_is_stable_and_local() -> None:
    assert ipam.bridge_mac("pk-1") == ipam.bridge_mac("pk-1")
    assert ipam.bridge_mac("pk-1").startswith("06:70:6b:")


def test_instance_refs() -> None:
    assert ipam.validate_instance_ref("web") == "default/web"
    assert ipam.validate_instance_ref("prod/web") == "prod/web"
    for bad in ("", "a/b/c", "Web", "prod/"):
        with pytest.raises(InvalidInput, match="NAME or PROJECT/NAME"):
            ipam.validate_instance_ref(bad)
