"""``/1.0/storage-pools`` and their volumes: as ``popek storage ... --format json``.

Pools are the host's: every identity lists and reads them, the host admin
creates and deletes them.  Volumes belong to a project (``?project=``, as
``--project``): ``/1.0/storage-pools/{pool}/volumes`` lists the project's in one
pool, ``/1.0/storage-volumes`` in every pool.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, ConfigDict, Field

from popek.api.instances import Project
from popek.api.runner import session
from popek.api.scope import identity
from popek.storage.service import MAX_SIZE, Storage, public

router = APIRouter(tags=["storage"])

PoolName = Annotated[str, Path(min_length=1, max_length=63, description="the storage pool")]
VolumeName = Annotated[str, Path(min_length=1, max_length=63, description="the volume")]
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


@router.post("/1.0/storage-pools/{pool}/volumes", status_code=201)
def create_volume(request: Request, pool: PoolName, body: VolumeBody,
                  project: Project = None) -> dict[str, Any]:
    """Create a volume of the project in ``pool``: the new volume."""
    from popek.core.requests import VolumeCreate

    with session(identity(request), project) as core:
        return core.handle(VolumeCreate(pool, body.name, body.size, body.type))


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


@router.delete("/1.0/storage-pools/{pool}/volumes/{name}")
def delete_volume(request: Request, pool: PoolName, name: VolumeName,
                  project: Project = None) -> dict[str, Any]:
    """Delete a volume (refused while attached)."""
    from popek.core.requests import VolumeDelete

    with session(identity(request), project) as core:
        core.handle(VolumeDelete(pool, name))
    return {"deleted": f"{pool}/{name}"}


SnapshotName = Annotated[str, Path(min_length=1, max_length=63, description="the snapshot")]
VOLUME = "/1.0/storage-pools/{pool}/volumes/{name}"


class NameBody(BaseModel):
    """A name: the snapshot to take, the volume a clone makes."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=63)


@router.post(f"{VOLUME}/snapshots", status_code=201)
def snapshot_volume(request: Request, pool: PoolName, name: VolumeName, body: NameBody,
                    project: Project = None) -> dict[str, Any]:
    """Take a snapshot of a block volume: the volume, its snapshots listed."""
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
