"""Plugging a popek network port (a veth pair) into a running container.

popek.network creates the veth pair on the host, the host end on the
network's bridge.  Here the other end moves into the container's network
namespace (found through its init's pid), is renamed, gets the port's MAC
and leased address and a default route via the gateway.  The container has
no CAP_NET_ADMIN, so it cannot change any of that from inside.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from popek.errors import EngineError
from popek.network.model import Network, Port


def peer_name(port: Port) -> str:
    """Name of the container end of the veth pair while it is still on the host."""
    return port.peer_ifname or f"{port.host_ifname}p"


def _netns(pid: int) -> str:
    """The network namespace of the container's process ``pid``; EngineError when it is gone.

    A container stopped or deleted meanwhile (an attach racing a delete) is a
    clear error, never a ``FileNotFoundError`` from ``/proc``.
    """
    path = f"/proc/{pid}/ns/net"
    if not os.path.exists(path):
        raise EngineError(f"the container's process {pid} is gone (stopped or deleted "
                          "meanwhile); nothing was plugged")
    return path


def plumb(port: Port, network: Network, pid: int, ifname: str) -> None:
    """Move the veth peer of ``port`` into the netns of ``pid`` as ``ifname`` and configure it."""
    from pyroute2 import IPRoute

    netns = _netns(pid)
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=peer_name(port))
        if not found:
            raise EngineError(f"the veth end {peer_name(port)} of network {port.network} "
                              "does not exist on the host")
        try:
            ipr.link("set", index=found[0], net_ns_fd=netns)
        except OSError as exc:  # the process ended between the check and the move
            raise EngineError(f"cannot move {peer_name(port)} into the container "
                              f"(process {pid}): {exc.strerror or exc}") from exc
    prefix = ipaddress.ip_network(network.subnet).prefixlen
    ns = _open(pid)
    try:
        idx = ns.link_lookup(ifname=peer_name(port))[0]
        ns.link("set", index=idx, ifname=ifname, address=port.mac)
        ns.addr("add", index=idx, address=port.ipv4, prefixlen=prefix)
        ns.link("set", index=idx, state="up")
        lo = ns.link_lookup(ifname="lo")
        if lo:
            ns.link("set", index=lo[0], state="up")
        if not any(r.get_attr("RTA_GATEWAY") for r in ns.get_routes(family=2)):
            ns.route("add", dst="0.0.0.0/0", gateway=network.gateway)
    except Exception as exc:
        raise EngineError(f"cannot configure {ifname} in the container: {exc}") from exc
    finally:
        ns.close()


def _open(pid: int) -> Any:
    """A pyroute2 ``NetNS`` on the namespace of ``pid``; EngineError when it is gone."""
    from pyroute2 import NetNS

    try:
        return NetNS(_netns(pid))
    except OSError as exc:
        raise EngineError(f"the container's process {pid} is gone (stopped or deleted "
                          f"meanwhile): {exc.strerror or exc}") from exc


def next_ifname(pid: int) -> str:
    """The first ``ethN`` name not yet used in the netns of ``pid``."""
    ns = _open(pid)
    try:
        names = {link.get_attr("IFLA_IFNAME") for link in ns.get_links()}
    finally:
        ns.close()
    return next(f"eth{i}" for i in range(len(names) + 1) if f"eth{i}" not in names)


def unplumb(mac: str, pid: int) -> None:
    """Remove the container's interface with address ``mac`` (its veth pair goes with it)."""
    ns = _open(pid)
    try:
        for link in ns.get_links():
            if link.get_attr("IFLA_ADDRESS") == mac.lower():
                ns.link("del", index=link["index"])
    finally:
        ns.close()
