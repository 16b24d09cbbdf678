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
    """Create network ``name``: a bridge, DHCP/DNS and port security rules."""

    op = "network.create"
    shown = ("subnet", "nat", "port_isolation")
    name: str
    subnet: str | None = None
    nat: bool = False
    port_isolation: bool = False

    def run(self, core: Core) -> Network:
        """Create it."""
        return core.networks.create(self.name, subnet=self.subnet, nat=self.nat,
                                    port_isolation=self.port_isolation)


@dataclass(frozen=True)
class NetworkDelete(Request[None]):
    """Delete network ``name`` (``force``: detach its ports first)."""

    op = "network.delete"
    shown = ("force",)
    name: str
    force: bool = False

    def run(self, core: Core) -> None:
        """Delete it."""
        core.networks.delete(self.name, force=self.force)
