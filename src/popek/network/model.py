"""Records of virtual networks and their ports, as kept in the state store.

A :class:`Network` is one Linux bridge with one IPv4 subnet (the host holds
the gateway address on the bridge), DHCP/DNS by a dnsmasq of its own, and
optional NAT to the host's uplink.  A :class:`Port` is one instance's
attachment to a network: a tap device (VMs) or a veth pair (containers),
with the MAC and addresses the port is allowed to use.  Port security rules
are generated from these records alone (``network/nft.py``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from popek.names import DEFAULT_PROJECT
from popek.state.schema import lease_key, mac_key, network_key, port_key

__all__ = ["Network", "Port", "PortKind", "host_name", "lease_key", "mac_key", "network_key",
           "port_key"]


def host_name(project: str, name: str) -> str:
    """The host-wide name of network ``name`` of ``project``: ``name`` in ``default``,
    ``PROJECT.NAME`` in another (names have no dot, so two projects never collide).

    It keys the network's records (network, ports, leases), its directory and its
    dnsmasq domain (``PROJECT.NAME.popek``); bridges and subnets are unique on the
    host whatever the project."""
    return name if project == DEFAULT_PROJECT else f"{project}.{name}"

PortKind = Literal["tap", "veth"]


@dataclass
class Network:
    """One isolated virtual network, of one project.

    ``name`` is the host-wide name (:func:`host_name`); :attr:`short` is the name
    its project knows it by.  A record written before networks had projects has no
    ``project``: it reads as ``default``'s, under the same name (nothing to move).
    """

    name: str
    subnet: str            # e.g. "10.77.0.0/24"
    gateway: str           # first usable address, held by the host on the bridge
    bridge: str            # host bridge device name, e.g. "pk-<id>" (<= 15 chars)
    nat: bool = False
    port_isolation: bool = False
    ipv6_subnet: str = ""  # optional, e.g. "fd42:77::/64"
    created: str = ""
    state: str = "ready"   # "creating" / "ready" / "deleting" (intent before action)
    owner: str = ""        # "PID STARTTIME" of the popek process whose intent is in progress
    dnsmasq_pid: int = 0   # the network's dnsmasq, with its start time (popek.proc)
    dnsmasq_start: int = 0
    project: str = DEFAULT_PROJECT

    @property
    def short(self) -> str:
        """The name within its project (``popek network list --project P`` shows)."""
        prefix = f"{self.project}."
        if self.project != DEFAULT_PROJECT and self.name.startswith(prefix):
            return self.name[len(prefix):]
        return self.name

    def to_json(self) -> bytes:
        """Serialise for the store."""
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Network:
        """Read a record written by :meth:`to_json`."""
        d: dict[str, Any] = json.loads(data)
        return cls(**d)


@dataclass
class Port:
    """One instance's port on one network."""

    network: str           # network name
    instance: str          # "<project>/<name>"
    kind: PortKind
    host_ifname: str       # tap name, or host end of the veth pair (<= 15 chars)
    mac: str               # "52:54:00:xx:xx:xx" (VMs) / "02:xx:..." (containers)
    ipv4: str              # the leased address (no prefix)
    ipv6: list[str] = field(default_factory=list)  # allowed IPv6 sources (link-local + global)
    guest_ifname: str = "eth0"
    uid: int = -1          # tap: owner uid (the unprivileged VMM); -1 for veth
    peer_ifname: str = ""  # veth: the container end, until the engine moves it
    neigh_suppress: bool = False
    state: str = "ready"   # "creating" / "ready" / "deleting" (intent before action)
    owner: str = ""        # "PID STARTTIME" of the popek process whose intent is in progress
    created: str = ""

    def to_json(self) -> bytes:
        """Serialise for the store."""
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Port:
        """Read a record written by :meth:`to_json`."""
        d: dict[str, Any] = json.loads(data)
        return cls(**d)
