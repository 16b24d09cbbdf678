"""The network side of instances: their ports, plugging and unplugging, shaping.

Port records are read straight from the store (no netlink, no import of the
network service), so that commands that only read pay nothing for networks.
The network service itself (:class:`popek.network.Networks`) is built at
most once per operation, on first use, by the factory core was given (the
host's by default; a fake network host in unit tests).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from popek.core.model import Instance
from popek.network.model import Network, Port
from popek.state.schema import PORTS_PREFIX, network_key
from popek.state.store import StateStore

if TYPE_CHECKING:
    from popek.engines import Engine
    from popek.network import Networks

NetworksFactory = Callable[[StateStore], "Networks"]


def host_networks(store: StateStore) -> Networks:
    """The network service of this host over ``store`` (reconciles the host network once)."""
    from popek.network import Networks

    return Networks(store)


def split_network(text: str) -> tuple[str, str | None]:
    """Split ``NAME`` or ``NAME=IPV4`` (a static address on that network)."""
    name, _, ipv4 = text.partition("=")
    return name, ipv4 or None


def owner_name(inst: Instance) -> str:
    """How a port record names the instance that holds it."""
    return f"{inst.project}/{inst.name}"


def port_json(port: Port) -> dict[str, Any]:
    """What ``popek info`` and ``popek list --format json`` say of an instance's port."""
    project = port.instance.split("/", 1)[0]
    network = port.network.removeprefix(f"{project}.")  # as its project names it
    return {"network": network, "mac": port.mac, "ipv4": port.ipv4, "ipv6": port.ipv6,
            "host_device": port.host_ifname, "kind": port.kind}


class InstanceNetworks:
    """Ports of instances, and the one network service of an operation."""

    def __init__(self, store: StateStore, factory: NetworksFactory = host_networks) -> None:
        """Read ports from ``store``; build the service with ``factory`` when first needed."""
        self.store = store
        self._factory = factory
        self._service: Networks | None = None

    @property
    def service(self) -> Networks:
        """The network service, built once."""
        if self._service is None:
            self._service = self._factory(self.store)
        return self._service

    def all_ports(self) -> list[Port]:
        """Every port record of the host, from the store."""
        return [Port.from_json(kv.value) for kv in self.store.range(PORTS_PREFIX)]

    def ports(self, inst: Instance) -> list[Port]:
        """The instance's network ports."""
        me = owner_name(inst)
        return [p for p in self.all_ports() if p.instance == me]

    def networks_of(self, ports: list[Port]) -> dict[str, Network]:
        """The network records the ports are on."""
        nets: dict[str, Network] = {}
        for port in ports:
            kv = self.store.get(network_key(port.network))
            if kv is not None:
                nets[port.network] = Network.from_json(kv.value)
        return nets

    def create_ports(self, inst: Instance, eng: Engine, networks: list[str]) -> None:
        """Give a new instance a port on each of ``networks`` (``NAME`` or ``NAME=IPV4``)."""
        for net, ipv4 in (split_network(n) for n in networks):
            self.service.create_port(net, owner_name(inst), eng.port_kind, inst.uid, ipv4=ipv4)

    def ensure_devices(self, inst: Instance) -> None:
        """Recreate host devices of ports that vanished (a container's veth dies with it)."""
        for port in self.ports(inst):
            self.service.ensure_port_device(port)

    def delete_ports(self, inst: Instance) -> None:
        """Remove every port of ``inst`` (records, addresses and host devices)."""
        for port in self.ports(inst):
            self.service.delete_port(port)

    def shape(self, inst: Instance, ports: list[Port] | None = None) -> None:
        """Apply ``limits.net`` (or no limit) to the host side of the instance's ports."""
        ports = self.ports(inst) if ports is None else ports
        rate = inst.spec.limits.get("net")
        for port in ports:
            guest = None
            if port.kind == "veth" and inst.runtime is not None:  # its end in the container
                guest = inst.runtime.pid
            self.service.shape_port(port, rate, guest)
