"""nft's loading and removal against the kernel (popek.network.nft), as root.

Written against the survivors of ``make mutants`` (bench/mutants.py), which
found remove_all reached by no unit test and apply/check/current only on
their good paths.  Each test works in a network namespace of its own, so the
host's rules are never touched.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from popek.network import nft
from popek.network.model import Network, Port
from unit.nftlab import fresh_netns
from unit.test_nft import small

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None,
                                reason="loading rules needs root and nftables")


@pytest.fixture
def netns() -> Iterator[str]:
    with fresh_netns("nfm") as name:
        yield name


def _tables(netns: str) -> set[tuple[str, str]]:
    out = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "tables"],
                         capture_output=True, text=True, check=True).stdout
    return {(w[1], w[2]) for w in (line.split() for line in out.splitlines()) if len(w) == 3}


def test_remove_all_deletes_only_popeks_tables_and_may_repeat(netns: str) -> None:
    table = nft.table_name()
    subprocess.run(["ip", "netns", "exec", netns, "nft", "add", "table", "inet", "keepme"],
                   check=True)
    nft.apply(nft.build_ruleset(*small()), netns=netns)
    assert _tables(netns) == {("bridge", table), ("inet", table), ("inet", "keepme")}
    assert nft.current("bridge", netns=netns)["nftables"]
    nft.remove_all(netns=netns)
    assert _tables(netns) == {("inet", "keepme")}
    for family in ("bridge", "inet"):
        with pytest.raises(nft.NftTableMissing) as exc:
            nft.current(family, netns=netns)
        assert str(exc.value) == f"nftables table {family} {table} does not exist"
    nft.remove_all(netns=netns)  # nothing left to remove: not an error
    assert _tables(netns) == {("inet", "keepme")}


def test_a_refused_apply_changes_nothing_and_says_why(netns: str) -> None:
    good = nft.build_ruleset(*small())
    nft.apply(good, netns=netns)
    before = nft.current("bridge", netns=netns)
    bad = [*good, {"add": {"rule": {"family": "bridge", "table": nft.table_name(),
                                    "chain": "no-such-chain", "expr": [{"accept": None}]}}}]
    with pytest.raises(nft.NftError) as exc:
        nft.apply(bad, netns=netns)
    assert exc.value.action == "apply" and exc.value.returncode == 1
    assert str(exc.value).startswith("nftables: apply failed (exit status 1): ")
    assert "No such file or directory" in exc.value.stderr
    assert nft.current("bridge", netns=netns) == before
    with pytest.raises(nft.NftError) as exc:
        nft.check(bad, netns=netns)
    assert exc.value.action == "check" and exc.value.returncode == 1


def test_current_refuses_other_families_and_bad_namespace_names() -> None:
    with pytest.raises(nft.RulesetInputError) as exc:
        nft.current("ip")
    assert str(exc.value) == "family 'ip': popek tables are 'bridge' or 'inet'"
    with pytest.raises(nft.RulesetInputError, match="network namespace name 'a b'"):
        nft.remove_all(netns="a b")


def test_nft_error_message_forms() -> None:
    assert str(nft.NftError("apply", None, "")) == (
        "nftables: apply failed (could not run): no message")
    assert str(nft.NftError("remove", 2, " boom\n")) == (
        "nftables: remove failed (exit status 2): boom")


# -- record validation: exact refusals ------------------------------------------------

IFNAME_RULE = "is not a valid interface name: 1 to 15 characters from A-Z a-z 0-9 _ . -"


def _net(name: str = "a", third: int = 77, **kw: Any) -> Network:
    args: dict[str, Any] = {"name": name, "subnet": f"10.{third}.0.0/24",
                            "gateway": f"10.{third}.0.1", "bridge": f"pk-{name}", **kw}
    return Network(**args)


def _port(n: int = 1, network: str = "a", third: int = 77, **kw: Any) -> Port:
    args: dict[str, Any] = {"network": network, "instance": f"default/vm{n}", "kind": "tap",
                            "host_ifname": f"pt-{network}{n}",
                            "mac": f"52:54:00:00:{third:02x}:{n:02x}",
                            "ipv4": f"10.{third}.0.{n + 1}", **kw}
    return Port(**args)


@dataclass
class _UplinkNet(Network):
    uplink: Any = ""


def _refused(nets: list[Network], ports: list[Port]) -> str:
    with pytest.raises(nft.RulesetInputError) as exc:
        nft.build_ruleset(nets, ports)
    return str(exc.value)


def test_network_refusals_exactly() -> None:
    assert _refused([_net(), _net()], []) == "network 'a' is given twice"
    assert _refused([_net(bridge="bad name")], []) == (
        f"network a: bridge 'bad name' {IFNAME_RULE}")
    assert _refused([_net(subnet="10.77.0.5/24")], []).startswith(
        "network a: subnet/gateway are not IPv4 (10.77.0.5/24 has host bits set); expected "
        "e.g. subnet '10.77.0.0/24' and gateway '10.77.0.1'")
    assert _refused([_net(ipv6_subnet="fd42:77::1/64")], []).startswith(
        "network a: ipv6_subnet 'fd42:77::1/64' is not an IPv6 network")
    assert _refused([_UplinkNet(**vars(_net()), uplink="bad name")], []) == (
        f"network a: uplink 'bad name' {IFNAME_RULE}")


def test_uplink_that_is_not_a_string_is_no_uplink() -> None:
    plain = nft.build_ruleset([_net()], [_port()])
    assert nft.build_ruleset([_UplinkNet(**vars(_net()), uplink=5)], [_port()]) == plain


def test_port_refusals_exactly() -> None:
    assert _refused([_net()], [_port(host_ifname="bad name")]) == (
        f"port host_ifname 'bad name' {IFNAME_RULE}")
    assert _refused([], [_port()]) == (
        "port pt-a1: network 'a' is not among the networks given (none)")
    assert _refused([_net("a"), _net("b", 78)], [_port(network="c")]) == (
        "port pt-c1: network 'c' is not among the networks given (a, b)")
    assert _refused([_net()], [_port(mac="52:54:00")]) == (
        "port pt-a1: mac '52:54:00' is not a MAC address (six hex pairs separated by colons)")
    assert _refused([_net()], [_port(mac="00:00:00:00:00:00")]) == (
        "port pt-a1: mac 00:00:00:00:00:00 is multicast or zero; a port needs a unicast MAC")
    assert _refused([_net()], [_port(ipv6=["zz"])]) == (
        "port pt-a1: ipv6 'zz' is not an IPv6 address")
    assert _refused([_net()], [_port(ipv6=["::1"])]) == (
        "port pt-a1: ipv6 ::1 cannot be a source address (multicast, unspecified or loopback)")


def test_a_mac_starting_with_a_hex_letter_is_accepted() -> None:
    nft.build_ruleset([_net()], [_port(mac="A2:00:00:00:00:01")])


def test_nd_option_encoding() -> None:
    """Link-layer address options (RFC 4861): type, length 1 (8 octets), then the MAC."""
    mac = nft._mac_int("a2:54:00:00:00:01")
    assert mac == 0xA25400000001
    assert nft._lla(2, mac) == 0x0201A25400000001
    assert nft._lla(1, mac) == 0x0101A25400000001
    assert nft._hex(0xAB, 16) == "0x00ab"
    assert nft._hex(1, 128) == "0x" + "0" * 31 + "1"


def test_table_name_of_another_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path))
    digest = hashlib.sha256(str(tmp_path.resolve()).encode()).hexdigest()[:8]
    assert nft.table_name() == f"popek-{digest}"


def test_failures_in_a_missing_namespace_name_the_action() -> None:
    ghost = f"nfm-ghost-{uuid.uuid4().hex[:6]}"  # a valid name, but no such namespace
    for action, call in (("remove", lambda: nft.remove_all(netns=ghost)),
                         ("apply", lambda: nft.apply(nft.build_ruleset(*small()), netns=ghost)),
                         ("check", lambda: nft.check(nft.build_ruleset(*small()), netns=ghost))):
        with pytest.raises(nft.NftError) as exc:
            call()
        assert exc.value.action == action
        assert exc.value.returncode not in (None, 0)
        assert str(exc.value).startswith(
            f"nftables: {action} failed (exit status {exc.value.returncode}): ")
        assert ghost in exc.value.stderr
