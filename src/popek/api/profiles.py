"""``/1.0/profiles``: as ``popek profile list|show --format json``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from popek.api.runner import session
from popek.core import views

router = APIRouter(prefix="/1.0/profiles", tags=["profiles"])


@router.get("")
def list_profiles() -> list[dict[str, Any]]:
    """Every profile and the instances launched with it."""
    with session() as core:
        return views.profile_summaries(core)


@router.get("/{name}")
def get_profile(name: str) -> dict[str, Any]:
    """One profile."""
    from popek.core.profiles import Profiles

    with session() as core:
        return {**Profiles(core.store).get(name).to_doc(),
                "used_by": views.profiles_used(core).get(name, [])}
