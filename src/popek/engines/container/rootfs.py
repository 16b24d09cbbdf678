"""A container's root filesystem: one verified base per image, an overlay per container.

::

    $POPEK_HOME/rootfs-bases/<sha256>/  the image's rootfs tar, verified and extracted
                                        once; owners as in the tar; never written
    $POPEK_HOME/rootfs-bases/<sha256>.seen  the tars last hashed into it (stat, below)
    <workdir>/bundle/base               the sha256 (of the tar) this container is made from
    <workdir>/bundle/lower              the base, id-mapped to the container's range,
                                        read-only, without devices
    <workdir>/bundle/disk.ext4          the container's own file system, as large as its
                                        ``limits.disk``: /upper holds its changes (overlayfs),
                                        /work the overlay's scratch (engines/container/disk.py)
    <workdir>/bundle/disk               where that file system is mounted while the
                                        overlay is made
    <workdir>/bundle/upper, work        the changes of a container made before limits.disk
                                        (unbounded; kept as they were)
    <workdir>/bundle/rootfs             the overlay the runtime pivots into

The two mounts exist on the host only while the runtime starts the container:
once it runs, its own mount namespace holds its copies, and :func:`detach`
removes the host's.  Every mount in the host's table is copied into each new
mount namespace (a container's, a sandbox's, a unit's), so a host with 500
containers used to carry 1000 more mounts into every launch: about 30 ms
each, measured here with 1000 mounts (bench/scaling.py).

A launch used to extract the whole tar into each container (about 25 ms for
the minimal image here, seconds for Debian, and a full copy on disk each).
Now the first launch of an image extracts its base, as verified as before (the
tar's SHA-256, which the signed manifest names, is checked on the very bytes
extracted); later launches only mount.  The base is root's alone (mode 0700
above it) and read-only to every container: a container's writes go to its
upper directory, which belongs to its own id range on the host.

Bases no container and no image refers to any more are removed by
:func:`prune` (on container delete, image delete and when a base is made).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from popek import paths
from popek.engines.container import disk, idmap
from popek.errors import EngineError

if TYPE_CHECKING:
    from popek.engines.base import LaunchSpec
    from popek.images.image import Image

LAYERS = ("lower", "disk", "rootfs")


def bases_dir() -> Path:
    """Where the bases live: ``$POPEK_HOME/rootfs-bases``."""
    return paths.home() / "rootfs-bases"


def base_id(image: Image) -> str:
    """The base of ``image``: the SHA-256 of its rootfs tar (named by its signed manifest)."""
    return image.manifest.files[image.manifest.rootfs].sha256


def prepare(spec: LaunchSpec, id_range: int) -> None:
    """At create: record the base, make it if needed, make the container's own layers."""
    assert spec.image is not None
    bundle = spec.workdir / "bundle"
    sha = base_id(spec.image)
    (bundle / "base").write_text(sha + "\n")  # first: prune() now keeps the base
    base = ensure_base(spec.image, sha)
    for name in LAYERS:
        (bundle / name).mkdir(mode=0o700, exist_ok=True)
    # the overlay's root takes its owner and mode from the upper directory
    st = base.stat()
    if not 0 <= st.st_uid < id_range or not 0 <= st.st_gid < id_range:
        raise EngineError(f"the image's root directory belongs to {st.st_uid}:{st.st_gid}, "
                          f"outside the container's {id_range} ids")
    disk.create(bundle, disk_limit(spec), spec.uid + st.st_uid, spec.gid + st.st_gid,
                st.st_mode)


def disk_limit(spec: LaunchSpec) -> int:
    """The size of the container's writable layer: its ``limits.disk``."""
    return int(spec.limits.get("disk", disk.DEFAULT_DISK))


def ensure_base(image: Image, sha: str) -> Path:
    """The extracted base ``sha`` of ``image``, extracting (and verifying) it if needed.

    When the base exists, the image's tar is still checked, cheaply: its
    size, times and inode as they were when it was last hashed are kept
    beside the base (``<sha>.seen``); any write to the tar changes its ctime,
    which no one can set back, and the tar is then hashed again in full.  So
    a tar changed on disk is refused (``IntegrityError``) as it was when each
    launch extracted it, though the launch would only use the base.
    """
    final = bases_dir() / sha
    tar = image.file("rootfs")
    if final.is_dir() and _seen(sha, tar):
        return final
    bases_dir().mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked():
        before = _signature(tar)  # taken before hashing: a later write shows as a change
        if final.is_dir():
            if not _seen(sha, tar):
                image.verify_file(image.manifest.rootfs)
                _remember(sha, tar, before)
            return final
        tmp = bases_dir() / f".new-{sha[:16]}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        image.extract_rootfs(tmp, 0, 0)  # removes tmp itself when it fails
        os.rename(tmp, final)
        _remember(sha, tar, before)
        _prune_locked()
    return final


def _signature(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _seen_file(sha: str) -> Path:
    return bases_dir() / f"{sha}.seen"


def _load_seen(sha: str) -> dict[str, list[int]]:
    """The tars last hashed into (or against) base ``sha``, with their signatures."""
    try:
        seen = json.loads(_seen_file(sha).read_text())
    except (OSError, ValueError):
        return {}
    return seen if isinstance(seen, dict) else {}


def _seen(sha: str, tar: Path) -> bool:
    """Whether ``tar`` is unchanged since it was last hashed into (or against) base ``sha``."""
    try:
        return _load_seen(sha).get(str(tar)) == _signature(tar)
    except OSError:
        return False


def _remember(sha: str, tar: Path, signature: list[int]) -> None:
    seen = _load_seen(sha)
    seen[str(tar)] = signature
    tmp = _seen_file(sha).with_suffix(".seen.new")
    tmp.write_text(json.dumps(seen))
    os.replace(tmp, _seen_file(sha))


def mount(spec: LaunchSpec, id_range: int) -> None:
    """Mount the container's root filesystem (again: after a stop, or a host reboot)."""
    bundle = spec.workdir / "bundle"
    try:
        sha = (bundle / "base").read_text().strip()
    except OSError as exc:
        raise EngineError(f"container {spec.name} has no root filesystem record "
                          f"({bundle / 'base'}): {exc.strerror}") from exc
    base = bases_dir() / sha
    if not base.is_dir():
        raise EngineError(f"the base root filesystem of container {spec.name} ({base}) is "
                          "gone; delete the container and launch it again")
    unmount(spec)
    bounded = disk.has_disk(bundle)
    if bounded:
        disk.mount(bundle, bundle / "disk")
        layers = bundle / "disk"
    else:
        layers = bundle
    try:
        fd = idmap.userns(spec.uid, spec.gid, id_range)
        try:
            idmap.mount_idmapped(str(base), str(bundle / "lower"), fd)
        finally:
            os.close(fd)
        idmap.make_private(str(bundle / "lower"))
        idmap.mount_overlay(str(bundle / "lower"), str(layers / "upper"), str(layers / "work"),
                            str(bundle / "rootfs"))
        idmap.make_private(str(bundle / "rootfs"))
    except BaseException:
        unmount(spec)
        raise
    finally:
        if bounded:  # the overlay holds its own reference to the file system
            idmap.unmount(str(bundle / "disk"))


def resize_disk(spec: LaunchSpec, running: bool) -> None:
    """Bring the container's file system to its ``limits.disk``: grow it (mounted or
    not), or shrink it (only while ``running`` is false: ext4 cannot shrink mounted)."""
    bundle = spec.workdir / "bundle"
    if not disk.has_disk(bundle):
        from popek.errors import InvalidInput

        raise InvalidInput(f"container {spec.name} was made before limits.disk and keeps "
                           "its writable layer unbounded; launch it anew to bound it")
    want, have = disk_limit(spec), disk.size_of(bundle)
    if want > have:
        disk.grow(bundle, want, bundle / "disk", mounted=running)
    elif want < have:
        if running:
            from popek.errors import StateError

            raise StateError(spec.name, "shrink the disk of", "running", ("stopped",))
        disk.shrink(bundle, want)


def disk_usage(spec: LaunchSpec, pid: int | None) -> dict[str, int]:
    """The writable layer's limit, and (while running, seen through init's root) its use."""
    bundle = spec.workdir / "bundle"
    if not disk.has_disk(bundle):
        return {}
    out = {"disk_limit": disk.size_of(bundle)}
    if pid is not None:
        with contextlib.suppress(OSError):
            st = os.statvfs(f"/proc/{pid}/root/")  # an overlay reports its upper file system
            out["disk_used"] = (st.f_blocks - st.f_bfree) * st.f_frsize
            out["disk_free"] = st.f_bavail * st.f_frsize
    return out


def detach(spec: LaunchSpec) -> None:
    """Remove the host's mounts of a container's root once its runtime has started it.

    The container keeps its own copies (they are private, so the unmount
    does not reach them), and they go when its last process exits.  The host
    keeps no mount per running container, so what each later mount namespace
    copies does not grow with the number of containers.
    """
    unmount(spec)


def unmount(spec: LaunchSpec) -> None:
    """Unmount the container's root filesystem, if it is mounted."""
    bundle = spec.workdir / "bundle"
    for name in ("rootfs", "lower", "disk"):
        if (bundle / name).exists():
            idmap.unmount(str(bundle / name))


def remove(spec: LaunchSpec) -> None:
    """Unmount and delete the container's layers (on delete), then prune unused bases.

    While an image still uses the container's base (the common case), nothing
    can be pruned and the other containers are not looked at: a delete costs
    the same with 10 containers or 500.
    """
    with contextlib.suppress(EngineError):
        unmount(spec)
    try:
        sha: str | None = (spec.workdir / "bundle" / "base").read_text().strip()
    except OSError:
        sha = None
    shutil.rmtree(spec.workdir / "bundle", ignore_errors=True)
    if sha is not None and sha in set(_used_by_images()):
        return
    prune()


def prune() -> list[str]:
    """Remove every base that no container and no image refers to; return their ids."""
    if not bases_dir().is_dir():
        return []
    with _locked():
        return _prune_locked()


def _prune_locked() -> list[str]:
    keep = set(_used_by_containers()) | set(_used_by_images())
    gone = []
    for d in bases_dir().iterdir():
        # also a .new-* left by an extraction that died (extractions hold the lock too)
        sha = d.name.split(".")[0]
        if sha not in keep:
            if d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
            else:
                d.unlink(missing_ok=True)
            gone.append(d.name)
    return gone


def _used_by_containers() -> Iterator[str]:
    root = paths.instances_dir()
    if root.is_dir():
        for f in root.glob("*/*/bundle/base"):
            with contextlib.suppress(OSError):
                yield f.read_text().strip()


def _used_by_images() -> Iterator[str]:
    from popek.images import ImageStore

    for image in ImageStore().every():  # every project's
        if image.has("rootfs"):
            yield base_id(image)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Serialise making and pruning bases (several popek commands may run at once)."""
    fd = os.open(bases_dir(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
