"""``/1.0/profiles``: as ``popek profile list|show --format json`` (of a project)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from popek.api.runner import session
from popek.api.scope import identity
from popek.core import views

router = APIRouter(prefix="/1.0/profiles", tags=["profiles"])

Project = Annotated[str | None, Query(max_length=63, description="the project (--project)")]


@router.get("")
def list_profiles(request: Request, project: Project = None) -> list[dict[str, Any]]:
    """Every profile of the project and the instances launched with it."""
    with session(identity(request), project) as core:
        core.check("profile.list")
        return views.profile_summaries(core)


@router.get("/{name}")
def get_profile(request: Request, name: str, project: Project = None) -> dict[str, Any]:
    """One profile."""
    from popek.core.profiles import Profiles

    with session(identity(request), project) as core:
        core.check("profile.show")
        return {**Profiles(core.store, core.project).get(name).to_doc(),
                "used_by": views.profiles_used(core).get(name, [])}
