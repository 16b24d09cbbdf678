"""The nftables rule set generated from network/port records (popek.network.nft).

Structure tests run anywhere; the ``nft -c`` (check mode: the kernel validates
the batch, nothing is committed) tests need root and the nft binary.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popek.errors import InvalidInput, PopekError
from popek.network import nft
from popek.network.model import Network, Port

needs_nft = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None,
                               reason="nft -c needs root and nftables")


def net(name: str = "a", third: int = 77, **kw: Any) -> Network:
    return Network(name=name, subnet=f"10.{third}.0.0/24", gateway=f"10.{third}.0.1",
                   bridge=f"pk-{name}", **kw)


def port(i: int, network: str = "a", third: int = 77, **kw: Any) -> Port:
    return Port(network=network, instance=f"default/i{i}", kind="tap",
                host_ifname=f"pkt{network}{i}", mac=f"52:54:00:00:{third:02x}:{i:02x}",
                ipv4=f"10.{third}.0.{i + 10}", **kw)


def cmds(ruleset: list[dict[str, Any]], verb: str, kind: str,
         family: str | None = None) -> list[dict[str, Any]]:
    out = [c[verb][kind] for c in ruleset if verb in c and kind in c[verb]]
    return [o for o in out if family is None or o["family"] == family]


def rules(ruleset: list[dict[str, Any]], family: str, chain: str) -> list[dict[str, Any]]:
    return [r for r in cmds(ruleset, "add", "rule", family) if r["chain"] == chain]


def small() -> tuple[list[Network], list[Port]]:
    nets = [net("a"), net("b", 78, nat=True, port_isolation=True, ipv6_subnet="fd42:78::/64")]
    ports = [port(1, ipv6=["fe80::5054:ff:fe00:4d01"]), port(2),
             port(1, "b", 78, ipv6=["fd42:78::11"]), port(2, "b", 78)]
    return nets, ports


# -- structure -------------------------------------------------------------------------------


def test_replaces_only_popeks_tables_in_one_batch() -> None:
    rs = nft.build_ruleset(*small())
    assert "metainfo" in rs[0]
    for family in ("bridge", "inet"):
        verbs = [next(iter(c)) for c in rs if "table" in next(iter(c.values()), {})
                 and c[next(iter(c))]["table"] == {"family": family, "name": nft.table_name()}]
        # add (so delete cannot fail) + delete + add, in that order
        assert verbs == ["add", "delete", "add"]
    names = {(o["family"], o.get("table", o.get("name")))
             for c in rs for o in c.values() if isinstance(o, dict)
             for o in o.values() if isinstance(o, dict) and "family" in o}
    assert names <= {("bridge", nft.table_name()), ("inet", nft.table_name())}


def test_every_port_has_its_chain_and_vmap_entry() -> None:
    nets, ports = small()
    rs = nft.build_ruleset(nets, ports)
    chains = {c["name"] for c in cmds(rs, "add", "chain", "bridge")}
    for p in ports:
        assert nft.port_chain(p.host_ifname) in chains
        first = rules(rs, "bridge", nft.port_chain(p.host_ifname))[0]["expr"][0]["match"]
        assert first == {"op": "!=", "left": {"payload": {"protocol": "ether", "field": "saddr"}},
                         "right": p.mac}
    (vmap,) = (m for m in cmds(rs, "add", "map", "bridge") if m["name"] == "port_chains")
    assert vmap["map"] == "verdict"
    assert {e[0]: e[1]["jump"]["target"] for e in vmap["elem"]} == {
        p.host_ifname: nft.port_chain(p.host_ifname) for p in ports}
    for hook in ("prerouting", "input"):
        assert {"vmap": {"key": {"meta": {"key": "iifname"}}, "data": "@port_chains"}} in [
            e for r in rules(rs, "bridge", hook) for e in r["expr"]]


def test_base_chains_hook_where_frames_pass() -> None:
    rs = nft.build_ruleset(*small())
    hooks = {c["name"]: c["hook"] for c in cmds(rs, "add", "chain", "bridge") if "hook" in c}
    assert hooks == {h: h for h in ("prerouting", "input", "forward", "output")}


def test_port_sets_hold_every_mac_and_ipv6() -> None:
    nets, ports = small()
    rs = nft.build_ruleset(nets, ports)
    sets = {s["name"]: s.get("elem", []) for s in cmds(rs, "add", "set", "bridge")}
    assert sorted(e["concat"][0] for e in sets["port_macs"]) == sorted(p.host_ifname
                                                                      for p in ports)
    assert {tuple(e["concat"]) for e in sets["port_ip6"]} == {
        ("pkta1", "fe80::5054:ff:fe00:4d01"), ("pktb1", "fd42:78::11")}


def test_isolation_variant() -> None:
    nets, ports = small()
    rs = nft.build_ruleset(nets, ports)
    (iso,) = (s for s in cmds(rs, "add", "set", "bridge") if s["name"] == "isolated_ports")
    assert sorted(iso["elem"]) == ["pktb1", "pktb2"]
    assert any(r.get("comment") == "port-isolation" for r in rules(rs, "bridge", "forward"))
    nets[1].port_isolation = False
    rs = nft.build_ruleset(nets, ports)
    (iso,) = (s for s in cmds(rs, "add", "set", "bridge") if s["name"] == "isolated_ports")
    assert "elem" not in iso


def test_nat_variant_masquerades_only_nat_networks() -> None:
    nets, ports = small()
    rs = nft.build_ruleset(nets, ports)
    post = rules(rs, "inet", "postrouting")
    assert [r["comment"] for r in post] == ["nat-b", "nat6-b"]
    assert post[0]["expr"][0]["match"]["right"] == {"prefix": {"addr": "10.78.0.0", "len": 24}}
    # out-of-network forwarding: only the NAT network may leave (to non-popek interfaces)
    assert len(rules(rs, "inet", "out-pk-a")) == 2
    assert len(rules(rs, "inet", "out-pk-b")) == 3
    for n in nets:
        n.nat = False
    rs = nft.build_ruleset(nets, ports)
    assert "postrouting" not in {c["name"] for c in cmds(rs, "add", "chain", "inet")}


def test_no_anonymous_sets_in_port_chains() -> None:
    """Thousands of anonymous sets make nft/kernel loading quadratic: none per port."""
    rs = nft.build_ruleset(*small())
    for r in cmds(rs, "add", "rule", "bridge"):
        if r["chain"].startswith(nft.PORT_CHAIN_PREFIX):
            assert '"set"' not in str(r).replace("'", '"'), r


def test_empty_records_give_empty_tables() -> None:
    rs = nft.build_ruleset([], [])
    assert cmds(rs, "add", "chain", "bridge")
    assert not [c for c in cmds(rs, "add", "chain", "bridge")
                if c["name"].startswith(nft.PORT_CHAIN_PREFIX)]


@pytest.mark.parametrize("change, needle", [
    (lambda n, p: p.__setattr__("network", "zz"), "not among the networks"),
    (lambda n, p: p.__setattr__("mac", "01:00:5e:00:00:01"), "multicast"),
    (lambda n, p: p.__setattr__("mac", "52:54:00:zz:00:01"), "not a MAC"),
    (lambda n, p: p.__setattr__("ipv4", "10.99.0.5"), "not a host address"),
    (lambda n, p: p.__setattr__("ipv4", "10.77.0.1"), "not a host address"),
    (lambda n, p: p.__setattr__("ipv4", "banana"), "not an IPv4"),
    (lambda n, p: p.__setattr__("ipv6", ["ff02::1"]), "cannot be a source"),
    (lambda n, p: p.__setattr__("host_ifname", "a" * 16), "not a valid interface name"),
    (lambda n, p: p.__setattr__("host_ifname", "pk-a"), "name of a bridge"),
    (lambda n, p: n.__setattr__("gateway", "10.1.1.1"), "outside subnet"),
    (lambda n, p: n.__setattr__("ipv6_subnet", "fd42::1/64"), "not an IPv6 network"),
])
def test_bad_records_are_refused(change: Any, needle: str) -> None:
    n, p = net("a"), port(1)
    change(n, p)
    with pytest.raises(nft.RulesetInputError, match=needle) as exc:
        nft.build_ruleset([n], [p])
    assert isinstance(exc.value, InvalidInput)


def test_duplicates_are_refused() -> None:
    with pytest.raises(nft.RulesetInputError, match="given twice"):
        nft.build_ruleset([net("a")], [port(1), port(1)])
    p2 = port(2)
    p2.ipv4 = port(1).ipv4
    with pytest.raises(nft.RulesetInputError, match="already leased"):
        nft.build_ruleset([net("a")], [port(1), p2])
    p2 = port(2)
    p2.mac = port(1).mac.upper()
    with pytest.raises(nft.RulesetInputError, match="already used"):
        nft.build_ruleset([net("a")], [port(1), p2])
    with pytest.raises(nft.RulesetInputError, match="used by another network"):
        b = net("b", 78)
        b.bridge = "pk-a"
        nft.build_ruleset([net("a"), b], [])


def test_port_without_lease_may_only_do_dhcp() -> None:
    p = port(1)
    p.ipv4 = ""
    rs = nft.build_ruleset([net("a")], [p])
    text = str(rules(rs, "bridge", nft.port_chain(p.host_ifname)))
    assert "10.77.0." not in text and "0.0.0.0" in text


def test_nft_error_carries_nft_message() -> None:
    err = nft.NftError("apply", 1, "Error: Could not process rule: No such file\n")
    assert isinstance(err, PopekError)
    assert "No such file" in str(err) and "exit status 1" in str(err)


# -- validity against the kernel (nft -c) ----------------------------------------------------


@needs_nft
def test_small_ruleset_passes_nft_check() -> None:
    nft.check(nft.build_ruleset(*small()))


@needs_nft
def test_broken_ruleset_is_reported_with_nft_message() -> None:
    rs = nft.build_ruleset(*small())
    rs.append({"add": {"rule": {"family": "bridge", "table": nft.table_name(), "chain": "nope",
                                "expr": [{"drop": None}]}}})
    with pytest.raises(nft.NftError, match="check failed"):
        nft.check(rs)


@st.composite
def records(draw: st.DrawFn) -> tuple[list[Network], list[Port]]:
    n_nets = draw(st.integers(1, 3))
    nets = [Network(name=f"n{i}", subnet=f"10.{100 + i}.0.0/16", gateway=f"10.{100 + i}.0.1",
                    bridge=f"pkbr{i}", nat=draw(st.booleans()),
                    port_isolation=draw(st.booleans()),
                    ipv6_subnet=draw(st.sampled_from(["", f"fd42:{i}::/64"])))
            for i in range(n_nets)]
    n_ports = draw(st.integers(0, 40))
    hosts = draw(st.lists(st.integers(2, 65000), min_size=n_ports, max_size=n_ports,
                          unique=True))
    ports = []
    for j, h in enumerate(hosts):
        ni = draw(st.integers(0, n_nets - 1))
        leased = draw(st.booleans()) or j % 3 != 0
        v6 = draw(st.lists(st.integers(1, 2**64 - 1), max_size=3, unique=True))
        ports.append(Port(
            network=f"n{ni}", instance=f"p/i{j}", kind=draw(st.sampled_from(["tap", "veth"])),
            host_ifname=draw(st.sampled_from(["pkt", "pk-v", "vm.", "x_"])) + str(j),
            mac="02:" + ":".join(
                f"{draw(st.integers(0, 255)) if k < 2 else (j >> (8 * (4 - k))) & 255:02x}"
                for k in range(5)),
            ipv4=str(ipaddress.IPv4Address(f"10.{100 + ni}.0.0") + h) if leased else "",
            ipv6=[str(ipaddress.IPv6Address(f"fe80::{x >> 48:x}:{(x >> 32) & 0xffff:x}:"
                                            f"{(x >> 16) & 0xffff:x}:{x & 0xffff:x}"))
                  for x in v6]))
    return nets, ports


@needs_nft
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records())
def test_random_port_sets_always_pass_nft_check(rec: tuple[list[Network], list[Port]]) -> None:
    nets, ports = rec
    rs = nft.build_ruleset(nets, ports)
    assert len(rules(rs, "bridge", "prerouting")) == 5
    chains = {c["name"] for c in cmds(rs, "add", "chain", "bridge")}
    assert {nft.port_chain(p.host_ifname) for p in ports} <= chains
    nft.check(rs)


def test_each_home_has_its_own_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POPEK_HOME", "/var/lib/popek")
    assert nft.table_name() == "popek"
    monkeypatch.setenv("POPEK_HOME", "/var/tmp/other-home")
    other = nft.table_name()
    assert other.startswith("popek-") and other != "popek"
    rs = nft.build_ruleset(*small())
    names = {(o["family"], o.get("table", o.get("name")))
             for c in rs for o in c.values() if isinstance(o, dict)
             for o in o.values() if isinstance(o, dict) and "family" in o}
    assert names == {("bridge", other), ("inet", other)}
