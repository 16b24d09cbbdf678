"""Virtual networks: bridges, tap/veth ports, IPAM, DHCP/DNS (dnsmasq), port security.

``Networks`` is the service (records, intents, reconcile); ``Network`` and
``Port`` are its records.  pyroute2 and nftables are used only when an
operation needs them.
"""

from typing import TYPE_CHECKING, Any

from popek.network.model import Network, Port, PortKind

if TYPE_CHECKING:
    from popek.network.service import Networks

__all__ = ["Network", "Networks", "Port", "PortKind"]


def __getattr__(name: str) -> Any:
    # the service (pyroute2, subprocess management) is imported on first use, so that
    # reading port records (every instance command does) costs nothing
    if name == "Networks":
        from popek.network.service import Networks

        return Networks
    raise AttributeError(name)
