"""``/1.0/projects``: as ``popek project create|list|show|set|delete --format json``.

A project's token sees its own project only; creating and deleting projects
and setting their defaults and quotas is the host admin's (core/auth.py).
``popek project switch`` is the client's own (the API takes ``?project=``):
the ``current`` field of a listing is the project the request acts in.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Request
from pydantic import BaseModel, ConfigDict, Field

from popek.api.instances import bad
from popek.api.runner import session
from popek.api.scope import identity
from popek.core import views
from popek.errors import InvalidInput

router = APIRouter(prefix="/1.0/projects", tags=["projects"])

Name = Annotated[str, Path(min_length=1, max_length=63, description="the project")]


@router.get("")
def list_projects(request: Request) -> list[dict[str, Any]]:
    """The projects (a token's: its own) and how many instances each holds."""
    who = identity(request)
    with session(who) as core:
        core.check("project.list")
        return views.project_summaries(core, core.project,
                                       None if who.host_admin else who.project)


@router.get("/{name}")
def get_project(request: Request, name: Name) -> dict[str, Any]:
    """A project's defaults, its quotas and what its instances use of them."""
    with session(identity(request)) as core:
        core.check("project.show", name)
        return views.project_detail(core, name)


class ProjectBody(BaseModel):
    """``popek project create``'s argument."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=63)


@router.post("", status_code=201)
def create_project(request: Request, body: ProjectBody) -> dict[str, Any]:
    """Create a project (no quotas, the built-in defaults): the new project (host admin)."""
    from popek.core.requests import ProjectCreate

    with session(identity(request)) as core:
        core.handle(ProjectCreate(body.name))
        return views.project_detail(core, body.name)


@router.patch("/{name}")
def set_project(request: Request, name: Name,
                values: Annotated[dict[str, str | None], Body()]) -> dict[str, Any]:
    """Set defaults and quotas (``popek project set``: ``null`` or ``""`` unsets a quota);
    every value is checked before the first is set (host admin)."""
    from popek.core.projects import Projects
    from popek.core.requests import ProjectSet

    if not values:
        raise bad("values", "no key given: send an object of KEY: VALUE (null unsets a quota)")
    pairs = {k: v or "" for k, v in values.items()}
    for key, value in pairs.items():
        try:
            Projects.parse(key, value)
        except InvalidInput as exc:
            raise bad(key, str(exc)) from exc
    with session(identity(request)) as core:
        requests = [ProjectSet(name, key, value) for key, value in pairs.items()]
        core.authorize(requests[0])  # refused (audited) before anything is set
        Projects(core.store).require(name)
        for req in requests:
            core.handle(req)
        return views.project_detail(core, name)


@router.delete("/{name}")
def delete_project(request: Request, name: Name) -> dict[str, Any]:
    """Delete an empty project (refused while it holds instances or profiles; host admin)."""
    from popek.core.requests import ProjectDelete

    with session(identity(request)) as core:
        core.handle(ProjectDelete(name))
    return {"deleted": name}
