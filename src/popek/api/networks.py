"""``/1.0/networks``: as ``popek network list|info|create|delete --format json``.

Networks belong to a project (``?project=``, as ``--project``; default: the
identity's own, ``default`` for the host admin): a project lists and reads its
own and the ``default`` project's (shared read-only), and changes only its own.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from popek.api.instances import Project
from popek.api.runner import session
from popek.api.scope import identity
from popek.core import views

router = APIRouter(prefix="/1.0/networks", tags=["networks"])


@router.get("")
def list_networks(request: Request, project: Project = None) -> list[dict[str, Any]]:
    """The project's networks, then the default project's, and how many ports each has."""
    with session(identity(request), project) as core:
        core.check("network.list")
        return views.network_summaries(core)


@router.get("/{name}")
def get_network(request: Request, name: str, project: Project = None) -> dict[str, Any]:
    """A network (the project's, else the default project's): its record, bridge, dnsmasq,
    ports and leases."""
    with session(identity(request), project) as core:
        core.check("network.info")
        return views.network_detail(core, name)


class NetworkBody(BaseModel):
    """``popek network create``'s arguments."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    subnet: str | None = None
    nat: bool = False
    port_isolation: bool = False


@router.post("", status_code=201)
def create_network(request: Request, body: NetworkBody,
                   project: Project = None) -> dict[str, Any]:
    """Create a network of the project: a bridge, DHCP/DNS and port security rules; the new
    network."""
    from popek.core.requests import NetworkCreate

    with session(identity(request), project) as core:
        net = core.handle(NetworkCreate(body.name, subnet=body.subnet, nat=body.nat,
                                        port_isolation=body.port_isolation))
        return next(n for n in views.network_summaries(core)
                    if n["name"] == net.short and n["project"] == net.project)


@router.delete("/{name}")
def delete_network(request: Request, name: str, force: bool = False,
                   project: Project = None) -> dict[str, Any]:
    """Delete a network of the project (``force``: its ports too)."""
    from popek.core.requests import NetworkDelete

    with session(identity(request), project) as core:
        core.handle(NetworkDelete(name, force=force))
    return {"deleted": name}
