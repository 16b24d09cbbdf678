"""A flood of refused credentials is summed up in the audit log, not written line by line.

Before the budget every refused token wrote a record: a client looping bad
tokens grew the log by about 500 bytes a request until the disk was full.
The clock is a fake (the window is a minute); the audit log and the store
are real.  No root.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from popek.core import authn
from popek.core.auth import TokenRejected
from popek.core.refusals import BURST, SUMMARY_OP, RefusalBudget, source_of
from popek.core.service import Core
from popek.state.store import SQLiteStore


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(authn, "REFUSALS", RefusalBudget(clock=c))
    return c


@pytest.fixture
def core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Core]:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    store = SQLiteStore(tmp_path / "home" / "state.db")
    yield Core(store)
    store.close()


def refuse(core: Core, client: str, n: int) -> None:
    for i in range(n):
        with pytest.raises(TokenRejected):
            authn.authenticate(core, f"pk1.nosuch{i}.secret", None, "GET /1.0/instances", client)


def refused_records(core: Core) -> list[dict[str, object]]:
    return [r for r in core.audit.records() if str(r["op"]).startswith("auth.")]


def test_a_flood_gets_its_burst_then_one_summary(core: Core, clock: Clock) -> None:
    refuse(core, "192.0.2.7:40000", BURST + 30)
    recs = refused_records(core)
    assert len(recs) == BURST  # before the budget: BURST + 30
    assert all(r["op"] == "auth.token" for r in recs)
    clock.t += 61  # the window is over: the next refusal (any client's) writes the summary
    refuse(core, "198.51.100.1:5000", 1)
    recs = refused_records(core)
    summary = [r for r in recs if r["op"] == SUMMARY_OP]
    assert len(summary) == 1 and summary[0]["target"] == "192.0.2.7"
    assert str(summary[0]["result"]).startswith("denied: 30 more refused credential(s) from "
                                                "192.0.2.7 between ")
    assert recs[-1]["op"] == "auth.token" and "198.51.100.1" in str(recs[-1]["change"])
    assert core.audit.verify() == []


def test_each_address_has_its_own_budget_and_ports_share_one(core: Core, clock: Clock) -> None:
    refuse(core, "192.0.2.7:1", BURST)
    refuse(core, "192.0.2.7:2", 5)  # another connection of the same client: over budget
    refuse(core, "192.0.2.8:1", 3)
    targets = [json.dumps(r["change"]) for r in refused_records(core)]
    assert len(targets) == BURST + 3
    assert sum("192.0.2.8" in t for t in targets) == 3


def test_a_new_window_gives_a_new_burst(core: Core, clock: Clock) -> None:
    refuse(core, "[2001:db8::1]:443", BURST + 1)
    clock.t += 60
    refuse(core, "[2001:db8::1]:443", BURST)
    recs = refused_records(core)
    assert [r["op"] for r in recs].count("auth.token") == 2 * BURST
    assert [r["target"] for r in recs if r["op"] == SUMMARY_OP] == ["2001:db8::1"]


def test_what_is_only_counted_is_written_when_the_server_stops(core: Core,
                                                               clock: Clock) -> None:
    refuse(core, "192.0.2.9:1", BURST + 2)
    authn.write_summaries(core, authn.REFUSALS.flush())
    summary = [r for r in refused_records(core) if r["op"] == SUMMARY_OP]
    assert [(r["target"], str(r["result"]).split(" from ")[0]) for r in summary] == [
        ("192.0.2.9", "denied: 2 more refused credential(s)")]
    assert authn.REFUSALS.flush() == []  # nothing twice


@pytest.mark.parametrize("client, source", [
    ("192.0.2.7:40000", "192.0.2.7"), ("[2001:db8::1]:443", "2001:db8::1"),
    ("2001:db8::1:443", "2001:db8::1"), ("", "?")])
def test_the_source_is_the_address_without_its_port(client: str, source: str) -> None:
    assert source_of(client) == source
