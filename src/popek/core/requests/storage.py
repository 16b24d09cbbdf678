"""Requests on storage pools and volumes (see :mod:`popek.storage.service`).

Pools are the host's (``storage.create``/``storage.delete``: host admin);
volumes belong to the project the request acts in (``volume.*``: an
operator of that project and up).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from popek.core.service import NOT_AUDITED, Progress, Request, _noop

if TYPE_CHECKING:
    from popek.core.model import Instance
    from popek.core.service import Core

R = TypeVar("R")


def _storage(core: Core) -> Any:
    """The storage of ``core``'s store, the intents of dead processes settled first (a
    change never starts from a half-made volume, an attach or detach killed half way is
    decided by its instance's record)."""
    return core.instances.volumes.reconciled()


@contextlib.contextmanager
def _within_quota(core: Core, more: int, what: str, hold: bool = True) -> Iterator[None]:
    """Check ``more`` bytes of volumes against the project's ``limits.disk`` and hold the
    decision (the launches' lock) until the block has made them, so that two volumes
    cannot both pass the check and together exceed it; ``hold=False`` (an import, which
    may copy for minutes): check only."""
    from popek.core.access import decision_lock
    from popek.core.projects import Projects

    with decision_lock() if hold else contextlib.nullcontext():
        Projects(core.store).check_volume_quota(core.project, core.instances.records.all,
                                                more, what)
        yield


@dataclass(frozen=True)
class _OnVolume(Request[R]):
    """A request about volume ``name`` of ``pool`` (in the request's project): its target
    is ``POOL/NAME``."""

    pool: str
    name: str

    def target(self) -> str:
        """``POOL/NAME``."""
        return f"{self.pool}/{self.name}"


@dataclass(frozen=True)
class PoolCreate(Request[dict[str, Any]]):
    """Make storage pool ``name`` of ``driver`` with the driver's settings."""

    op = "storage.create"
    shown = ("driver", "config")
    name: str
    driver: str
    config: dict[str, str] = field(default_factory=dict)

    def run(self, core: Core) -> dict[str, Any]:
        """Create it; its ``storage info``."""
        storage = _storage(core)
        storage.create_pool(self.name, self.driver, dict(self.config))
        return dict(storage.pool_info(self.name))


@dataclass(frozen=True)
class PoolDelete(Request[None]):
    """Delete storage pool ``name`` (refused while it holds volumes)."""

    op = "storage.delete"
    name: str

    def run(self, core: Core) -> None:
        """Delete it."""
        _storage(core).delete_pool(self.name)


@dataclass(frozen=True)
class VolumeCreate(_OnVolume[dict[str, Any]]):
    """Make volume ``name`` of ``size`` bytes in ``pool``, in the request's project
    (``encrypt``: a LUKS qcow2 under the project's key; ``shared``: several containers
    may hold it, filesystem volumes only)."""

    op = "volume.create"
    shown = ("pool", "size", "type", "encrypt", "shared")
    size: int
    type: str = "block"
    encrypt: bool = False
    shared: bool = False

    def run(self, core: Core) -> dict[str, Any]:
        """Create it; its ``storage volume info``."""
        storage = _storage(core)
        with _within_quota(core, self.size, "the new volume"):
            storage.create_volume(self.pool, core.project, self.name, self.size, self.type,
                                  self.encrypt, self.shared)
        return dict(storage.volume_info(self.pool, core.project, self.name))


@dataclass(frozen=True)
class VolumeResize(_OnVolume[dict[str, Any]]):
    """Resize volume ``name`` of ``pool`` to ``size`` bytes."""

    op = "volume.resize"
    shown = ("size",)
    size: int

    def run(self, core: Core) -> dict[str, Any]:
        """Resize it; its ``storage volume info``."""
        storage = _storage(core)
        vol = storage.volume(self.pool, core.project, self.name)
        live = None
        if vol.attached and self.size > vol.size:  # grown under a running instance
            for holder in vol.holders():  # a shared volume: through any one that runs
                live = core.instances.volumes.grower(holder, f"{self.pool}/{self.name}")
                if live is not None:
                    break
        with _within_quota(core, self.size - vol.size, "the resize"):
            storage.resize_volume(self.pool, core.project, self.name, self.size, live)
        return dict(storage.volume_info(self.pool, core.project, self.name))


@dataclass(frozen=True)
class VolumeSet(_OnVolume[dict[str, Any]]):
    """Set keys of volume ``name``'s config: its I/O limits (``limits.disk.write_bps``...),
    live on the running instance it is attached to."""

    op = "volume.set"
    shown = ("config",)
    config: dict[str, str] = field(default_factory=dict)

    def run(self, core: Core) -> dict[str, Any]:
        """Set them (all or none); apply them to the instance holding it; its info.

        When the running instance refuses the new limits, the old ones are put back
        in the record and on the instance, and the error is raised.
        """
        storage = _storage(core)
        before = storage.volume(self.pool, core.project, self.name)
        vol = storage.set_config(self.pool, core.project, self.name, dict(self.config))
        holders = [h.partition("/")[2] for h in vol.holders()
                   if h.startswith(f"{core.project}/")]
        applied: list[str] = []
        try:
            for holder in holders:  # a shared volume: every instance holding it
                applied.append(holder)
                core.instances.apply_io_limits(holder)
        except BaseException:
            from popek.iolimits import show
            from popek.storage.model import SHARED

            old = show(storage.io_limits_of(before))
            undo = {k: old.get(k, "0") for k in self.config if k != SHARED}
            if SHARED in self.config:
                undo[SHARED] = "true" if before.shared() else "false"
            with contextlib.suppress(Exception):  # the first error is the one to report
                storage.set_config(self.pool, core.project, self.name, undo)
                for holder in applied:
                    core.instances.apply_io_limits(holder)
            raise
        return dict(storage.volume_info(self.pool, core.project, self.name))


@dataclass(frozen=True)
class VolumeDelete(_OnVolume[None]):
    """Delete volume ``name`` of ``pool`` (refused while attached)."""

    op = "volume.delete"

    def run(self, core: Core) -> None:
        """Delete it."""
        _storage(core).delete_volume(self.pool, core.project, self.name)


@dataclass(frozen=True)
class VolumeSnapshot(_OnVolume[dict[str, Any]]):
    """Take snapshot ``snapshot`` of volume ``name`` of ``pool``."""

    op = "volume.snapshot"
    shown = ("snapshot",)
    snapshot: str

    def run(self, core: Core) -> dict[str, Any]:
        """Take it (an attached volume held still meanwhile: see ``quiescer``); the
        volume's ``info``."""
        storage = _storage(core)
        vol = storage.volume(self.pool, core.project, self.name)
        quiesce = core.instances.volumes.quiescer(vol.holders(), f"{self.pool}/{self.name}") \
            if vol.attached else None
        storage.snapshot_volume(self.pool, core.project, self.name, self.snapshot, quiesce)
        return dict(storage.volume_info(self.pool, core.project, self.name))


@dataclass(frozen=True)
class VolumeRestore(_OnVolume[dict[str, Any]]):
    """Put volume ``name`` of ``pool`` back as it was at ``snapshot``."""

    op = "volume.restore"
    shown = ("snapshot",)
    snapshot: str

    def run(self, core: Core) -> dict[str, Any]:
        """Restore it; the volume's ``info``."""
        storage = _storage(core)
        storage.restore_volume(self.pool, core.project, self.name, self.snapshot)
        return dict(storage.volume_info(self.pool, core.project, self.name))


@dataclass(frozen=True)
class VolumeClone(_OnVolume[dict[str, Any]]):
    """Make volume ``new`` of ``pool`` from snapshot ``snapshot`` of ``name`` (copy on write)."""

    op = "volume.clone"
    shown = ("snapshot", "new")
    snapshot: str
    new: str

    def target(self) -> str:
        """``POOL/NEW``: the volume it makes."""
        return f"{self.pool}/{self.new}"

    def run(self, core: Core) -> dict[str, Any]:
        """Clone it; the new volume's ``info``."""
        storage = _storage(core)
        size = storage.volume(self.pool, core.project, self.name).size
        with _within_quota(core, size, "the clone"):
            storage.clone_volume(self.pool, core.project, self.name, self.snapshot, self.new)
        return dict(storage.volume_info(self.pool, core.project, self.new))


@dataclass(frozen=True)
class VolumeSnapshotDelete(_OnVolume[dict[str, Any]]):
    """Delete snapshot ``snapshot`` of volume ``name`` of ``pool`` (merged into what it backs)."""

    op = "volume.snapshot-delete"
    shown = ("snapshot",)
    snapshot: str

    def run(self, core: Core) -> dict[str, Any]:
        """Delete it; the volume's ``info``."""
        storage = _storage(core)
        storage.delete_snapshot(self.pool, core.project, self.name, self.snapshot)
        return dict(storage.volume_info(self.pool, core.project, self.name))


def _percent(progress: Progress, what: str) -> Any:
    """A callback of whole percents that says ``what NN%`` through ``progress``, every
    tenth (a log or a pipe gets ten lines, not a hundred)."""
    said = [-1]

    def step(pct: int) -> None:
        if pct // 10 > said[0]:
            said[0] = pct // 10
            progress(f"{what} {pct}%")

    return step


@dataclass(frozen=True)
class VolumeImport(_OnVolume[dict[str, Any]]):
    """Make block volume ``name`` of ``pool`` from ``file`` (qcow2 or raw, self-contained;
    ``encrypt``: into a LUKS qcow2 under the project's key)."""

    op = "volume.import"
    shown = ("file", "encrypt")
    file: str
    progress: Progress = field(default=_noop, metadata=NOT_AUDITED, compare=False)
    encrypt: bool = False

    def run(self, core: Core) -> dict[str, Any]:
        """Import it; the new volume's ``info``."""
        from pathlib import Path

        from popek.storage.dirpool import probe

        storage = _storage(core)
        with _within_quota(core, probe(Path(self.file))[1], "the imported volume",
                           hold=False):
            storage.import_volume(self.pool, core.project, self.name, Path(self.file),
                                  _percent(self.progress, "importing"), self.encrypt)
        return dict(storage.volume_info(self.pool, core.project, self.name))


@dataclass(frozen=True)
class VolumeExport(_OnVolume[int]):
    """Write block volume ``name`` of ``pool`` to the new file ``file`` as ``format``."""

    op = "volume.export"
    shown = ("file", "format")
    file: str
    format: str = "qcow2"
    progress: Progress = field(default=_noop, metadata=NOT_AUDITED, compare=False)

    def run(self, core: Core) -> int:
        """Export it; the bytes the file takes."""
        from pathlib import Path

        return int(_storage(core).export_volume(self.pool, core.project, self.name,
                                                Path(self.file), self.format,
                                                _percent(self.progress, "exporting")))


@dataclass(frozen=True)
class VolumeAttach(_OnVolume["Instance"]):
    """Attach volume ``name`` of ``pool`` to ``instance`` (a VM's disk, a container's mount
    at ``path``), plugged in at once when it runs."""

    op = "volume.attach"
    shown = ("instance", "path")
    instance: str
    path: str = ""

    def reconciles(self) -> list[str]:
        """The instance (its state must be true before it is judged)."""
        return [self.instance]

    def run(self, core: Core) -> Instance:
        """Attach it."""
        return core.instances.attach_volume(self.instance, f"{self.pool}/{self.name}",
                                            self.path)


@dataclass(frozen=True)
class VolumeDetach(_OnVolume["Instance"]):
    """Detach volume ``name`` of ``pool`` from ``instance`` (unplugged first when it
    runs)."""

    op = "volume.detach"
    shown = ("instance",)
    instance: str

    def reconciles(self) -> list[str]:
        """The instance (its state must be true before it is judged)."""
        return [self.instance]

    def run(self, core: Core) -> Instance:
        """Detach it."""
        return core.instances.detach_volume(self.instance, f"{self.pool}/{self.name}")
