"""``/1.0/images``: the images of this host, as ``popek image list|info --format json``.

``POST`` builds one (``popek image build``): an operation, its result the image's
``image list`` record and who signed it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from popek.api.runner import accepted, session
from popek.api.scope import identity
from popek.core import views
from popek.core.service import Core

router = APIRouter(prefix="/1.0/images", tags=["images"])


@router.get("")
def list_images(request: Request) -> list[dict[str, Any]]:
    """Every image and who signed it (the signature is checked at each start, not here)."""
    with session(identity(request)) as core:
        core.check("image.list")
        return [views.image_summary(i) for i in core.images.list()]


class BuildBody(BaseModel):
    """``popek image build``'s arguments."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["minimal", "debian"]
    force: bool = False
    sign: bool = True
    key: str = Field(default="", max_length=63)


@router.post("", status_code=202)
def build_image(request: Request, body: BuildBody) -> JSONResponse:
    """Build image ``name`` from Debian's packages (and sign it): an operation."""
    from popek.core.requests import ImageBuild

    req = ImageBuild(body.name, force=body.force, sign=body.sign, key=body.key)
    who = identity(request)
    with session(who) as core:
        core.authorize(req)  # a refusal: 403 now, audited, no operation

    def work(core: Core, progress: Any) -> dict[str, Any]:
        built = core.handle(dataclasses.replace(req, progress=progress))
        return views.image_summary(built.image)

    return accepted(request.app.state.runner.submit(req.op, body.name, work, who))


@router.get("/{name}")
def get_image(request: Request, name: str) -> dict[str, Any]:
    """One image's manifest and signer."""
    with session(identity(request)) as core:
        core.check("image.info")
        return views.image_detail(core.images.get(name))


@router.delete("/{name}")
def delete_image(request: Request, name: str) -> dict[str, Any]:
    """Delete an image (refused while instances use it; the host admin's)."""
    from popek.core.requests import ImageDelete

    with session(identity(request)) as core:
        core.handle(ImageDelete(name))
    return {"deleted": name}
