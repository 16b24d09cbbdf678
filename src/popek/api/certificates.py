"""``/1.0/certificates``: as ``popek certificate add|list|revoke --format json``.

The TLS client certificates the TCP listener trusts (:mod:`popek.core.certificates`),
each for one project and role.  A project admin manages its own project's (a
certificate of another project is not found); the host admin every project's.
The PEM of a certificate is public; no answer holds a secret.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from popek.api.runner import session
from popek.api.scope import identity
from popek.core.certificates import MAX_BYTES

router = APIRouter(prefix="/1.0/certificates", tags=["certificates"])

CertificateRef = Annotated[str, Path(min_length=1, max_length=64,
                                     description="the certificate's name, or its SHA-256 "
                                                 "fingerprint (at least 8 hex digits)")]


@router.get("")
def list_certificates(request: Request, project: Annotated[
        str | None, Query(max_length=63, description="only this project's certificates")] = None,
                      ) -> list[dict[str, Any]]:
    """The trusted client certificates (of ``project``; a client's: its own project's)."""
    from popek.core.certificates import Certificates

    who = identity(request)
    with session(who) as core:
        core.check("certificate.list", project)
        seen = project if who.host_admin else who.project
        return [c.public() for c in Certificates(core.store).list(seen)]


@router.get("/{ref}")
def get_certificate(request: Request, ref: CertificateRef) -> dict[str, Any]:
    """One trusted certificate's record, its PEM too."""
    from dataclasses import asdict

    from popek.core.certificates import Certificates

    who = identity(request)
    with session(who) as core:
        core.check("certificate.show")
        return asdict(Certificates(core.store).get(ref, None if who.host_admin
                                                   else who.project))


class CertificateBody(BaseModel):
    """``popek certificate add``'s file and options (``project``: the asker's own when not
    given)."""

    model_config = ConfigDict(extra="forbid")
    certificate: str = Field(min_length=1, max_length=MAX_BYTES,
                             description="the client's certificate, PEM")
    project: str | None = Field(default=None, min_length=1, max_length=63)
    role: Literal["admin", "operator", "viewer"]
    console: bool = False
    name: str | None = Field(default=None, min_length=1, max_length=63)


@router.post("", status_code=201)
def add_certificate(request: Request, body: CertificateBody) -> dict[str, Any]:
    """Trust a client certificate for a project and a role: its record."""
    from popek.core.requests import CertificateAdd

    with session(identity(request)) as core:
        return core.handle(CertificateAdd(body.certificate, body.project or core.project,
                                          body.role, body.console, body.name)).public()


@router.post("/{ref}/revoke")
def revoke_certificate(request: Request, ref: CertificateRef) -> dict[str, Any]:
    """Revoke a trusted certificate at once (it stays listed, as revoked): its record."""
    from popek.core.requests import CertificateRevoke

    with session(identity(request)) as core:
        return core.handle(CertificateRevoke(ref)).public()
