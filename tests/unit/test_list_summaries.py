"""What ``popek list`` shows of each instance, its ports included, without the network service.

The instance core over a fake engine and a fake network host (see
test_core_instances): the summaries carry each instance's ports, read from
the store in one range for all instances; the network service is never built.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from popek.cli import ops, output
from popek.state.schema import PORTS_PREFIX
from popek.state.store import KeyValue, SQLiteStore
from unit.test_core_instances import Env, launch


class PortReads(SQLiteStore):
    """A store that counts the reads of the whole port range."""

    port_reads = 0

    def range(self, prefix: str) -> list[KeyValue]:
        if prefix == PORTS_PREFIX:
            self.port_reads += 1
        return super().range(prefix)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    e = Env(tmp_path)
    yield e
    e.store.close()


def test_summaries_carry_each_instances_ports_from_one_read(env: Env) -> None:
    nets = env.networks(env.store)
    nets.create("lan", "10.99.0.0/24")
    nets.create("dmz", "10.98.0.0/24")
    launch(env, "a", networks=["lan", "dmz=10.98.0.9"])
    launch(env, "b")
    launch(env, "c", networks=["lan"])
    env.store = PortReads(env.store.path)
    env.net_builds = 0
    summaries = {s["name"]: s for s in env.instances().summaries()}
    assert env.store.port_reads == 1 and env.net_builds == 0
    assert sorted(p["network"] for p in summaries["a"]["ports"]) == ["dmz", "lan"]
    by_net = {p["network"]: p for p in summaries["a"]["ports"]}
    assert by_net["dmz"]["ipv4"] == "10.98.0.9" and by_net["lan"]["ipv4"].startswith("10.99.0.")
    assert summaries["b"]["ports"] == []
    assert summaries["a"]["state"] == "running" and summaries["a"]["memory"] == 128 << 20
    info = env.instances().info("a")
    assert sorted(info["ports"], key=str) == sorted(summaries["a"]["ports"], key=str)
    ipv4 = output.choose(ops.INSTANCE_COLUMNS, "4", "popek list")[0]
    assert sorted(str(ipv4.cell(summaries["a"])).split(",")) == sorted(
        p["ipv4"] for p in summaries["a"]["ports"])
    assert ipv4.cell(summaries["b"]) == ""
