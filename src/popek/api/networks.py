"""``/1.0/networks``: as ``popek network list|info|create|delete --format json``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from popek.api.runner import session
from popek.api.scope import identity
from popek.core import views

router = APIRouter(prefix="/1.0/networks", tags=["networks"])


@router.get("")
def list_networks(request: Request) -> list[dict[str, Any]]:
    """Every network and how many ports it has."""
    with session(identity(request)) as core:
        core.check("network.list")
        return views.network_summaries(core.networks)


@router.get("/{name}")
def get_network(request: Request, name: str) -> dict[str, Any]:
    """A network: its record, bridge, dnsmasq, ports and leases."""
    with session(identity(request)) as core:
        core.check("network.info")
        data: dict[str, Any] = core.networks.info(name)
        return data


class NetworkBody(BaseModel):
    """``popek network create``'s arguments."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    subnet: str | None = None
    nat: bool = False
    port_isolation: bool = False


@router.post("", status_code=201)
def create_network(request: Request, body: NetworkBody) -> dict[str, Any]:
    """Create a network: a bridge, DHCP/DNS and port security rules; the new network."""
    from popek.core.requests import NetworkCreate

    with session(identity(request)) as core:
        net = core.handle(NetworkCreate(body.name, subnet=body.subnet, nat=body.nat,
                                        port_isolation=body.port_isolation))
        return next(n for n in views.network_summaries(core.networks) if n["name"] == net.name)


@router.delete("/{name}")
def delete_network(request: Request, name: str, force: bool = False) -> dict[str, Any]:
    """Delete a network (``force``: its ports too)."""
    from popek.core.requests import NetworkDelete

    with session(identity(request)) as core:
        core.handle(NetworkDelete(name, force=force))
    return {"deleted": name}
