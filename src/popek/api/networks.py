"""``/1.0/networks``: as ``popek network list|info|create|delete --format json``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from popek.api.runner import session
from popek.core import views

router = APIRouter(prefix="/1.0/networks", tags=["networks"])


@router.get("")
def list_networks() -> list[dict[str, Any]]:
    """Every network and how many ports it has."""
    with session() as core:
        return views.network_summaries(core.networks)


@router.get("/{name}")
def get_network(name: str) -> dict[str, Any]:
    """A network: its record, bridge, dnsmasq, ports and leases."""
    with session() as core:
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
def create_network(body: NetworkBody) -> dict[str, Any]:
    """Create a network: a bridge, DHCP/DNS and port security rules; the new network."""
    from popek.core.requests import NetworkCreate

    with session() as core:
        net = core.handle(NetworkCreate(body.name, subnet=body.subnet, nat=body.nat,
                                        port_isolation=body.port_isolation))
        return next(n for n in views.network_summaries(core.networks) if n["name"] == net.name)


@router.delete("/{name}")
def delete_network(name: str, force: bool = False) -> dict[str, Any]:
    """Delete a network (``force``: its ports too)."""
    from popek.core.requests import NetworkDelete

    with session() as core:
        core.handle(NetworkDelete(name, force=force))
    return {"deleted": name}
