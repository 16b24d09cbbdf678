"""Instances on popek networks through the real CLI: launch --network, live attach/detach."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from framework import popek, popek_json, tcp_reach, wait_for
from popek.errors import EngineError, PopekError

NET, NET2 = "lan", "lan2"
VM, CT = "netvm", "netct"


def sh(name: str, script: str) -> subprocess.CompletedProcess[str]:
    return popek("exec", name, "--", "sh", "-c", script, check=False)


def _addrs(name: str) -> str:
    return sh(name, "ip -4 addr").stdout


def _eventually(check: Callable[[], bool], timeout: float = 30) -> bool:
    """Whether the state ``check`` looks at comes about within ``timeout`` s."""
    try:
        wait_for(check, timeout, "the state")
    except AssertionError:
        return False
    return True


def _listening(name: str, port: int) -> bool:
    """Whether a TCP socket listens on ``port`` in instance ``name`` (/proc/net/tcp, tcp6)."""
    table = sh(name, "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null").stdout
    return any(len(f) > 3 and f[1].endswith(f":{port:04X}") and f[3] == "0A"  # LISTEN
               for f in (line.split() for line in table.splitlines()))


@pytest.fixture(scope="module")
def lab(minimal_image: str) -> Iterator[dict[str, str]]:
    popek("network", "create", NET, "--subnet", "10.213.7.0/24")
    popek("network", "create", NET2)
    try:
        popek("launch", minimal_image, VM, "--memory", "192MiB", "--network", NET)
        popek("launch", minimal_image, CT, "--container", "--network", f"{NET}=10.213.7.50")
        yield {"gateway": "10.213.7.1"}
    finally:
        for name in (VM, CT):
            popek("delete", "--force", name, check=False)
        for net in (NET, NET2):
            popek("network", "delete", "--force", net, check=False)


def test_ports_are_recorded_and_shown(lab: dict[str, str]) -> None:
    ct_ports = popek_json("info", CT)["ports"]
    assert [(p["network"], p["ipv4"], p["kind"]) for p in ct_ports] == [
        (NET, "10.213.7.50", "veth")]
    vm_port = popek_json("info", VM)["ports"][0]
    assert vm_port["kind"] == "tap" and vm_port["mac"].startswith("52:54:00:")
    assert _eventually(lambda: vm_port["ipv4"] in _addrs(VM))  # by DHCP from dnsmasq
    assert "10.213.7.50/24" in _addrs(CT)  # configured by popek in the netns


def test_vm_and_container_talk_and_reach_the_gateway(lab: dict[str, str]) -> None:
    vm_ip = popek_json("info", VM)["ports"][0]["ipv4"]
    assert sh(VM, "ping -c 2 -W 2 10.213.7.50").returncode == 0
    sh(VM, "nc -l -p 7000 > /tmp/got 2>/dev/null </dev/null &")
    wait_for(lambda: _listening(VM, 7000), 30, "nc to listen in the VM")
    sh(CT, f"echo hello-from-container | nc -w 3 {vm_ip} 7000")
    assert _eventually(lambda: "hello-from-container" in sh(VM, "cat /tmp/got").stdout, 10)
    assert tcp_reach(CT, lab["gateway"], 53)  # DNS on the gateway


def test_container_cannot_change_its_own_address(lab: dict[str, str]) -> None:
    proc = sh(CT, "ip addr add 10.213.7.99/24 dev eth0 || "
                  "ip link set eth0 address 02:00:00:00:00:09")
    assert proc.returncode != 0  # no CAP_NET_ADMIN in the container


def test_live_attach_and_detach(lab: dict[str, str]) -> None:
    for name in (VM, CT):
        popek("network", "attach", NET2, name)
        ip = next(p["ipv4"] for p in popek_json("info", name)["ports"] if p["network"] == NET2)
        assert _eventually(lambda name=name, ip=ip: ip in _addrs(name)), _addrs(name)
        gw = popek_json("network", "info", NET2)["gateway"]
        assert tcp_reach(name, gw, 53)
        popek("network", "detach", NET2, name)
        assert ip not in _addrs(name)
        assert [p["network"] for p in popek_json("info", name)["ports"]] == [NET]
    assert popek_json("network", "info", NET2)["ports"] == []


def _nics(workdir: str) -> set[str]:
    """The NICs QEMU holds for the VM in ``workdir`` right now (asked over QMP)."""
    from popek.engines.qemu import qmp
    from popek.engines.qemu.cmdline import Paths

    found = qmp.execute(Paths(Path(workdir)).qmp, "qom-list", {"path": "/machine/peripheral"})
    return {p["name"] for p in found if p["name"].startswith("nic-")}


def test_a_live_attach_failing_at_shaping_unplugs_and_the_next_attach_works(
        lab: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The review's case: the NIC stayed in QEMU with its port gone, the next one was lost."""
    from popek.core import netglue
    from popek.core.instances import Instances

    workdir = popek_json("info", VM)["workdir"]
    before = _nics(workdir)
    plugged: list[set[str]] = []

    def shaping_fails(*_args: object) -> None:  # the step after the hot-plug
        plugged.append(_nics(workdir))
        raise EngineError("injected: tc refused the limit")

    monkeypatch.setattr(netglue.InstanceNetworks, "shape", shaping_fails)
    with pytest.raises(EngineError, match="injected"):
        Instances().attach(VM, NET2)
    monkeypatch.undo()
    assert len(plugged) == 1 and len(plugged[0] - before) == 1  # it was really plugged
    assert _nics(workdir) == before  # and is gone again, with its port
    assert [p["network"] for p in popek_json("info", VM)["ports"]] == [NET]
    popek("network", "attach", NET2, VM)
    try:
        port = next(p for p in popek_json("info", VM)["ports"] if p["network"] == NET2)
        assert _eventually(lambda: port["mac"] in sh(VM, "ip -o link").stdout), \
            sh(VM, "ip -o link").stdout  # the guest sees the new NIC
        assert _eventually(lambda: port["ipv4"] in _addrs(VM)), _addrs(VM)
    finally:
        popek("network", "detach", NET2, VM)


@pytest.mark.parametrize("when", ["before the port", "before the plug"])
def test_an_attach_racing_a_delete_fails_in_one_clean_line(
        lab: dict[str, str], minimal_image: str, monkeypatch: pytest.MonkeyPatch,
        when: str) -> None:
    """The delete wins the race: one clear EngineError, no FileNotFoundError, no port left."""
    from popek.core.instances import Instances
    from popek.engines.container.engine import ContainerEngine
    from popek.network.service import Networks

    racer = "racer"
    popek("launch", minimal_image, racer, "--container", "--memory", "64MiB")
    cls, method = (Networks, "create_port") if when == "before the port" else (
        ContainerEngine, "attach_port")
    real = getattr(cls, method)
    raced: list[int] = []

    def deleted_first(self: Any, *args: Any, **kwargs: Any) -> Any:
        popek("delete", "--force", racer)  # another command: the container and its ports go
        raced.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, deleted_first)
    try:
        with pytest.raises(PopekError) as exc:
            Instances().attach(racer, NET2)
    finally:
        monkeypatch.undo()
        popek("delete", "--force", racer, check=False)
    assert raced == [1]  # the race was run
    assert type(exc.value) is EngineError, repr(exc.value)
    assert "is gone (stopped or deleted meanwhile)" in str(exc.value)
    assert racer not in [i["name"] for i in popek_json("list")]
    assert popek_json("network", "info", NET2)["ports"] == []


def test_container_keeps_its_address_across_restart(lab: dict[str, str]) -> None:
    popek("restart", CT)
    assert "10.213.7.50/24" in _addrs(CT)
    assert tcp_reach(CT, lab["gateway"], 53)


def test_bad_network_input_changes_nothing(lab: dict[str, str], minimal_image: str) -> None:
    proc = popek("launch", minimal_image, "nonet", "--container", "--network", "missing",
                 check=False)
    assert proc.returncode != 0 and "missing" in proc.stderr
    assert "nonet" not in [e["name"] for e in popek_json("list")]
    taken = popek("launch", minimal_image, "dupip", "--container", "--network",
                  f"{NET}=10.213.7.50", check=False)
    assert taken.returncode != 0 and "10.213.7.50" in taken.stderr
    assert "dupip" not in [e["name"] for e in popek_json("list")]
    again = popek("network", "attach", NET, CT, check=False)
    assert again.returncode != 0 and "already attached" in again.stderr
    busy = popek("network", "delete", NET, check=False)
    assert busy.returncode != 0
    assert len(popek_json("network", "info", NET)["ports"]) == 2


def test_delete_releases_port_and_lease(lab: dict[str, str], minimal_image: str) -> None:
    popek("delete", "--force", CT)
    info = popek_json("network", "info", NET)
    assert "10.213.7.50" not in info["leases"]
    assert all(not p["instance"].endswith("/" + CT) for p in info["ports"])
