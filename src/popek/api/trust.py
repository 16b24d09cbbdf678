"""``/1.0/trust/keys``, ``/1.0/policy`` and ``/1.0/audit``: as the CLI's ``--format json``.

The audit log a token's holder reads holds only its own project's records.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

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
