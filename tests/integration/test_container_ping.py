"""``ping`` in a system container: an ICMP datagram socket, without CAP_NET_RAW.

A container has no CAP_NET_RAW (docs/CONTAINERS.md), so a ping that needs a
raw socket cannot work in it.  Linux lets a process open an ICMP *datagram*
socket instead when its group is in ``net.ipv4.ping_group_range``, a sysctl
of the network namespace: popek sets it to the container's whole gid range in
the OCI spec (``linux.sysctl``), and the debian image carries iputils' ping,
which uses such a socket when it cannot open a raw one.  (busybox 1.35's
ping, the minimal image's, only knows raw sockets.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import popek

NET, CT, CONTROL = "pingnet", "pinger", "pinger-nosysctl"
GATEWAY = "10.213.9.1"
CAP_NET_RAW = 13


@pytest.fixture(scope="module")
def debian_image(popek_home: Path) -> str:
    popek("image", "build", "debian", timeout=1800)
    return "debian"


@pytest.fixture(scope="module")
def pinger(debian_image: str) -> Iterator[str]:
    popek("network", "create", NET, "--subnet", "10.213.9.0/24")
    try:
        popek("launch", debian_image, CT, "--container", "--network", NET)
        yield CT
    finally:
        popek("delete", "--force", CT, check=False)
        popek("network", "delete", "--force", NET, check=False)


#: ``popek launch`` in this process with the spec's ``linux.sysctl`` left out (the
#: kernel's default ping_group_range, "1 0": nobody); every other control unchanged
NO_SYSCTL = (
    "import sys\n"
    "from popek.engines.container import spec\n"
    "build = spec.build_spec\n"
    "def without(**kw):\n"
    "    out = build(**kw)\n"
    "    del out['linux']['sysctl']\n"
    "    return out\n"
    "spec.build_spec = without\n"
    "from popek.engines.container import engine\n"
    "engine.build_spec = without\n"
    "from popek.cli.entry import main\n"
    "main(sys.argv[1:])\n")


@pytest.fixture(scope="module")
def control(pinger: str, debian_image: str) -> Iterator[str]:
    """A container like ``pinger`` without the sysctl: the control off."""
    env = {**os.environ, "POPEK_CLI_SERVER": "off"}
    proc = subprocess.run([sys.executable, "-c", NO_SYSCTL, "launch", debian_image, CONTROL,
                           "--container", "--network", NET], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
    try:
        assert proc.returncode == 0, proc.stderr
        yield CONTROL
    finally:
        popek("delete", "--force", CONTROL, check=False)


def sh(name: str, script: str) -> subprocess.CompletedProcess[str]:
    return popek("exec", name, "--", "sh", "-c", script, check=False)


def test_ping_the_gateway_without_cap_net_raw(pinger: str, control: str) -> None:
    status = dict(line.split(":", 1) for line in
                  sh(pinger, "cat /proc/self/status").stdout.splitlines() if ":" in line)
    assert not int(status["CapEff"], 16) & (1 << CAP_NET_RAW)
    assert not int(status["CapBnd"], 16) & (1 << CAP_NET_RAW)
    # the namespace's sysctl, as the container sees it: its whole gid range
    assert sh(pinger, "cat /proc/sys/net/ipv4/ping_group_range").stdout.split() == ["0", "65535"]
    # a raw socket is refused (busybox's ping knows only that one) ...
    raw = sh(pinger, f"busybox ping -c 1 -W 5 {GATEWAY}")
    assert raw.returncode != 0 and "permission denied" in raw.stderr, raw
    # ... and ping through a datagram socket reaches the gateway (the bridge on the host)
    res = sh(pinger, f"ping -c 1 -W 5 {GATEWAY}")
    assert res.returncode == 0, res
    assert "1 packets transmitted, 1 received" in res.stdout
    # the control: the same container without the sysctl cannot open the socket
    # the kernel's default "1 0" (host gids, unmapped here: shown as the overflow gid)
    assert sh(control, "cat /proc/sys/net/ipv4/ping_group_range").stdout.split() == [
        "65534", "65534"]
    off = sh(control, f"ping -c 1 -W 5 {GATEWAY}")
    assert off.returncode != 0 and "Operation not permitted" in off.stderr, off
