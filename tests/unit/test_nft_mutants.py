"""nft's loading and removal against the kernel (popek.network.nft), as root.

Written against the survivors of ``make mutants`` (bench/mutants.py), which
found remove_all reached by no unit test and apply/check/current only on
their good paths.  Each test works in a network namespace of its own, so the
host's rules are never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from popek.network import nft
from unit.test_nft import small

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None,
                                reason="loading rules needs root and nftables")


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"nfm-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


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
