"""``/1.0/trust``, ``/1.0/policy``, ``/1.0/audit`` and ``/1.0/attest``: as the CLI's
``trust``, ``policy``, ``audit`` and ``attest verify`` (records as ``--format json``).

The audit log a token's holder reads holds only its own project's records.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from popek.api.runner import session
from popek.api.scope import identity, seen
from popek.core import views

router = APIRouter(prefix="/1.0", tags=["trust"])


@router.get("/trust/keys")
def list_keys(request: Request) -> list[dict[str, Any]]:
    """The signing keys this host trusts (``popek trust list``)."""
    with session(identity(request)) as core:
        core.check("trust.list")
        return [dict(k.__dict__) for k in core.trust.all()]


@router.get("/policy")
def get_policy(request: Request) -> dict[str, Any]:
    """The access control policy in force (``popek policy show --format json``)."""
    with session(identity(request)) as core:
        core.check("policy.show")
        return views.policy_detail(core.trust)


@router.get("/audit")
def audit_log(request: Request, since: str = "", target: str = "") -> list[dict[str, Any]]:
    """The audit log (``popek audit log``): at or after ``since``, about ``target``."""
    who = identity(request)
    with session(who) as core:
        core.check("audit.log")
        records = views.audit_records(core.trust, since, target)
    project = seen(who)
    return [r for r in records if project is None or r.get("project") == project]


@router.get("/audit/verify")
def audit_verify(request: Request) -> dict[str, Any]:
    """Check the chain, the signed checkpoints and the stored head: ``intact`` and problems."""
    from popek.trust.audit import AuditLog

    with session(identity(request)) as core:
        core.check("audit.verify")
        problems = AuditLog(core.trust).verify()
    return {"intact": not problems, "problems": problems}


class KeyBody(BaseModel):
    """``popek trust keygen|add``'s arguments (``public_key`` for add: PEM or base64)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    role: str = Field(min_length=1, max_length=40)
    days: int = Field(default=3650, ge=1, le=36500)
    public_key: str | None = Field(default=None, max_length=10000)


def _key(key: Any) -> dict[str, Any]:
    return dict(key.__dict__)


@router.post("/trust/keys", status_code=201)
def add_key(request: Request, body: KeyBody) -> dict[str, Any]:
    """Trust a public key made elsewhere (``popek trust add``), or, with no
    ``public_key``, make a key pair on the host (``popek trust keygen``: the
    private key stays on the host); the key's record."""
    from popek.core.requests import KeyAdd, KeyGen
    from popek.trust.keys import public_raw_from_text

    with session(identity(request)) as core:
        if body.public_key is None:
            return _key(core.handle(KeyGen(body.name, body.role, body.days)))
        raw = public_raw_from_text(body.public_key)
        return _key(core.handle(KeyAdd(body.name, body.role, raw, body.days)))


@router.get("/trust/keys/{name}/pem", response_class=PlainTextResponse)
def export_key(request: Request, name: str) -> str:
    """The public key NAME as PEM (``popek trust export``)."""
    from popek.trust.keys import public_pem

    with session(identity(request)) as core:
        core.check("trust.show")
        return public_pem(core.trust.by_name(name).raw())


@router.delete("/trust/keys/{name}")
def remove_key(request: Request, name: str) -> dict[str, Any]:
    """Stop trusting key NAME (``popek trust remove``); its record as it was."""
    from popek.core.requests import KeyRemove

    with session(identity(request)) as core:
        return _key(core.handle(KeyRemove(name)))


class RevokeBody(BaseModel):
    """Why a key is revoked."""

    model_config = ConfigDict(extra="forbid")
    reason: str = Field(default="", max_length=1000)


@router.post("/trust/keys/{name}/revoke")
def revoke_key(request: Request, name: str, body: RevokeBody) -> dict[str, Any]:
    """Revoke key NAME for good (``popek trust revoke``); its record."""
    from popek.core.requests import KeyRevoke

    with session(identity(request)) as core:
        return _key(core.handle(KeyRevoke(name, body.reason)))


class UnsignedBody(BaseModel):
    """Whether a project may launch unsigned images."""

    model_config = ConfigDict(extra="forbid")
    allow: bool


@router.put("/trust/unsigned/{project}")
def allow_unsigned(request: Request, project: str, body: UnsignedBody) -> dict[str, Any]:
    """Let PROJECT launch unsigned images, or require signatures again
    (``popek trust allow-unsigned [--off]``)."""
    from popek.core.requests import AllowUnsigned

    with session(identity(request)) as core:
        core.handle(AllowUnsigned(project, allow=body.allow))
    return {"project": project, "allow_unsigned": body.allow}


class PolicyBody(BaseModel):
    """A policy to apply (``popek policy apply``): its TOML text and the key to sign it."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=1 << 20)
    key: str = Field(default="", max_length=200)


@router.put("/policy")
def apply_policy(request: Request, body: PolicyBody) -> dict[str, Any]:
    """Check, sign and install a policy (its version must increase); the policy in force."""
    from popek.core.requests import PolicyApply

    with session(identity(request)) as core:
        core.handle(PolicyApply(body.text, source="api", key=body.key))
        return views.policy_detail(core.trust)


@router.post("/policy/check")
def check_policy(request: Request, body: PolicyBody) -> dict[str, Any]:
    """Check a policy without applying it (``popek policy check``): what it declares."""
    from popek.trust.policy import parse

    with session(identity(request)) as core:
        core.check("policy.show")
    pol = parse(body.text)
    return {"version": pol.version, "mode": pol.mode, "labels": sorted(pol.labels),
            "conflicts": len(pol.conflicts), "shares": len(pol.shares)}


@router.post("/audit/checkpoint")
def audit_checkpoint(request: Request) -> dict[str, Any]:
    """Sign the current head of the audit chain now (``popek audit checkpoint``)."""
    from popek.core.requests import AuditCheckpoint

    with session(identity(request)) as core:
        checkpoint = core.handle(AuditCheckpoint())
    return {"checkpoint": checkpoint}


class QuoteBody(BaseModel):
    """A quote to check (``popek attest verify``): the quote, the nonce, what is expected."""

    model_config = ConfigDict(extra="forbid")
    quote: dict[str, Any]
    nonce: str = Field(min_length=1, max_length=512)
    expect: dict[str, Any]
    public_key: str | None = Field(default=None, max_length=10000)


@router.post("/attest/verify")
def verify_quote(request: Request, body: QuoteBody) -> dict[str, Any]:
    """Check an attestation quote against this host's keys (or ``public_key``); its body."""
    from popek.trust import measure as ms
    from popek.trust.keys import public_raw_from_text

    raw = public_raw_from_text(body.public_key) if body.public_key else None
    with session(identity(request)) as core:
        core.check("session.attest")
        result: dict[str, Any] = ms.verify_quote(core.trust, body.quote, body.nonce,
                                                 body.expect, raw)
    return result
