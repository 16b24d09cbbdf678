"""Volumes attached to instances: checked at launch, marked held, plugged in and out.

A VM takes block volumes (virtio disks), a container filesystem volumes
(mounted at a path in it).  Attaching marks the volume held by the instance
(one compare-and-swap in :mod:`popek.storage.service`), then records it on
the instance, then plugs it into the running engine; detaching goes the
other way.  Each step undoes the ones before it when a later one fails, and
a step a killed process left half done is finished by the next detach: a
volume listed on the instance but not plugged is dropped from the record, a
volume marked held by an instance that does not list it is freed.
"""

from __future__ import annotations

import contextlib
import posixpath
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from popek.core.lifecycle import State
from popek.engines import Capability, require
from popek.errors import AlreadyExists, InvalidInput, NotFound, PopekError, StateError

if TYPE_CHECKING:
    from popek.core.instances import Instances
    from popek.core.model import Instance
    from popek.storage.service import Storage

LIVE = (State.RUNNING, State.PAUSED)


def _storage(owner: Instances) -> Storage:
    from popek.core.volkeys import volume_key
    from popek.storage.service import Storage

    return Storage(owner.store, volume_key)


def check_path(path: str) -> str:
    """A container mount point: absolute, normalised, not the root or a system tree."""
    norm = posixpath.normpath(path) if path else ""
    if not norm.startswith("/") or norm == "/" or ".." in norm.split("/") or \
            any(norm == p or norm.startswith(p + "/") for p in ("/proc", "/sys", "/dev")):
        raise InvalidInput(f"invalid mount path {path!r}: give an absolute directory in the "
                           "container other than /, /proc, /sys and /dev (e.g. /mnt/data)")
    return norm


class Attachments:
    """The volumes of the instances of one :class:`Instances` (one project)."""

    def __init__(self, owner: Instances) -> None:
        self.owner = owner

    def files(self, inst: Instance) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """Each attached volume (``POOL/NAME``) and its files (its own first, then its
        backing files)."""
        if not inst.spec.volumes:
            return ()
        storage = _storage(self.owner)
        out = []
        for ref in inst.spec.volumes:
            pool, name = storage.parse_ref(ref)
            if storage.is_ceph(pool):
                continue  # an RBD image, which QEMU opens itself: Instances._rbd_disks
            out.append((ref, tuple(str(f) for f in storage.files_of(pool, inst.project,
                                                                    name))))
        return tuple(out)

    def keys(self, inst: Instance) -> tuple[str, ...]:
        """The key of each attached volume (empty: a plain one), in :meth:`files`' order;
        none at all when no volume is encrypted.  NotFound when the project's key is
        missing."""
        if not inst.spec.volumes:
            return ()
        storage = _storage(self.owner)
        keys = []
        for ref in inst.spec.volumes:
            pool, name = storage.parse_ref(ref)
            if storage.is_ceph(pool):
                continue  # not among files(): QEMU's rbd driver opens it
            keys.append(storage.key(storage.volume(pool, inst.project, name)) or "")
        return tuple(keys) if any(keys) else ()

    def parse(self, values: list[str], kind: str) -> tuple[list[str], dict[str, str]]:
        """Launch's volumes, ``POOL/VOLUME`` (a container's also ``POOL/VOLUME:PATH``,
        mounted at ``/mnt/VOLUME`` without one): the refs, and where a container mounts
        each."""
        storage = _storage(self.owner)
        refs: list[str] = []
        where: dict[str, str] = {}
        for value in values:
            text, colon, path = value.partition(":")
            pool, name = storage.parse_ref(text)
            ref = f"{pool}/{name}"
            if ref in refs:
                continue
            refs.append(ref)
            if kind != "filesystem":
                if colon:
                    raise InvalidInput(f"invalid volume {value!r}: a VM sees a volume as a "
                                       "disk, give POOL/VOLUME without a path")
                continue
            where[ref] = check_path(path or f"/mnt/{name}")
        if len(set(where.values())) < len(where):
            raise InvalidInput("two volumes are mounted at the same path: give each its own "
                               "(POOL/VOLUME:PATH)")
        return refs, where

    def holds(self, holder: str, ref: str) -> bool:
        """Whether the record of instance ``holder`` (``PROJECT/NAME``) lists volume ``ref``
        (how :meth:`popek.storage.service.Storage.reconcile` decides an interrupted attach
        or detach)."""
        from popek.core.records import Records

        project, _, name = holder.partition("/")
        try:
            inst, _rev = Records(self.owner.store, project).load(name)
        except NotFound:
            return False
        return ref in inst.spec.volumes

    def reconciled(self) -> Storage:
        """The storage, with the intents of dead processes settled first."""
        storage = _storage(self.owner)
        storage.reconcile(self.holds)
        return storage

    def check(self, refs: list[str], kind: str) -> None:
        """Refuse, before anything is made, volumes a launch on an engine taking ``kind``
        volumes cannot attach."""
        storage = self.reconciled()
        for ref in refs:
            pool, name = storage.parse_ref(ref)
            vol = storage.volume(pool, self.owner.project, name)  # NotFound
            self._check_kind(ref, vol.type, kind)
            storage.key(vol)  # an encrypted volume whose key is missing: NotFound now
            if vol.attached and not vol.shared():
                from popek.storage.sharing import with_holder

                with_holder(vol, "")  # the StateError naming its holder and how to share

    @staticmethod
    def _check_kind(ref: str, kind: str, want: str) -> None:
        if not want:
            raise InvalidInput("this engine takes no volumes: a VM takes block volumes, a "
                               "container filesystem volumes")
        if kind != want:
            raise InvalidInput(f"volume {ref} is a {kind} volume: a "
                               f"{'VM' if want == 'block' else 'container'} takes {want} "
                               "volumes")

    def mark(self, inst: Instance) -> None:
        """Mark the volumes of ``inst`` held by it (all, or none: those marked are freed
        again when one is refused)."""
        storage = _storage(self.owner)
        holder = f"{inst.project}/{inst.name}"
        done: list[tuple[str, str]] = []
        try:
            for ref in inst.spec.volumes:
                pool, name = storage.parse_ref(ref)
                storage.attach(pool, inst.project, name, holder)
                done.append((pool, name))
        except BaseException:
            for pool, name in done:
                storage.detach(pool, inst.project, name, holder)
            raise

    def free(self, inst: Instance) -> None:
        """Free the volumes ``inst`` held (each only if it holds it still)."""
        if not inst.spec.volumes:
            return
        storage = _storage(self.owner)
        for ref in inst.spec.volumes:
            with contextlib.suppress(PopekError):
                pool, name = storage.parse_ref(ref)
                storage.detach(pool, inst.project, name, f"{inst.project}/{inst.name}")

    # -- attach and detach -----------------------------------------------------------
    def attach(self, name: str, ref: str, path: str = "") -> Instance:
        """Attach volume ``ref`` (``POOL/VOLUME``) to instance ``name``: plugged in at once
        when it runs (a VM's disk, a container's mount at ``path``), else from its next
        start."""
        owner = self.owner
        inst, rev = owner.records.load(name)
        storage = self.reconciled()
        pool, vol_name = storage.parse_ref(ref)
        ref = f"{pool}/{vol_name}"
        vol = storage.volume(pool, inst.project, vol_name)
        eng = owner._engine(inst)
        self._check_kind(ref, vol.type, eng.volume_kind)
        secret = storage.key(vol) or ""  # an encrypted volume's missing key: NotFound now
        if eng.volume_kind == "block":
            if path:
                raise InvalidInput("--path is for containers: a VM sees the volume as a disk "
                                   f"(/dev/disk/by-id/virtio-{vol_name[:20]})")
        else:
            path = check_path(path or f"/mnt/{vol_name}")
            if path in inst.spec.volume_paths.values():
                raise AlreadyExists(f"{name} has a volume mounted at {path} already")
        if ref in inst.spec.volumes:
            raise AlreadyExists(f"volume {ref} is already attached to {name}")
        live = inst.state in LIVE
        if live:
            require(eng, Capability.DISK_HOTPLUG)
        elif inst.state != State.STOPPED:
            raise StateError(name, "attach a volume to", inst.state.value,
                             (State.RUNNING.value, State.PAUSED.value, State.STOPPED.value))
        holder = f"{inst.project}/{inst.name}"
        storage.attach(pool, inst.project, vol_name, holder, intent=True)
        recorded = plugged = False
        try:  # mark, record, plug: a failure undoes the steps before it
            inst.spec.volumes = [*inst.spec.volumes, ref]
            if path:
                inst.spec.volume_paths = {**inst.spec.volume_paths, ref: path}
            rev = owner.records.save(inst, rev, f"volume {ref} attached")
            recorded = True
            if live:
                assert inst.runtime is not None
                # a ceph volume has no files: its RBD image comes in the spec (rbd_disks)
                files = [] if storage.is_ceph(pool) else \
                    [str(f) for f in storage.files_of(pool, inst.project, vol_name)]
                eng.attach_disk(owner._spec_for_running(inst), inst.runtime, ref, files, path,
                                key=secret)
                plugged = True
                owner.records.save(inst, rev, f"volume {ref} plugged in")
            storage.settle_attachment(pool, inst.project, vol_name)
        except BaseException:
            if plugged:
                assert inst.runtime is not None
                with contextlib.suppress(PopekError):
                    eng.detach_disk(owner._spec_for_running(inst), inst.runtime, ref)
            if recorded:
                with contextlib.suppress(PopekError):
                    fresh, frev = owner.records.load(name)
                    self._forget(fresh, ref)
                    owner.records.save(fresh, frev, f"volume {ref} not attached")
            storage.detach(pool, inst.project, vol_name, holder)
            raise
        return inst

    @staticmethod
    def _forget(inst: Instance, ref: str) -> None:
        inst.spec.volumes = [v for v in inst.spec.volumes if v != ref]
        inst.spec.volume_paths = {k: v for k, v in inst.spec.volume_paths.items() if k != ref}

    def detach(self, name: str, ref: str) -> Instance:
        """Detach volume ``ref`` from instance ``name`` (unplugged first when it runs)."""
        owner = self.owner
        inst, rev = owner.records.load(name)
        storage = self.reconciled()
        pool, vol_name = storage.parse_ref(ref)
        ref = f"{pool}/{vol_name}"
        holder = f"{inst.project}/{inst.name}"
        if ref not in inst.spec.volumes:
            with contextlib.suppress(NotFound):  # marked by an attach killed half way
                if storage.volume(pool, inst.project, vol_name).attached == holder:
                    storage.detach(pool, inst.project, vol_name, holder)
                    return inst
            raise NotFound(f"volume {ref} is not attached to {name}; attached: "
                           f"{', '.join(inst.spec.volumes) or 'none'}")
        live = inst.state in LIVE
        eng = owner._engine(inst)
        if live:
            require(eng, Capability.DISK_HOTPLUG)
            if inst.runtime is not None and "disks" not in inst.runtime.details:
                raise StateError(name, "unplug a disk from", inst.state.value,
                                 (State.STOPPED.value,), f"{name} was started by an earlier "
                                 f"popek, which kept no record of its disks: popek stop {name} "
                                 "first")
            if inst.state == State.PAUSED and eng.volume_kind == "block" and \
                    ref in (inst.runtime.details.get("disks", {}) if inst.runtime else {}):
                raise StateError(name, "unplug a disk from", inst.state.value,
                                 (State.RUNNING.value, State.STOPPED.value),
                                 f"popek resume {name} first: the guest must release the disk")
        elif inst.state != State.STOPPED:
            raise StateError(name, "detach a volume from", inst.state.value,
                             (State.RUNNING.value, State.PAUSED.value, State.STOPPED.value))
        storage.begin_detach(pool, inst.project, vol_name, holder)
        try:  # intent, unplug, record, free: a failure before the record keeps it attached
            if live:
                assert inst.runtime is not None
                if ref in inst.runtime.details.get("disks", {}):  # else: never plugged in
                    eng.detach_disk(owner._spec_for_running(inst), inst.runtime, ref)
            self._forget(inst, ref)
            owner.records.save(inst, rev, f"volume {ref} detached")
        except BaseException:
            # still listed: attached (unplugged or not: the next detach finishes it)
            storage.settle_attachment(pool, inst.project, vol_name)
            raise
        storage.detach(pool, inst.project, vol_name, holder)
        return inst

    def grower(self, holder: str, ref: str) -> object | None:
        """What grows volume ``ref`` held by ``holder`` (``PROJECT/NAME``) under its running
        instance: a function of the new size, or ``None`` when the instance is not running
        (the volume's files are then changed directly)."""
        project, _, name = holder.partition("/")
        if project != self.owner.project:
            return None
        try:
            inst, _rev = self.owner.records.load(name)
        except NotFound:
            return None
        if inst.state not in LIVE or inst.runtime is None:
            if inst.state not in (State.STOPPED, *LIVE):
                raise StateError(name, "resize a volume of", inst.state.value,
                                 (State.RUNNING.value, State.STOPPED.value))
            return None
        eng = self.owner._engine(inst)
        require(eng, Capability.DISK_HOTPLUG)
        spec, runtime = self.owner._spec_for_running(inst), inst.runtime

        def grow(size: int) -> None:
            eng.grow_disk(spec, runtime, ref, size)

        return grow

    def quiescer(self, holders: list[str], ref: str) -> AbstractContextManager[None] | None:
        """What holds volume ``ref`` still while its file is copied (a snapshot), given its
        ``holders`` (``PROJECT/NAME``): nothing to do when none of them runs; the file
        system frozen through the first running container that holds it (a shared volume
        is one superblock, frozen once for all); ``None`` when it cannot be held still (a
        running VM, an instance of another project or in transition): the caller refuses.
        """
        running = []
        for holder in holders:
            project, _, name = holder.partition("/")
            if project != self.owner.project:
                return None
            try:
                inst, _rev = self.owner.records.load(name)
            except NotFound:
                continue  # a record gone: reconcile frees the volume
            if inst.state in LIVE and inst.runtime is not None:
                running.append(inst)
            elif inst.state != State.STOPPED:
                return None
        if not running:
            return contextlib.nullcontext()
        inst = running[0]
        eng = self.owner._engine(inst)
        if eng.volume_kind != "filesystem" or Capability.DISK_HOTPLUG not in eng.capabilities:
            return None
        spec, runtime = self.owner._spec_for_running(inst), inst.runtime
        assert runtime is not None
        return eng.quiesce_disk(spec, runtime, ref)
