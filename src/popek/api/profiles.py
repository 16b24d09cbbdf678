"""``/1.0/profiles``: as ``popek profile list|show|create|edit|delete --format json``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from popek.api.runner import session
from popek.api.scope import identity
from popek.core import views

if TYPE_CHECKING:
    from popek.core.service import Core

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
    with session(identity(request), project) as core:
        core.check("profile.show")
        return _doc(core, name)


class ProfileBody(BaseModel):
    """A whole profile, as ``popek profile create|edit`` take it."""

    model_config = ConfigDict(extra="forbid")
    description: str = Field(default="", max_length=1000)
    config: dict[str, str] = Field(default_factory=dict, max_length=100)
    networks: list[str] = Field(default_factory=list, max_length=32)


class NewProfile(ProfileBody):
    """``popek profile create NAME``'s arguments."""

    name: str = Field(min_length=1, max_length=200)


def _doc(core: Core, name: str) -> dict[str, Any]:
    from popek.core.profiles import Profiles

    return {**Profiles(core.store, core.project).get(name).to_doc(),
            "used_by": views.profiles_used(core).get(name, [])}


@router.post("", status_code=201)
def create_profile(request: Request, body: NewProfile, project: Project = None) -> dict[str, Any]:
    """Create a profile (``popek profile create``); the new profile."""
    from popek.core.requests import ProfileCreate

    with session(identity(request), project) as core:
        core.handle(ProfileCreate(body.name, description=body.description,
                                  config=dict(body.config), networks=tuple(body.networks)))
        return _doc(core, body.name)


@router.put("/{name}")
def replace_profile(request: Request, name: str, body: ProfileBody,
                    project: Project = None) -> dict[str, Any]:
    """Replace a profile's description, keys and networks (``popek profile edit``)."""
    from popek.core.requests import ProfileEdit

    with session(identity(request), project) as core:
        core.handle(ProfileEdit(name, description=body.description, config=dict(body.config),
                                networks=tuple(body.networks)))
        return _doc(core, name)


@router.delete("/{name}")
def delete_profile(request: Request, name: str, project: Project = None) -> dict[str, Any]:
    """Delete a profile no instance uses (``popek profile delete``)."""
    from popek.core.requests import ProfileDelete

    with session(identity(request), project) as core:
        core.handle(ProfileDelete(name))
    return {"deleted": name}
