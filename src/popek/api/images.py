"""``/1.0/images``: the images of this host, as ``popek image list|info --format json``.

Images belong to a project (``?project=``, as ``--project``; default: the
identity's own, ``default`` for the host admin): a project lists and reads its
own and the ``default`` project's (shared read-only), and changes only its own.

``POST`` builds one (``popek image build``): an operation, its result the image's
``image list`` record and who signed it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from popek.api.instances import Project
from popek.api.runner import accepted, session
from popek.api.scope import identity
from popek.core import views
from popek.core.service import Core

router = APIRouter(prefix="/1.0/images", tags=["images"])


@router.get("")
def list_images(request: Request, project: Project = None) -> list[dict[str, Any]]:
    """The project's images, then the default project's, and who signed them (the
    signature is checked at each start, not here)."""
    with session(identity(request), project) as core:
        core.check("image.list")
        return views.image_summaries(core)


class BuildBody(BaseModel):
    """``popek image build``'s arguments."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["minimal", "debian"]
    force: bool = False
    sign: bool = True
    key: str = Field(default="", max_length=63)


@router.post("", status_code=202)
def build_image(request: Request, body: BuildBody, project: Project = None) -> JSONResponse:
    """Build image ``name`` of the project from Debian's packages (and sign it): an
    operation."""
    from popek.core.requests import ImageBuild
    from popek.core.requests.images import check_may_make, check_signer

    req = ImageBuild(body.name, force=body.force, sign=body.sign, key=body.key)
    who = identity(request)
    with session(who, project) as core:
        core.authorize(req)  # a refusal: 403 now, audited, no operation
        if body.sign:  # a key that cannot sign: 4xx now, not after minutes of building
            check_signer(core, body.key)
        check_may_make(core, body.name, body.sign)  # nor one the identity may not make

    def work(core: Core, progress: Any) -> dict[str, Any]:
        built = core.handle(dataclasses.replace(req, progress=progress))
        return views.image_summary(built.image, core.project)

    return accepted(request.app.state.runner.submit(req.op, body.name, work, who, project))


@router.get("/{name}")
def get_image(request: Request, name: str, project: Project = None) -> dict[str, Any]:
    """One image's manifest, project and signer (the project's, else the default
    project's)."""
    with session(identity(request), project) as core:
        core.check("image.info")
        owner, image = core.images.resolve(name, core.project)
        return views.image_detail(image, owner)


@router.delete("/{name}")
def delete_image(request: Request, name: str, project: Project = None) -> dict[str, Any]:
    """Delete an image of the project (refused while instances use it)."""
    from popek.core.requests import ImageDelete

    with session(identity(request), project) as core:
        core.handle(ImageDelete(name))
    return {"deleted": name}
