"""``/1.0/storage-pools`` and their volumes: as ``popek storage ... --format json``.

Pools are the host's: every identity lists and reads them, the host admin
creates and deletes them.  Volumes belong to a project (``?project=``, as
``--project``): ``/1.0/storage-pools/{pool}/volumes`` lists the project's in one
pool, ``/1.0/storage-volumes`` in every pool.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from popek.api.instances import Project
from popek.api.runner import accepted, session
from popek.api.scope import identity
from popek.core.service import Core
from popek.errors import InvalidInput
from popek.storage.service import MAX_SIZE, Storage, public

router = APIRouter(tags=["storage"])

PoolName = Annotated[str, PathParam(min_length=1, max_length=63, description="the storage pool")]
VolumeName = Annotated[str, PathParam(min_length=1, max_length=63, description="the volume")]
Size = Annotated[int, Field(ge=1, le=MAX_SIZE, description="bytes")]


@router.get("/1.0/storage-pools")
def list_pools(request: Request) -> list[dict[str, Any]]:
    """Every pool with its size, used and free bytes, volume count and health."""
    with session(identity(request)) as core:
        core.check("storage.list")
        storage = Storage(core.store)
        return [storage.pool_info(p.name) for p in storage.pools()]


@router.get("/1.0/storage-pools/{name}")
def get_pool(request: Request, name: PoolName) -> dict[str, Any]:
    """One pool, as ``popek storage info``."""
    with session(identity(request)) as core:
        core.check("storage.info")
        return Storage(core.store).pool_info(name)


class PoolBody(BaseModel):
    """``popek storage create``'s arguments."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=63)
    driver: str = Field(min_length=1, max_length=32)
    config: dict[Annotated[str, Field(max_length=64)],
                 Annotated[str, Field(max_length=4096)]] = Field(default_factory=dict,
                                                                max_length=16)


@router.post("/1.0/storage-pools", status_code=201)
def create_pool(request: Request, body: PoolBody) -> dict[str, Any]:
    """Create a pool (host admin): the new pool."""
    from popek.core.requests import PoolCreate

    with session(identity(request)) as core:
        return core.handle(PoolCreate(body.name, body.driver, dict(body.config)))


@router.delete("/1.0/storage-pools/{name}")
def delete_pool(request: Request, name: PoolName) -> dict[str, Any]:
    """Delete an empty pool (host admin)."""
    from popek.core.requests import PoolDelete

    with session(identity(request)) as core:
        core.handle(PoolDelete(name))
    return {"deleted": name}


@router.get("/1.0/storage-volumes")
def list_all_volumes(request: Request, project: Project = None) -> list[dict[str, Any]]:
    """The project's volumes in every pool."""
    with session(identity(request), project) as core:
        core.check("volume.list")
        return [public(v) for v in Storage(core.store).volumes(None, core.project)]


@router.get("/1.0/storage-pools/{pool}/volumes")
def list_volumes(request: Request, pool: PoolName,
                 project: Project = None) -> list[dict[str, Any]]:
    """The project's volumes in ``pool``."""
    with session(identity(request), project) as core:
        core.check("volume.list")
        storage = Storage(core.store)
        storage.pool(pool)
        return [public(v) for v in storage.volumes(pool, core.project)]


@router.get("/1.0/storage-pools/{pool}/volumes/{name}")
def get_volume(request: Request, pool: PoolName, name: VolumeName,
               project: Project = None) -> dict[str, Any]:
    """One volume, as ``popek storage volume info``."""
    with session(identity(request), project) as core:
        core.check("volume.info")
        return Storage(core.store).volume_info(pool, core.project, name)


class VolumeBody(BaseModel):
    """``popek storage volume create``'s arguments."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=63)
    size: Size
    type: Literal["block", "filesystem"] = "block"
    #: encrypted at rest (a block volume under the project's key: dir, qcow2 with LUKS;
    #: ceph, LUKS over the RBD image)
    encrypt: bool = False
    #: several containers may hold it at once (``security.shared=true``; filesystem only)
    shared: bool = False


@router.post("/1.0/storage-pools/{pool}/volumes", status_code=201)
def create_volume(request: Request, pool: PoolName, body: VolumeBody,
                  project: Project = None) -> dict[str, Any]:
    """Create a volume of the project in ``pool``: the new volume."""
    from popek.core.requests import VolumeCreate

    with session(identity(request), project) as core:
        return core.handle(VolumeCreate(pool, body.name, body.size, body.type, body.encrypt,
                                        body.shared))


class ResizeBody(BaseModel):
    """``popek storage volume resize``'s argument."""

    model_config = ConfigDict(extra="forbid")
    size: Size


@router.patch("/1.0/storage-pools/{pool}/volumes/{name}")
def resize_volume(request: Request, pool: PoolName, name: VolumeName, body: ResizeBody,
                  project: Project = None) -> dict[str, Any]:
    """Resize a volume (grow; a detached filesystem volume may shrink): the volume."""
    from popek.core.requests import VolumeResize

    with session(identity(request), project) as core:
        return core.handle(VolumeResize(pool, name, body.size))


class ConfigBody(BaseModel):
    """``popek storage volume set``'s settings."""

    model_config = ConfigDict(extra="forbid")
    config: dict[str, Annotated[str, Field(max_length=64)]] = Field(
        min_length=1, max_length=8,
        description="limits.disk.read_bps|write_bps (bytes per second, e.g. 10MB) and "
                    "limits.disk.read_iops|write_iops (operations per second); 0: no limit; "
                    "security.shared=true|false: several containers may hold the (filesystem) "
                    "volume at once")


@router.post("/1.0/storage-pools/{pool}/volumes/{name}/config")
def set_volume_config(request: Request, pool: PoolName, name: VolumeName, body: ConfigBody,
                      project: Project = None) -> dict[str, Any]:
    """Set a volume's I/O limits (live on the running instances it is attached to) or its
    ``security.shared`` mark: the volume."""
    from popek.core.requests import VolumeSet

    with session(identity(request), project) as core:
        return core.handle(VolumeSet(pool, name, dict(body.config)))


@router.delete("/1.0/storage-pools/{pool}/volumes/{name}")
def delete_volume(request: Request, pool: PoolName, name: VolumeName,
                  project: Project = None) -> dict[str, Any]:
    """Delete a volume (refused while attached)."""
    from popek.core.requests import VolumeDelete

    with session(identity(request), project) as core:
        core.handle(VolumeDelete(pool, name))
    return {"deleted": f"{pool}/{name}"}


SnapshotName = Annotated[str, PathParam(min_length=1, max_length=63, description="the snapshot")]
VOLUME = "/1.0/storage-pools/{pool}/volumes/{name}"


class NameBody(BaseModel):
    """A name: the snapshot to take, the volume a clone makes."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=63)


@router.post(f"{VOLUME}/snapshots", status_code=201)
def snapshot_volume(request: Request, pool: PoolName, name: VolumeName, body: NameBody,
                    project: Project = None) -> dict[str, Any]:
    """Take a snapshot of a volume (block, detached or its VM stopped: an overlay;
    filesystem, also while containers run on it, frozen meanwhile: a reflinked or sparse
    copy): the volume, its snapshots listed."""
    from popek.core.requests import VolumeSnapshot

    with session(identity(request), project) as core:
        return core.handle(VolumeSnapshot(pool, name, body.name))


@router.delete(f"{VOLUME}/snapshots/{{snapshot}}")
def delete_snapshot(request: Request, pool: PoolName, name: VolumeName,
                    snapshot: SnapshotName, project: Project = None) -> dict[str, Any]:
    """Delete a snapshot (merged into what it backs): the volume."""
    from popek.core.requests import VolumeSnapshotDelete

    with session(identity(request), project) as core:
        return core.handle(VolumeSnapshotDelete(pool, name, snapshot))


@router.post(f"{VOLUME}/snapshots/{{snapshot}}/restore")
def restore_volume(request: Request, pool: PoolName, name: VolumeName,
                   snapshot: SnapshotName, project: Project = None) -> dict[str, Any]:
    """Put the volume back as it was at the snapshot: the volume."""
    from popek.core.requests import VolumeRestore

    with session(identity(request), project) as core:
        return core.handle(VolumeRestore(pool, name, snapshot))


@router.post(f"{VOLUME}/snapshots/{{snapshot}}/clone", status_code=201)
def clone_volume(request: Request, pool: PoolName, name: VolumeName, snapshot: SnapshotName,
                 body: NameBody, project: Project = None) -> dict[str, Any]:
    """Make a volume from the snapshot (copy on write): the new volume."""
    from popek.core.requests import VolumeClone

    with session(identity(request), project) as core:
        return core.handle(VolumeClone(pool, name, snapshot, body.name))


#: the largest file an import takes through the API (a volume's largest)
MAX_UPLOAD = MAX_SIZE


@router.post(f"{VOLUME}/import", status_code=202)
async def import_volume(request: Request, pool: PoolName, name: VolumeName,
                        project: Project = None, encrypt: bool = False) -> JSONResponse:
    """Import the body (a qcow2 or raw image, self-contained) as block volume ``name`` of
    the project (``encrypt``: encrypted at rest): an operation, with progress."""
    from popek.core.requests import VolumeImport

    who = identity(request)
    probe = VolumeImport(pool, name, "upload", encrypt=encrypt)

    def authorize() -> None:
        with session(who, project) as core:
            core.authorize(probe)  # a refusal: 403 now, audited, nothing stored
            Storage(core.store).pool(pool)  # 404 now: nothing uploaded

    await run_in_threadpool(authorize)
    workdir = Path(tempfile.mkdtemp(prefix="popek-volume-"))
    try:
        path = await _receive(request, workdir)
    except BaseException:
        await run_in_threadpool(shutil.rmtree, workdir, True)
        raise
    req = dataclasses.replace(probe, file=str(path))

    def work(core: Core, progress: Any) -> dict[str, Any]:
        try:
            result: dict[str, Any] = core.handle(dataclasses.replace(req, progress=progress))
            return result
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    return accepted(request.app.state.runner.submit(req.op, f"{pool}/{name}", work, who,
                                                    project))


async def _receive(request: Request, workdir: Path) -> Path:
    """The body, written to a file of ``workdir``."""
    path = workdir / "upload"
    size = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_UPLOAD:
                raise InvalidInput(f"an image file is at most {MAX_UPLOAD >> 40} TiB")
            await run_in_threadpool(f.write, chunk)
    if size == 0:
        raise InvalidInput("no image in the body: send a qcow2 or raw image file")
    return path


@router.get(f"{VOLUME}/export", response_class=FileResponse)
async def export_volume(request: Request, pool: PoolName, name: VolumeName,
                        format: Literal["qcow2", "raw"] = "qcow2",
                        project: Project = None) -> FileResponse:
    """The volume as a file (its snapshots flattened into it), qcow2 or raw."""
    from popek.core.requests import VolumeExport

    workdir = Path(tempfile.mkdtemp(prefix="popek-volume-"))
    target = workdir / f"{name}.{format}"

    def export() -> None:
        with session(identity(request), project) as core:
            core.handle(VolumeExport(pool, name, str(target), format))

    try:
        await run_in_threadpool(export)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return FileResponse(target, media_type="application/octet-stream",
                        filename=target.name,
                        background=BackgroundTask(shutil.rmtree, workdir, True))


class InstanceBody(BaseModel):
    """The instance a volume is detached from."""

    model_config = ConfigDict(extra="forbid")
    instance: str = Field(min_length=1, max_length=63)


class AttachBody(InstanceBody):
    """The instance a volume is attached to, and (a container's) where it is mounted."""

    path: str = Field("", max_length=4096, description="a container's mount point "
                      "(default /mnt/VOLUME); a VM sees a disk")


@router.post(f"{VOLUME}/attach")
def attach_volume(request: Request, pool: PoolName, name: VolumeName, body: AttachBody,
                  project: Project = None) -> dict[str, Any]:
    """Attach a volume to an instance (a VM's disk, a container's mount), plugged in at
    once when it runs: the volume."""
    from popek.core.requests import VolumeAttach

    with session(identity(request), project) as core:
        core.handle(VolumeAttach(pool, name, body.instance, body.path))
        return Storage(core.store).volume_info(pool, core.project, name)


@router.post(f"{VOLUME}/detach")
def detach_volume(request: Request, pool: PoolName, name: VolumeName, body: InstanceBody,
                  project: Project = None) -> dict[str, Any]:
    """Detach a volume from an instance (unplugged first when it runs): the volume."""
    from popek.core.requests import VolumeDetach

    with session(identity(request), project) as core:
        core.handle(VolumeDetach(pool, name, body.instance))
        return Storage(core.store).volume_info(pool, core.project, name)
