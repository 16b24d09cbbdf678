"""An instance's network ports, console log and attestation quote, as the CLI gives them.

- ``POST /1.0/instances/NAME/networks`` (``popek network attach NETWORK NAME
  [--ip]``) and ``DELETE /1.0/instances/NAME/networks/NETWORK`` (``network
  detach``): a running instance gets or loses the port at once;
- ``GET /1.0/instances/NAME/console/log`` (``popek console NAME --log``):
  what its console wrote, as text; it needs the console grant, as the
  console does;
- ``POST /1.0/instances/NAME/attest`` (``popek attest NAME --nonce``): the
  signed quote of its launch measurement over the verifier's nonce.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from popek.api.runner import session
from popek.api.scope import identity

router = APIRouter(prefix="/1.0/instances", tags=["instances"])

Project = Annotated[str | None, Query(max_length=63, description="the project (--project)")]


class AttachBody(BaseModel):
    """``popek network attach``'s arguments: the network and, optionally, a static IPv4."""

    model_config = ConfigDict(extra="forbid")
    network: str = Field(min_length=1, max_length=200)
    ipv4: str | None = Field(default=None, max_length=64)


@router.post("/{name}/networks", status_code=201)
def attach(request: Request, name: str, body: AttachBody,
           project: Project = None) -> dict[str, Any]:
    """Give instance NAME a port on a network; the port (its address and MAC)."""
    from popek.core.requests import Attach

    with session(identity(request), project) as core:
        port = core.handle(Attach(network=body.network, instance=name, ipv4=body.ipv4))
    return dataclasses.asdict(port)


@router.delete("/{name}/networks/{network}")
def detach(request: Request, name: str, network: str, project: Project = None) -> dict[str, Any]:
    """Take instance NAME's port on NETWORK away."""
    from popek.core.requests import Detach

    with session(identity(request), project) as core:
        core.handle(Detach(network=network, instance=name))
    return {"detached": network, "instance": name}


@router.get("/{name}/console/log", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}}})
def console_log(request: Request, name: str, project: Project = None) -> Response:
    """What instance NAME's console wrote since it started (the last 4 MiB at most)."""
    with session(identity(request), project) as core:
        core.check("session.console")
        data = core.instances.console_log(name)
    return Response(data, media_type="application/octet-stream")


class AttestBody(BaseModel):
    """The verifier's fresh nonce, hex."""

    model_config = ConfigDict(extra="forbid")
    nonce: str = Field(min_length=1, max_length=512)


@router.post("/{name}/attest")
def attest(request: Request, name: str, body: AttestBody,
           project: Project = None) -> dict[str, Any]:
    """The signed quote of instance NAME's launch measurement over ``nonce``."""
    from popek.core.requests import Attest

    with session(identity(request), project) as core:
        quote: dict[str, Any] = core.handle(Attest(name, nonce=body.nonce))
    return quote
