"""How popek.network.nft runs ``nft`` and reports its failures, and what the kernel
keeps of a loaded rule set.

Written against survivors of ``make mutants`` (bench/mutants.py) that the frame
tests (test_nft_effect*.py) cannot reach: a missing or hanging ``nft`` binary,
``nft`` failing or printing something that is not JSON, where ``nft`` is looked
for, the hook priorities the kernel registers, and long comments.

The first tests swap the ``nft`` binary for a small script (or a path that does
not exist) and need no privilege: nothing of the host's is touched (a private
``POPEK_HOME`` names the tables, and the batches sent are empty or only remove
tables of that name).  The others load rules into a network namespace of their
own and run as root only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from popek.network import nft
from popek.network.model import Network, Port
from unit.nftlab import fresh_netns
from unit.test_nft import small

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None,
                                reason="loading rules needs root and nftables")


@pytest.fixture
def private_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A POPEK_HOME of the test's own: the table name is ``popek-<hash>``, no host's."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("POPEK_HOME", str(home))
    return nft.table_name()


def _use_nft(monkeypatch: pytest.MonkeyPatch, path: str | None) -> None:
    """Make ``shutil.which('nft')`` answer ``path`` (and nothing for any other name)."""
    def which(name: str, *args: Any, **kwargs: Any) -> str | None:
        return path if name == "nft" else None

    monkeypatch.setattr(shutil, "which", which)


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-nft"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


# Each public call with the action name it reports; the batches are harmless on the
# host should a real nft ever run (empty, or removing tables of a private home).
CALLS: list[tuple[str, Callable[[], object]]] = [
    ("apply", lambda: nft.apply([])),
    ("check", lambda: nft.check([])),
    ("list", lambda: nft.current("inet")),
    ("remove", lambda: nft.remove_all()),
]


@pytest.mark.parametrize(("action", "call"), CALLS, ids=[a for a, _ in CALLS])
def test_missing_nft_binary_is_reported_with_the_action(
        monkeypatch: pytest.MonkeyPatch, private_home: str, action: str,
        call: Callable[[], object]) -> None:
    """The nft that PATH names is the one run; when it cannot be executed, NftError says
    which action could not run and that the nftables package is missing."""
    ghost = f"/nonexistent-{uuid.uuid4().hex[:8]}/nft"
    _use_nft(monkeypatch, ghost)
    with pytest.raises(nft.NftError) as exc:
        call()
    assert exc.value.action == action
    assert exc.value.returncode is None
    assert exc.value.stderr == f"{ghost} not found; install the nftables package"
    assert str(exc.value) == (f"nftables: {action} failed (could not run): "
                              f"{ghost} not found; install the nftables package")


def test_hanging_nft_times_out(monkeypatch: pytest.MonkeyPatch, private_home: str,
                               tmp_path: Path) -> None:
    """An nft that does not finish within NFT_TIMEOUT is killed and reported as failed."""
    _use_nft(monkeypatch, _script(tmp_path, "exec sleep 5"))
    monkeypatch.setattr(nft, "NFT_TIMEOUT", 1.0)
    with pytest.raises(nft.NftError) as exc:
        nft.apply([])
    assert (exc.value.action, exc.value.returncode) == ("apply", None)
    assert exc.value.stderr == "timed out after 1 s"
    assert str(exc.value) == "nftables: apply failed (could not run): timed out after 1 s"


def test_current_reports_nft_failure_with_status_and_message(
        monkeypatch: pytest.MonkeyPatch, private_home: str, tmp_path: Path) -> None:
    """nft failing for another reason than a missing table is an NftError naming the
    table, with nft's exit status and message."""
    _use_nft(monkeypatch, _script(tmp_path, "echo 'Error: Could not process rule' >&2\n"
                                            "exit 2"))
    with pytest.raises(nft.NftError) as exc:
        nft.current("bridge")
    assert exc.value.action == f"list table bridge {private_home}"
    assert exc.value.returncode == 2
    assert exc.value.stderr == "Error: Could not process rule\n"
    assert str(exc.value) == (f"nftables: list table bridge {private_home} failed "
                              "(exit status 2): Error: Could not process rule")


def test_current_refuses_output_that_is_not_json(
        monkeypatch: pytest.MonkeyPatch, private_home: str, tmp_path: Path) -> None:
    """An nft that succeeds but prints text instead of JSON is an NftError too."""
    _use_nft(monkeypatch, _script(tmp_path, "echo 'table inet popek {'"))
    with pytest.raises(nft.NftError) as exc:
        nft.current("inet")
    assert exc.value.action == f"list table inet {private_home}"
    assert exc.value.returncode == 0
    assert exc.value.stderr.startswith("output is not JSON: Expecting value: line 1")
    assert str(exc.value).startswith(f"nftables: list table inet {private_home} failed "
                                     "(exit status 0): output is not JSON: ")


@dataclass
class _UplinkNet(Network):
    uplink: Any = ""


def test_non_string_uplink_of_a_nat_network_is_no_uplink() -> None:
    """An ``uplink`` that is not a string (a damaged record) is ignored: the NAT network
    gets the rules of one without uplink (leave by any interface that is no bridge)."""
    plain = Network(name="a", subnet="10.92.0.0/24", gateway="10.92.0.1", bridge="pk-a",
                    nat=True)
    ports = [Port(network="a", instance="default/i1", kind="tap", host_ifname="pt-a1",
                  mac="52:54:00:00:92:01", ipv4="10.92.0.2")]
    odd = _UplinkNet(**vars(plain), uplink=5)
    assert nft.build_ruleset([odd], ports) == nft.build_ruleset([plain], ports)


# --------------------------------------------------------------------------- real nft


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace; its name has capitals (ip accepts them)."""
    with fresh_netns("nfA") as name:
        yield name


def _chains(netns: str, family: str) -> dict[str, dict[str, Any]]:
    return {c["chain"]["name"]: c["chain"]
            for c in nft.current(family, netns=netns)["nftables"] if "chain" in c}


@needs_root
def test_rules_load_in_a_namespace_with_capitals_and_current_lists_the_bridge_table(
        netns: str) -> None:
    """Namespace names may have capitals; current() without a family reads the bridge
    table."""
    nft.apply(nft.build_ruleset(*small()), netns=netns)
    listed = nft.current(netns=netns)["nftables"]
    tables = [i["table"] for i in listed if "table" in i]
    assert [(t["family"], t["name"]) for t in tables] == [("bridge", nft.table_name())]
    assert "port-pkta1" in _chains(netns, "bridge")


@needs_root
@pytest.mark.skipif(not os.access("/usr/sbin/nft", os.X_OK), reason="no /usr/sbin/nft")
def test_nft_outside_path_is_found_in_sbin(monkeypatch: pytest.MonkeyPatch,
                                           netns: str) -> None:
    """With no nft on PATH (a user's PATH lacks /usr/sbin), /usr/sbin/nft is run."""
    _use_nft(monkeypatch, None)
    nft.apply(nft.build_ruleset(*small()), netns=netns)
    assert "port-pkta1" in _chains(netns, "bridge")


@needs_root
def test_base_chains_hook_at_the_standard_priorities(netns: str) -> None:
    """As the kernel has them: bridge filter (-200) for port security, inet filter (0)
    for isolation and srcnat (100) for masquerading, each with policy accept."""
    nft.apply(nft.build_ruleset(*small()), netns=netns)
    bridge, inet = _chains(netns, "bridge"), _chains(netns, "inet")
    for hook in ("prerouting", "input", "forward", "output"):
        assert (bridge[hook]["type"], bridge[hook]["hook"], bridge[hook]["prio"],
                bridge[hook]["policy"]) == ("filter", hook, -200, "accept")
    for hook in ("forward", "input"):
        assert (inet[hook]["type"], inet[hook]["hook"], inet[hook]["prio"],
                inet[hook]["policy"]) == ("filter", hook, 0, "accept")
    assert (inet["postrouting"]["type"], inet["postrouting"]["hook"],
            inet["postrouting"]["prio"], inet["postrouting"]["policy"]) == (
        "nat", "postrouting", 100, "accept")


@needs_root
def test_long_network_name_loads_and_the_listing_reads_back(netns: str) -> None:
    """A network name is not length-bounded: the NAT rules' comments are cut to the 128
    characters nft's own parser accepts, so ``nft list`` output (a saved rule set) can
    be loaded again."""
    name = "n" * 300
    nets = [Network(name=name, subnet="10.91.0.0/24", gateway="10.91.0.1", bridge="pk-long",
                    nat=True, ipv6_subnet="fd42:91::/64")]
    ports = [Port(network=name, instance="default/i1", kind="tap", host_ifname="pt-long1",
                  mac="52:54:00:00:91:01", ipv4="10.91.0.2")]
    nft.apply(nft.build_ruleset(nets, ports), netns=netns)
    comments = {r["rule"].get("comment") for r in nft.current("inet", netns=netns)["nftables"]
                if "rule" in r and r["rule"]["chain"] == "postrouting"}
    assert comments == {("nat-" + name)[:128], ("nat6-" + name)[:128]}
    listing = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "ruleset"],
                             capture_output=True, text=True, check=True).stdout
    reread = subprocess.run(["ip", "netns", "exec", netns, "nft", "-c", "-f", "-"],
                            input="flush ruleset\n" + listing, capture_output=True,
                            text=True, check=False)
    assert reread.returncode == 0, reread.stderr
