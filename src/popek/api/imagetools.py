"""``popek image import`` and ``image sign`` through the API (``/1.0/images/...``).

- ``POST /1.0/images/import?name=N[&force=&sign=&key=]``: the body is the file
  ``popek image import`` reads (a root filesystem tarball, compressed or
  not, or an OCI layout as a tar), streamed to a private file on the host
  (:data:`MAX_UPLOAD` at most), then imported as an operation whose result
  is the image's ``image list`` record; the file goes when it is done;
- ``POST /1.0/images/NAME/sign``: sign an image with an image key; the
  signature's verdict.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from popek.api.instances import Project
from popek.api.runner import accepted, session
from popek.api.scope import identity
from popek.core import views
from popek.core.service import Core
from popek.errors import InvalidInput
from popek.names import validate_name

router = APIRouter(prefix="/1.0/images", tags=["images"])

#: the largest file an import takes (the importer's own cap on what it unpacks)
MAX_UPLOAD = 32 << 30
#: the suffixes the importer knows a file's kind by
SUFFIXES = {"gzip": ".tar.gz", "xz": ".tar.xz", "zstd": ".tar.zst", "tar": ".tar"}


def _suffix(head: bytes) -> str:
    """The file name suffix of an upload starting with ``head``."""
    if head.startswith(b"\x1f\x8b"):
        return SUFFIXES["gzip"]
    if head.startswith(b"\xfd7zXZ\x00"):
        return SUFFIXES["xz"]
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return SUFFIXES["zstd"]
    return SUFFIXES["tar"]


@router.post("/import", status_code=202)
async def import_image(request: Request,
                       name: Annotated[str, Query(min_length=1, max_length=63)],
                       force: bool = False, sign: bool = True,
                       key: Annotated[str, Query(max_length=63)] = "",
                       project: Project = None) -> JSONResponse:
    """Import the body (a rootfs tarball or an OCI layout tar) as image ``name`` of the
    project: an operation."""
    from popek.core.requests import ImageImport
    from popek.core.requests.images import check_may_make

    try:
        validate_name(name)
    except InvalidInput as exc:
        exc.field = "name"  # type: ignore[attr-defined]
        raise
    who = identity(request)
    probe = ImageImport("upload", name, force=force, sign=sign, key=key)

    def authorize() -> None:
        with session(who, project) as core:
            core.authorize(probe)  # a refusal: 403 now, audited, nothing stored
            check_may_make(core, name, sign)  # 400 now: nothing uploaded

    await run_in_threadpool(authorize)
    workdir = Path(tempfile.mkdtemp(prefix="popek-import-"))
    try:
        path = await _receive(request, workdir)
    except BaseException:
        await run_in_threadpool(_remove, workdir)
        raise
    req = dataclasses.replace(probe, file=str(path))

    def work(core: Core, progress: Any) -> dict[str, Any]:
        try:
            built = core.handle(dataclasses.replace(req, progress=progress))
        finally:
            _remove(workdir)
        return views.image_summary(built.image, core.project)

    return accepted(request.app.state.runner.submit(req.op, name, work, who, project))


async def _receive(request: Request, workdir: Path) -> Path:
    """The body, written to a file of ``workdir`` named for its kind."""
    tmp = workdir / "upload"
    size = 0
    head = b""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_UPLOAD:
                raise InvalidInput(f"an image file is at most {MAX_UPLOAD >> 30} GiB")
            if len(head) < 8:
                head += chunk[:8]
            await run_in_threadpool(f.write, chunk)
    if size == 0:
        raise InvalidInput("no image file in the body: send a root filesystem tarball or an "
                           "OCI image layout as a tar")
    path = workdir / f"image{_suffix(head)}"
    tmp.rename(path)
    return path


def _remove(workdir: Path) -> None:
    import shutil

    with contextlib.suppress(OSError):
        shutil.rmtree(workdir)


class SignBody(BaseModel):
    """``popek image sign``'s options."""

    model_config = ConfigDict(extra="forbid")
    key: str = Field(default="", max_length=63)
    days: int = Field(default=365, ge=1, le=3650)


@router.post("/{name}/sign")
def sign_image(request: Request, name: str, body: SignBody,
               project: Project = None) -> dict[str, Any]:
    """Sign image NAME's manifest (of the project) with an image key; who signed and the
    serial (the host admin's)."""
    from popek.core.requests import ImageSign

    with session(identity(request), project) as core:
        verdict = core.handle(ImageSign(name, body.key, body.days))
    return dict(verdict.to_doc())
