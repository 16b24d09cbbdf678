"""Requests on networks: create and delete (attach and detach are instance requests)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from popek.core.service import Request

if TYPE_CHECKING:
    from popek.core.service import Core
    from popek.network.model import Network


@dataclass(frozen=True)
class NetworkCreate(Request["Network"]):
    """Create network ``name`` in the core's project: a bridge, DHCP/DNS and port security
    rules (names are unique per project; bridges and subnets per host)."""

    op = "network.create"
    shown = ("subnet", "nat", "port_isolation")
    name: str
    subnet: str | None = None
    nat: bool = False
    port_isolation: bool = False

    def run(self, core: Core) -> Network:
        """Create it."""
        return core.networks.create(self.name, subnet=self.subnet, nat=self.nat,
                                    port_isolation=self.port_isolation, project=core.project)


@dataclass(frozen=True)
class NetworkDelete(Request[None]):
    """Delete network ``name`` of the core's project (``force``: detach its ports first);
    another project's, ``default``'s shared ones included, are not found."""

    op = "network.delete"
    shown = ("force",)
    name: str
    force: bool = False

    def run(self, core: Core) -> None:
        """Delete it."""
        net = core.networks.resolve(self.name, core.project, own=True)
        core.networks.delete(net.name, force=self.force)
