"""``/1.0/trust/keys``, ``/1.0/policy`` and ``/1.0/audit``: as the CLI's ``--format json``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from popek.api.runner import session
from popek.core import views

router = APIRouter(prefix="/1.0", tags=["trust"])


@router.get("/trust/keys")
def list_keys() -> list[dict[str, Any]]:
    """The signing keys this host trusts (``popek trust list``)."""
    with session() as core:
        return [dict(k.__dict__) for k in core.trust.all()]


@router.get("/policy")
def get_policy() -> dict[str, Any]:
    """The access control policy in force (``popek policy show --format json``)."""
    with session() as core:
        return views.policy_detail(core.trust)


@router.get("/audit")
def audit_log(since: str = "", target: str = "") -> list[dict[str, Any]]:
    """The audit log (``popek audit log``): at or after ``since``, about ``target``."""
    with session() as core:
        return views.audit_records(core.trust, since, target)


@router.get("/audit/verify")
def audit_verify() -> dict[str, Any]:
    """Check the chain, the signed checkpoints and the stored head: ``intact`` and problems."""
    from popek.trust.audit import AuditLog

    with session() as core:
        problems = AuditLog(core.trust).verify()
    return {"intact": not problems, "problems": problems}
