"""``/1.0/images``: the images of this host, as ``popek image list|info --format json``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from popek.api.runner import session
from popek.api.scope import identity
from popek.core import views

router = APIRouter(prefix="/1.0/images", tags=["images"])


@router.get("")
def list_images(request: Request) -> list[dict[str, Any]]:
    """Every image and who signed it (the signature is checked at each start, not here)."""
    with session(identity(request)) as core:
        core.check("image.list")
        return [views.image_summary(i) for i in core.images.list()]


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
