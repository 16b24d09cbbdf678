"""Storage pools and their volumes: create, list, show, resize, delete; reconcile.

Every change follows popek's intent pattern: the record is written first in
its intent state (``creating``, ``resizing``, ``deleting``) with the owner
process, in a compare-and-swap transaction that also decides the name; then
the files are made or changed; then the outcome is written.  A process killed
at any step leaves a record :meth:`Storage.reconcile` settles once that
process is gone: a volume being created is rolled back (file and record), one
being deleted is finished, one being resized keeps the size its file has.
Files of a pool that no record explains (a temporary file, a volume whose
record was rolled back) are removed.

The pool ``local`` (driver ``dir`` under ``POPEK_HOME/storage/local``) is
made on first use.

An encrypted volume (``config["encrypt"] == "luks"``) is opened with its
project's key, which the caller gives as ``keys`` (``popek.core`` passes the
secret store's: storage does not reach into ``trust``); every operation that
reads or writes its data asks for the key, and a clone stays in its origin's
project, under the same key.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from popek import iolimits, paths
from popek.errors import (
    AlreadyExists,
    EngineError,
    InvalidInput,
    NotFound,
    PopekError,
    StateError,
)
from popek.names import validate_name
from popek.state.owners import Owner
from popek.state.store import Compare, Delete, Put, StateStore
from popek.storage import cephpool, sharing
from popek.storage.cephpool import CephPool
from popek.storage.dirpool import ENCRYPTION, FORMATS, DirPool, probe
from popek.storage.model import (
    ATTACHMENT_INTENTS,
    DEFAULT_POOL,
    DRIVERS,
    INTENTS,
    POOLS_PREFIX,
    READY,
    SHARED,
    VOLUME_TYPES,
    VOLUMES_PREFIX,
    Pool,
    Volume,
    pool_key,
    volume_key,
    volumes_prefix,
)
from popek.units import format_size

#: the settings each driver takes at create
POOL_KEYS = {"dir": ("path",), "ceph": cephpool.KEYS}
#: what a pool's driver is
Driver = DirPool | CephPool
#: the smallest volume of each type (a filesystem needs room for its own records)
MIN_SIZE = {"block": 1 << 20, "filesystem": 16 << 20}
#: the largest: qcow2's metadata of 64 TiB is small; an ext4 of 16 TiB takes mkfs seconds
MAX_SIZES = {"block": 64 << 40, "filesystem": 16 << 40}
MAX_SIZE = max(MAX_SIZES.values())


#: the keys of a volume's config ``popek storage volume set`` takes
CONFIG_KEYS = (*iolimits.KEYS, SHARED)

#: ``keys(project, create)``: the volume key of ``project`` (made now when ``create``)
Keys = Callable[[str, bool], str]
#: the ``config`` entry of an encrypted volume, and its value
ENCRYPT = "encrypt"


def encrypted(vol: Volume) -> bool:
    """Whether ``vol``'s files are encrypted (with its project's key)."""
    return vol.config.get(ENCRYPT) == ENCRYPTION


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _owner() -> str:
    me = Owner.me()
    return f"{me.pid} {me.start_time}"


def _owner_alive(owner: str) -> bool:
    o = Owner.from_bytes(owner.encode())
    return o is not None and o.alive()


def _create(store: StateStore, key: str, value: bytes) -> bool:
    """Write ``key`` only when it does not exist; whether it was written."""
    return store.txn([Compare(key, "version", "==", 0)], [Put(key, value)]).succeeded


def storage_dir() -> Path:
    """Where the pools popek makes itself keep their files (``POPEK_HOME/storage``)."""
    return paths.home() / "storage"


def _default() -> Pool:
    """The pool ``local`` (``dir`` under ``POPEK_HOME/storage/local``, made now)."""
    path = storage_dir() / DEFAULT_POOL
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return Pool(DEFAULT_POOL, "dir", {"path": str(path)}, "")


class Storage:
    """The storage pools and volumes of this host's store."""

    def __init__(self, store: StateStore, keys: Keys | None = None) -> None:
        self.store = store
        self.keys = keys

    def key(self, vol: Volume, create: bool = False) -> str | None:
        """The key of encrypted ``vol`` (None for a plain one); EngineError when this
        storage was given no way to get it."""
        if not encrypted(vol):
            return None
        if self.keys is None:
            raise EngineError(f"volume {vol.name} is encrypted and this operation was not "
                              "given its project's key")
        return self.keys(vol.project, create)

    # -- pools -----------------------------------------------------------------
    def pools(self) -> list[Pool]:
        """Every pool, ``local`` among them whether or not its record was written yet."""
        pools = {p.name: p for p in (Pool.from_json(kv.value)
                                     for kv in self.store.range(POOLS_PREFIX))}
        pools.setdefault(DEFAULT_POOL, _default())
        return sorted(pools.values(), key=lambda p: p.name)

    def pool(self, name: str) -> Pool:
        """Pool ``name``; NotFound naming the pools there are."""
        kv = self.store.get(pool_key(name))
        if kv is None and name == DEFAULT_POOL:
            return _default()
        if kv is None:
            names = ", ".join(p.name for p in self.pools()) or "none"
            raise NotFound(f"storage pool {name!r} not found; pools: {names} (popek storage "
                           "create NAME dir to make one)")
        return Pool.from_json(kv.value)

    def create_pool(self, name: str, driver: str, config: dict[str, str]) -> Pool:
        """Make pool ``name`` of ``driver`` with ``config`` (``path=`` for ``dir``, default
        ``POPEK_HOME/storage/NAME``, made then; ``conf= keyring= pool= [client=]`` for
        ``ceph``, whose cluster must answer and hold that pool)."""
        validate_name(name, "storage pool name")
        if driver not in DRIVERS:
            raise InvalidInput(f"unknown storage driver {driver!r}; available: "
                               f"{', '.join(DRIVERS)}")
        unknown = sorted(set(config) - set(POOL_KEYS[driver]))
        if unknown:
            raise InvalidInput(f"unknown setting {unknown[0]!r} for a {driver} pool; allowed: "
                               f"{', '.join(POOL_KEYS[driver])}")
        if self.store.get(pool_key(name)) is not None:
            raise AlreadyExists(f"storage pool {name!r} already exists")
        if driver == "ceph":
            return self._create_ceph_pool(name, config)
        made = "path" not in config
        path = Path(config["path"]) if not made else storage_dir() / name
        if not made:
            self._check_path_free(path)
        for other in self.pools():
            if Path(other.config.get("path", "")) == path:
                raise InvalidInput(f"pool directory {path} is pool {other.name!r}'s already")
        if made:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        DirPool(path).check()
        pool = Pool(name, driver, {"path": str(path)}, _now())
        if not _create(self.store, pool_key(name), pool.to_json()):
            raise AlreadyExists(f"storage pool {name!r} already exists")
        return pool

    def _create_ceph_pool(self, name: str, config: dict[str, str]) -> Pool:
        """Record ceph pool ``name`` once its cluster answered and holds the RBD pool (the
        Ceph pool itself is the operator's: popek never makes or removes it)."""
        settings = cephpool.check_config(config)
        for other in self.pools():
            if other.driver == "ceph" and all(other.config.get(k) == settings[k]
                                              for k in ("conf", "pool", "client")):
                raise InvalidInput(f"Ceph pool {settings['pool']} of {settings['conf']} is "
                                   f"already popek pool {other.name!r}")
        settings["prefix"] = cephpool.new_prefix()
        driver = CephPool(name, settings)
        try:
            driver.check()
        finally:
            driver.close()
        pool = Pool(name, "ceph", settings, _now())
        if not _create(self.store, pool_key(name), pool.to_json()):
            raise AlreadyExists(f"storage pool {name!r} already exists")
        return pool

    @staticmethod
    def _check_path_free(path: Path) -> None:
        DirPool(path).check()
        if any(path.iterdir()):
            raise InvalidInput(f"pool directory {path} is not empty: give an empty directory "
                               "(popek removes what no volume explains)")

    def delete_pool(self, name: str) -> None:
        """Delete pool ``name``; refused while it holds volumes (named)."""
        pool = self.pool(name)
        held = [f"{v.project}/{v.name}" for v in self.volumes(name)]
        if held:
            raise StateError(f"storage pool {name}", "delete", f"holding {len(held)} volume(s) "
                             f"({', '.join(held[:10])})", ("empty",),
                             "delete its volumes first (popek storage volume delete)")
        path = Path(pool.config.get("path", "/nonexistent"))
        key = pool_key(name)
        if not self.store.txn([Compare(key, "mod_revision", "==", self._revision(key))],
                              [Delete(key)]).succeeded:
            raise StateError(f"storage pool {name}", "delete", "changed meanwhile", (READY,),
                             "try again")
        if pool.driver == "dir" and path.parent == storage_dir() and path.name == name:
            shutil.rmtree(path, ignore_errors=True)

    def pool_info(self, name: str) -> dict[str, Any]:
        """Pool ``name`` with its size, used and free bytes, its volumes and its health."""
        pool = self.pool(name)
        driver = self._driver(pool)
        vols = self.volumes(name)
        try:
            used = sum(driver.used(v.project, v.name, v.type) for v in vols)
            size, free = driver.capacity()
            health = driver.health() if isinstance(driver, CephPool) else "ok"
        except OSError as exc:
            used, size, free, health = 0, 0, 0, f"unavailable: {exc.strerror or exc}"
        except PopekError as exc:
            used, size, free, health = 0, 0, 0, f"unavailable: {exc}"
        finally:
            if isinstance(driver, CephPool):
                driver.close()
        return {"name": pool.name, "driver": pool.driver, "config": pool.config,
                "created": pool.created, "size": size, "used": used, "free": free,
                "provisioned": sum(v.size for v in vols), "volumes": len(vols),
                "health": health}

    def _ensure_default(self, name: str) -> None:
        """Write ``local``'s record when a volume is first made in it (a read writes none)."""
        if name == DEFAULT_POOL and self.store.get(pool_key(DEFAULT_POOL)) is None:
            _create(self.store, pool_key(DEFAULT_POOL), _default().to_json())

    def _revision(self, key: str) -> int:
        kv = self.store.get(key)
        return kv.mod_revision if kv is not None else 0

    def _driver(self, pool: Pool) -> Driver:
        if pool.driver == "ceph":
            return CephPool(pool.name, pool.config)
        return DirPool(Path(pool.config["path"]))

    def _usable(self, pool: Pool, operation: str) -> Driver:
        """The driver of ``pool``; StateError when its directory is gone or unwritable, or
        its Ceph cluster does not answer (nothing is recorded then)."""
        driver = self._driver(pool)
        try:
            driver.check()
        except InvalidInput as exc:
            hint = ("make its directory again, or delete the pool (popek storage delete)"
                    if pool.driver == "dir" else "check the cluster (ceph -s) and the pool's "
                    "conf, keyring and client (popek storage info)")
            raise StateError(f"storage pool {pool.name}", operation, f"unavailable ({exc})",
                             ("available",), hint) from exc
        return driver

    # -- volumes ---------------------------------------------------------------
    def volumes(self, pool: str | None = None, project: str | None = None) -> list[Volume]:
        """The volumes (of one pool, of one project), sorted by pool, project and name."""
        prefix = volumes_prefix(pool, project) if pool else VOLUMES_PREFIX
        vols = [Volume.from_json(kv.value) for kv in self.store.range(prefix)]
        return [v for v in vols if project is None or v.project == project]

    def volume(self, pool: str, project: str, name: str) -> Volume:
        """Volume ``name`` of ``project`` in ``pool``; NotFound naming those there are."""
        self.pool(pool)
        kv = self.store.get(volume_key(pool, project, name))
        if kv is None:
            names = ", ".join(v.name for v in self.volumes(pool, project)) or "none"
            raise NotFound(f"volume {name!r} not found in pool {pool!r} of project "
                           f"{project!r}; volumes there: {names}")
        vol = Volume.from_json(kv.value)
        vol.revision = kv.mod_revision
        return vol

    @staticmethod
    def check_size(size: int, kind: str) -> None:
        """Raise InvalidInput unless ``size`` is allowed for a volume of type ``kind``."""
        if kind not in VOLUME_TYPES:
            raise InvalidInput(f"invalid volume type {kind!r}; allowed: {', '.join(VOLUME_TYPES)}")
        if not MIN_SIZE[kind] <= size <= MAX_SIZES[kind]:
            raise InvalidInput(f"invalid volume size {format_size(size)}: a {kind} volume takes "
                               f"{format_size(MIN_SIZE[kind])} to {format_size(MAX_SIZES[kind])}")

    def create_volume(self, pool: str, project: str, name: str, size: int,
                      kind: str = "block", encrypt: bool = False,
                      shared: bool = False) -> Volume:
        """Make volume ``name`` of ``size`` bytes: the record (``creating``), the file, then
        ``ready``; the file and record are taken back when making the file fails.  With
        ``encrypt``: a LUKS qcow2 under the project's key (made now when it has none); with
        ``shared``: marked ``security.shared=true`` (a filesystem volume only)."""
        validate_name(name, "volume name")
        self.check_size(size, kind)
        p = self.pool(pool)
        self._check_encrypt(encrypt, kind, p)
        if p.driver == "ceph" and kind != "block":
            raise InvalidInput(f"pool {pool} is a ceph pool: it holds block volumes (RBD "
                               "images); make filesystem volumes in a dir pool")
        self._ensure_default(pool)
        vol = Volume(pool, project, name, size, kind, _now(), "creating", _owner(),
                     config={**({ENCRYPT: ENCRYPTION} if encrypt else {}),
                             **({SHARED: "true"} if shared else {})})
        if shared:
            sharing.check_mark(vol, True, p.driver)  # before anything is made
        key = self.key(vol, create=True)
        return self._make(p, vol, lambda driver: driver.create(project, name, kind, size, key))

    def _check_encrypt(self, encrypt: bool, kind: str, pool: Pool | None = None,
                       importing: bool = False) -> None:
        if encrypt and importing and pool is not None and pool.driver == "ceph":
            raise InvalidInput(f"import --encrypt applies to dir pools; pool {pool.name} is a "
                               "ceph pool: import into a plain volume, or make an encrypted "
                               "one and copy the data in a VM")
        if encrypt and kind != "block":
            raise InvalidInput("--encrypt applies to block volumes (qcow2 with LUKS); a "
                               "filesystem volume cannot be encrypted yet (it would need "
                               "dm-crypt, which this host lacks)")
        if encrypt and self.keys is None:
            raise EngineError("an encrypted volume needs the secret store, which this "
                              "caller did not give")

    def _make(self, pool: Pool, vol: Volume, act: Callable[[Driver], None]) -> Volume:
        """Write ``vol``'s record (``creating``: AlreadyExists when the name is taken), make
        its file with ``act``, then say ``ready``; file and record go again when ``act``
        fails."""
        driver = self._usable(pool, "make a volume in")
        key = volume_key(vol.pool, vol.project, vol.name)
        if not _create(self.store, key, vol.to_json()):
            raise AlreadyExists(f"volume {vol.name!r} already exists in pool {vol.pool!r} of "
                                f"project {vol.project!r}")
        try:
            act(driver)
        except BaseException:
            with contextlib.suppress(PopekError, OSError):
                driver.delete(vol.project, vol.name, vol.type)
                self.store.delete(key)
            raise
        return self._settle(key, vol, size=vol.size)

    def resize_volume(self, pool: str, project: str, name: str, size: int,
                      live: Callable[[int], None] | None = None) -> Volume:
        """Grow volume ``name`` to ``size`` (a filesystem volume may also shrink while its
        data fits and it is detached; a block volume never: its layout is the guest's).

        An attached volume only grows: through ``live`` (a function of the new size) when
        its instance runs, which then owns the files; directly when it is stopped."""
        vol = self.volume(pool, project, name)
        self.check_size(size, vol.type)
        self._require_ready(vol, "resize")
        if size == vol.size:
            return vol
        if size < vol.size and vol.type == "block":
            raise InvalidInput(f"cannot shrink block volume {name} from {format_size(vol.size)} "
                               f"to {format_size(size)}: popek cannot know the guest's data "
                               "fits; make a new volume and copy the data")
        if vol.attached and size < vol.size:
            raise StateError(f"volume {pool}/{name}", "shrink", f"attached to {vol.attached}",
                             ("detached",), "detach it first; an attached volume only grows")
        driver = self._usable(self.pool(pool), "resize a volume in")
        key = volume_key(pool, project, name)
        secret = self.key(vol)  # a missing key: refused before the intent
        busy = self._intent(key, vol, "resizing")
        try:
            if live is not None:
                live(size)  # its QEMU has the key already
            else:
                driver.resize(project, name, vol.type, size, vol.size, secret)
        except BaseException:
            with contextlib.suppress(PopekError, OSError):
                self._settle(key, busy, size=driver.virtual_size(project, name, vol.type))
            raise
        return self._settle(key, busy, size=size)

    def delete_volume(self, pool: str, project: str, name: str) -> None:
        """Delete volume ``name``: refused while attached; the record says ``deleting`` until
        its file is gone."""
        vol = self.volume(pool, project, name)
        self._require_ready(vol, "delete")
        self._detached(vol, "delete")
        clones = self.clones_of(pool, project, name)
        if clones:
            raise StateError(f"volume {name}", "delete", f"the origin of clone(s) "
                             f"{', '.join(clones)}", ("without clones",),
                             "delete the clones first")
        key = volume_key(pool, project, name)
        self._intent(key, vol, "deleting")
        self._driver(self.pool(pool)).delete(project, name, vol.type,
                                             tuple(vol.snapshot_names()))
        self.store.delete(key)

    def clones_of(self, pool: str, project: str, name: str, snap: str | None = None
                  ) -> list[str]:
        """The volumes (``PROJECT/NAME``) cloned from a snapshot of ``name`` (of ``snap``)."""
        mark = f"{project}/{name}@" + (snap or "")
        return [f"{v.project}/{v.name}" for v in self.volumes(pool)
                if (v.origin == mark if snap else v.origin.startswith(mark))]

    # -- attach ------------------------------------------------------------------------
    @staticmethod
    def parse_ref(ref: str) -> tuple[str, str]:
        """``POOL/VOLUME`` -> (pool, volume); InvalidInput otherwise."""
        pool, slash, name = ref.partition("/")
        if not slash or not pool or not name or "/" in name:
            raise InvalidInput(f"invalid volume {ref!r}: name it as POOL/VOLUME (e.g. "
                               "local/data)")
        return pool, name

    def attach(self, pool: str, project: str, name: str, holder: str,
               intent: bool = False) -> Volume:
        """Mark volume ``name`` as attached to ``holder`` (``PROJECT/INSTANCE``), in one
        compare-and-swap: refused while it is attached elsewhere or busy (whether the
        instance takes this kind of volume is the caller's to check).  With ``intent`` the
        record says ``attaching`` until :meth:`settle_attachment`: when this process dies
        first, :meth:`reconcile` asks the holder's record whether it holds the volume."""
        vol = self.volume(pool, project, name)
        self._require_ready(vol, "attach")
        key = volume_key(pool, project, name)
        held = sharing.with_holder(vol, holder)  # StateError: another's and not shared
        if intent:
            held = Volume(**{**held.__dict__, "state": "attaching", "owner": _owner(),
                             "pending": holder})
        if not self.store.txn([Compare(key, "mod_revision", "==", vol.revision)],
                              [Put(key, held.to_json())]).succeeded:
            raise StateError(f"volume {pool}/{name}", "attach", "changed meanwhile", (READY,),
                             "try again")
        return held

    def begin_detach(self, pool: str, project: str, name: str, holder: str) -> None:
        """Record the intent to unplug volume ``name`` from ``holder`` (``detaching``):
        when this process dies before :meth:`detach`, :meth:`reconcile` asks the holder's
        record whether it still holds the volume."""
        vol = self.volume(pool, project, name)
        self._require_ready(vol, "detach")
        if holder not in vol.holders():
            return
        self._intent(volume_key(pool, project, name), vol, "detaching", holder)

    def settle_attachment(self, pool: str, project: str, name: str) -> None:
        """End an ``attaching``/``detaching`` intent: the volume stays attached."""
        key = volume_key(pool, project, name)
        kv = self.store.get(key)
        if kv is None:
            return
        vol = Volume.from_json(kv.value)
        if vol.state in ATTACHMENT_INTENTS:
            self.store.txn([Compare(key, "mod_revision", "==", kv.mod_revision)],
                           [Put(key, Volume(**{**vol.__dict__, "state": READY, "owner": "",
                                               "pending": ""}).to_json())])

    def detach(self, pool: str, project: str, name: str, holder: str) -> None:
        """Clear ``holder``'s attachment of volume ``name`` (gone, or not held by it:
        nothing), and an attach or detach intent about it with it (a shared volume's other
        holders keep it)."""
        key = volume_key(pool, project, name)
        for _ in range(5):  # a concurrent change of the record: read it again
            kv = self.store.get(key)
            if kv is None:
                return
            vol = Volume.from_json(kv.value)
            if holder not in vol.holders():
                return
            free = sharing.without_holder(vol, holder)
            if vol.state in ATTACHMENT_INTENTS and sharing.subject(vol) == holder:
                free = Volume(**{**free.__dict__, "state": READY, "owner": "", "pending": ""})
            if self.store.txn([Compare(key, "mod_revision", "==", kv.mod_revision)],
                              [Put(key, free.to_json())]).succeeded:
                return

    def set_config(self, pool: str, project: str, name: str, values: dict[str, str]) -> Volume:
        """Set keys of volume ``name``'s config (:data:`popek.iolimits.KEYS`: its I/O limits,
        0 for none), all or none, in one compare-and-swap; the volume as it is now.

        Raises :class:`InvalidInput` for an unknown key or a bad value, nothing changed.
        """
        if not values:
            raise InvalidInput(f"no KEY=VALUE given; keys: {', '.join(CONFIG_KEYS)}")
        vol = self.volume(pool, project, name)
        self._require_ready(vol, "configure")
        values = dict(values)
        shared = values.pop(SHARED, None)
        limits = self.io_limits_of(vol)
        for key, value in values.items():
            if not iolimits.is_key(key):
                raise InvalidInput(f"unknown key {key!r}; keys: {', '.join(CONFIG_KEYS)}")
            limits = iolimits.replace(limits, key, value)
        config = {k: v for k, v in vol.config.items() if not iolimits.is_key(k)}
        config.update({f"limits.{k}": str(v) for k, v in limits.stored().items()})
        if shared is not None:
            on = sharing.parse(shared)
            sharing.check_mark(vol, on, self.pool(pool).driver)
            config.pop(SHARED, None)
            if on:
                config[SHARED] = "true"
        key = volume_key(pool, project, name)
        changed = Volume(**{**vol.__dict__, "config": config})
        if not self.store.txn([Compare(key, "mod_revision", "==", vol.revision)],
                              [Put(key, changed.to_json())]).succeeded:
            raise StateError(f"volume {pool}/{name}", "configure", "changed meanwhile",
                             (READY,), "try again")
        return changed

    @staticmethod
    def io_limits_of(vol: Volume) -> iolimits.IoLimits:
        """The I/O limits set on ``vol`` (none: all 0)."""
        return iolimits.IoLimits.of({k: v for k, v in vol.config.items()
                                     if iolimits.is_key(k)})

    def files_of(self, pool: str, project: str, name: str) -> list[Path]:
        """The files an instance of volume ``name`` opens: a block volume's chain, its own
        first; a filesystem volume's one file (a ceph volume has none: rbd_disk)."""
        driver = self._driver(self.pool(pool))
        if isinstance(driver, CephPool):
            raise InvalidInput(f"volume {pool}/{name} is an RBD image, not files: "
                               "use rbd_disk")
        vol = self.volume(pool, project, name)
        if vol.type != "block":
            return [driver.file(project, name, vol.type)]
        return driver.chain(project, name)

    def is_ceph(self, pool: str) -> bool:
        """Whether ``pool`` is a ``ceph`` pool (its volumes are RBD images, not files)."""
        return self.pool(pool).driver == "ceph"

    def rbd_disk(self, pool: str, project: str, name: str) -> dict[str, Any]:
        """What QEMU's rbd driver needs to open volume ``name`` of ceph pool ``pool``:
        ``pool``, ``image``, ``user``, ``servers`` (the monitors, host and port) and ``key``
        (the client's secret, read from its keyring now: never stored by popek)."""
        p = self.pool(pool)
        driver = self._driver(p)
        if not isinstance(driver, CephPool):
            raise InvalidInput(f"pool {pool} is not a ceph pool")
        try:
            mon_host = driver.mon_host()
        finally:
            driver.close()
        client = p.config.get("client", cephpool.DEFAULT_CLIENT)
        return {"pool": p.config["pool"], "image": driver.image(project, name),
                "user": client, "servers": cephpool.resolved(cephpool.mon_servers(mon_host)),
                "key": cephpool.read_key(Path(p.config["keyring"]), client)}

    # -- import and export ------------------------------------------------------------
    def import_volume(self, pool: str, project: str, name: str, source: Path,
                      progress: Callable[[int], None] = lambda _pct: None,
                      encrypt: bool = False) -> Volume:
        """Make block volume ``name`` from the file ``source`` (qcow2 or raw, self-contained;
        encrypted with the project's key when ``encrypt``); the record says ``creating``
        until the copy is in place."""
        validate_name(name, "volume name")
        p = self.pool(pool)
        self._check_encrypt(encrypt, "block", p, importing=True)
        fmt, size = probe(source)
        self.check_size(size, "block")
        self._ensure_default(pool)
        vol = Volume(pool, project, name, size, "block", _now(), "creating", _owner(),
                     config={"imported": fmt, **({ENCRYPT: ENCRYPTION} if encrypt else {})})
        key = self.key(vol, create=True)
        return self._make(p, vol, lambda driver: driver.import_file(project, name, source, fmt,
                                                                    progress, key))

    def export_volume(self, pool: str, project: str, name: str, target: Path, fmt: str,
                      progress: Callable[[int], None] = lambda _pct: None) -> int:
        """Write block volume ``name`` to the new file ``target`` as ``fmt`` (qcow2, raw);
        the bytes the file takes."""
        vol = self.volume(pool, project, name)
        self._block(vol, "export")
        self._require_ready(vol, "export")
        if fmt not in FORMATS:
            raise InvalidInput(f"invalid format {fmt!r}; allowed: {', '.join(FORMATS)}")
        if target.exists() or target.is_symlink():
            raise AlreadyExists(f"{target} exists: popek does not overwrite a file; name a "
                                "new one")
        if not target.parent.is_dir():
            raise InvalidInput(f"directory {target.parent} does not exist")
        self._driver(self.pool(pool)).export_file(project, name, target, fmt, progress,
                                                  self.key(vol))
        return target.stat().st_blocks * 512

    # -- snapshots and clones --------------------------------------------------------
    def _block(self, vol: Volume, operation: str) -> None:
        if vol.type != "block":
            raise InvalidInput(f"cannot {operation} filesystem volume {vol.name}: export "
                               "takes block volumes (qcow2); snapshot or clone a filesystem "
                               "volume instead")

    def _snapshot_of(self, vol: Volume, snap: str) -> None:
        if snap not in vol.snapshot_names():
            raise NotFound(f"snapshot {snap!r} of volume {vol.name!r} not found; snapshots: "
                           f"{', '.join(vol.snapshot_names()) or 'none'}")

    def snapshot_volume(self, pool: str, project: str, name: str, snap: str,
                        quiesce: AbstractContextManager[None] | None = None) -> Volume:
        """Freeze volume ``name`` as snapshot ``snap`` (constant time: the file is kept as
        it is and an empty overlay takes its place; a filesystem volume: a copy).

        An attached volume is refused unless ``quiesce`` holds it still for the copy (its
        holders stopped, or the containers' file system frozen): a running VM writes on
        into the file a snapshot freezes."""
        validate_name(snap, "snapshot name")
        vol = self.volume(pool, project, name)
        self._require_ready(vol, "snapshot")
        if quiesce is None:
            self._detached(vol, "snapshot")
        if snap in vol.snapshot_names():
            raise AlreadyExists(f"snapshot {snap!r} of volume {name!r} already exists")
        key = volume_key(pool, project, name)
        self._usable(self.pool(pool), "snapshot a volume in")
        secret = self.key(vol)  # a missing key: refused before anything changes
        busy = self._intent(key, vol, "snapshotting", snap)
        with quiesce or contextlib.nullcontext():
            self._driver(self.pool(pool)).snapshot(project, name, snap, secret)
        return self._settle(key, busy, size=vol.size,
                            snapshots=[*vol.snapshots, {"name": snap, "created": _now()}])

    def restore_volume(self, pool: str, project: str, name: str, snap: str) -> Volume:
        """Put volume ``name`` back as it was at ``snap`` (what was written since is lost;
        the snapshots stay); refused while attached."""
        vol = self.volume(pool, project, name)
        self._snapshot_of(vol, snap)
        self._require_ready(vol, "restore")
        self._detached(vol, "restore")
        key = volume_key(pool, project, name)
        self._usable(self.pool(pool), "restore a volume in")
        secret = self.key(vol)
        busy = self._intent(key, vol, "restoring", snap)
        driver = self._driver(self.pool(pool))
        driver.restore(project, name, snap, secret)
        return self._settle(key, busy, size=driver.virtual_size(project, name, vol.type))

    def clone_volume(self, pool: str, project: str, name: str, snap: str, new: str) -> Volume:
        """Make volume ``new`` from snapshot ``snap`` of ``name``: copy on write, constant
        time whatever the size; ``name`` then cannot be deleted before ``new``."""
        validate_name(new, "volume name")
        vol = self.volume(pool, project, name)
        self._snapshot_of(vol, snap)
        p = self.pool(pool)
        size = self._driver(p).virtual_size(project, f"{name}@{snap}", vol.type)
        clone = Volume(pool, project, new, size, vol.type, _now(), "creating", _owner(),
                       origin=f"{project}/{name}@{snap}",
                       config={ENCRYPT: ENCRYPTION} if encrypted(vol) else {})
        secret = self.key(vol)
        return self._make(p, clone, lambda driver: driver.clone(project, name, snap, new,
                                                                secret))

    def delete_snapshot(self, pool: str, project: str, name: str, snap: str) -> Volume:
        """Delete snapshot ``snap`` of ``name``: what it holds is merged into the file it
        backs; refused while a clone was made from it."""
        vol = self.volume(pool, project, name)
        self._snapshot_of(vol, snap)
        self._require_ready(vol, "delete a snapshot of")
        if vol.type == "block":  # the merge rewrites open files (a filesystem
            self._detached(vol, "delete a snapshot of")  # volume's snapshot is a copy)
        clones = self.clones_of(pool, project, name, snap)
        if clones:
            raise StateError(f"snapshot {name}@{snap}", "delete", f"the origin of clone(s) "
                             f"{', '.join(clones)}", ("without clones",),
                             "delete the clones first")
        key = volume_key(pool, project, name)
        secret = self.key(vol)
        busy = self._intent(key, vol, "deleting-snapshot", snap)
        others = [n for n in vol.snapshot_names() if n != snap]
        self._driver(self.pool(pool)).delete_snapshot(project, name, snap, others, secret)
        return self._settle(key, busy, size=vol.size,
                            snapshots=[x for x in vol.snapshots if x["name"] != snap])

    def volume_info(self, pool: str, project: str, name: str) -> dict[str, Any]:
        """Volume ``name`` with the bytes its file takes."""
        vol = self.volume(pool, project, name)
        used = self._driver(self.pool(pool)).used(project, name, vol.type)
        return {**public(vol), "used": used}

    @staticmethod
    def _detached(vol: Volume, operation: str) -> None:
        """StateError while ``vol`` is attached (naming every holder): its instances have
        its files open."""
        if vol.attached:
            detach = "; ".join(f"popek storage volume detach {vol.pool}/{vol.name} "
                               f"{h.partition('/')[2]}" for h in vol.holders())
            raise StateError(f"volume {vol.name}", operation,
                             f"attached to {sharing.holder_text(vol)}", ("detached",),
                             f"detach it first: {detach}")

    def _require_ready(self, vol: Volume, operation: str) -> None:
        if vol.state != READY:
            raise StateError(f"volume {vol.name}", operation, vol.state, (READY,),
                             "another operation is under way; popek settles it if its "
                             "process died")

    def _intent(self, key: str, vol: Volume, state: str, pending: str = "") -> Volume:
        busy = Volume(**{**vol.__dict__, "state": state, "owner": _owner(),
                         "pending": pending})
        if not self.store.txn([Compare(key, "mod_revision", "==", vol.revision)],
                              [Put(key, busy.to_json())]).succeeded:
            raise StateError(f"volume {vol.name}", state.removesuffix("ing"), "changed meanwhile",
                             (READY,), "try again")
        return busy

    def _settle(self, key: str, vol: Volume, size: int,
                snapshots: list[dict[str, str]] | None = None) -> Volume:
        done = Volume(**{**vol.__dict__, "state": READY, "owner": "", "size": size,
                         "pending": "", "snapshots": vol.snapshots if snapshots is None
                         else snapshots})
        self.store.put(key, done.to_json())
        return done

    # -- reconcile -------------------------------------------------------------
    def reconcile(self, holds: Callable[[str, str], bool] | None = None) -> list[str]:
        """Settle the intents of dead processes and remove files no record explains; return
        what was done, one line each.

        ``holds(holder, "POOL/NAME")`` says whether an instance's record holds a volume:
        an interrupted attach or detach is decided by it (kept attached, or freed); without
        it those intents wait for a caller that knows."""
        done: list[str] = []
        for pool in self.pools():
            if pool.driver == "ceph":
                done += self._reconcile_ceph(pool, holds)
                continue
            driver = self._driver(pool)
            for vol in self.volumes(pool.name):
                if vol.state in INTENTS and not _owner_alive(vol.owner):
                    if vol.state in ATTACHMENT_INTENTS:
                        if holds is not None:
                            done.append(self._settle_attachment(vol, holds))
                        continue
                    try:
                        done.append(self._settle_dead(driver, vol))
                    except PopekError as exc:  # e.g. an encrypted volume's missing key:
                        done.append(f"{pool.name}: volume {vol.project}/{vol.name} left "
                                    f"{vol.state}: {exc}")  # the others are settled
            known = {(v.project, n, v.type) for v in self.volumes(pool.name)
                     for n in (v.name, *(f"{v.name}@{s}" for s in v.snapshot_names()),
                               *([f"{v.name}@{v.pending}"] if v.pending else []))}
            for project, name, kind in driver.files():
                if name.startswith("."):  # a snapshot's copy (.NAME@SNAP): NAME's
                    if not self._in_progress(pool.name, project,
                                             name[1:].partition("@")[0]):
                        driver.remove_temporary(project, name, kind)
                        done.append(f"{pool.name}: removed the unfinished file of "
                                    f"{project}/{name[1:]}")
                elif (project, name, kind) not in known:
                    driver.delete(project, name, kind)
                    done.append(f"{pool.name}: removed the {kind} volume file "
                                f"{project}/{name}, which no record explains")
        return done

    def _settle_attachment(self, vol: Volume, holds: Callable[[str, str], bool]) -> str:
        where = f"{vol.pool}: volume {vol.project}/{vol.name}"
        what = vol.state.removesuffix("ing")
        who = sharing.subject(vol)  # the holder the intent is about (a shared volume has more)
        if who and who in vol.holders() and holds(who, f"{vol.pool}/{vol.name}"):
            self.settle_attachment(vol.pool, vol.project, vol.name)
            return f"{where}: interrupted {what} settled: attached to {who}"
        if who in vol.holders():
            self.detach(vol.pool, vol.project, vol.name, who)
        else:  # the holder is not on the record: only the intent is left to end
            self.settle_attachment(vol.pool, vol.project, vol.name)
        return f"{where}: interrupted {what} settled: detached" + (
            f" from {who}" if len(vol.holders()) > 1 else "")

    def _reconcile_ceph(self, pool: Pool, holds: Callable[[str, str], bool] | None
                        ) -> list[str]:
        """Settle the dead intents of a ceph pool, then remove its images (of its prefix)
        that no record explains.  The cluster is asked only when an intent is to settle
        (every image is made after its record and removed before it, so only an
        interrupted operation can leave one); an unreachable cluster leaves the intents
        for a later reconcile, and says so.  An interrupted attach or detach needs no
        cluster: the instance's record decides it (``holds``, as for a dir pool)."""
        done: list[str] = []
        dead = []
        for vol in self.volumes(pool.name):
            if vol.state in INTENTS and not _owner_alive(vol.owner):
                if vol.state not in ATTACHMENT_INTENTS:
                    dead.append(vol)
                elif holds is not None:
                    done.append(self._settle_attachment(vol, holds))
        if not dead:
            return done
        driver = self._driver(pool)
        assert isinstance(driver, CephPool)
        try:
            for vol in dead:
                done.append(self._settle_dead(driver, vol))
            known = {(v.project, v.name) for v in self.volumes(pool.name)}
            for project, name, kind in driver.files():
                if (project, name) not in known:
                    driver.delete(project, name, kind)
                    done.append(f"{pool.name}: removed RBD image {driver.image(project, name)}"
                                ", which no record explains")
        except PopekError as exc:
            done.append(f"{pool.name}: not reconciled now: {exc}")
        finally:
            driver.close()
        return done

    def _in_progress(self, pool: str, project: str, name: str) -> bool:
        kv = self.store.get(volume_key(pool, project, name))
        if kv is None:
            return False
        vol = Volume.from_json(kv.value)
        return vol.state in INTENTS and _owner_alive(vol.owner)

    def _settle_dead(self, driver: Driver, vol: Volume) -> str:
        key = volume_key(vol.pool, vol.project, vol.name)
        where = f"{vol.pool}: volume {vol.project}/{vol.name}"
        if vol.state == "creating":
            driver.delete(vol.project, vol.name, vol.type)
            self.store.delete(key)
            return f"{where}: interrupted create rolled back"
        if vol.state == "deleting":
            driver.delete(vol.project, vol.name, vol.type, tuple(vol.snapshot_names()))
            self.store.delete(key)
            return f"{where}: interrupted delete finished"
        if vol.state == "snapshotting":
            if driver.has_snapshot(vol.project, vol.name, vol.pending):
                # the file was frozen (dir: finish, an overlay on it; ceph: taken)
                driver.snapshot(vol.project, vol.name, vol.pending, self.key(vol))
                self._settle(key, vol, size=vol.size, snapshots=[
                    *vol.snapshots, {"name": vol.pending, "created": _now()}])
                return f"{where}: interrupted snapshot {vol.pending} finished"
            self._settle(key, vol, size=vol.size)
            return f"{where}: interrupted snapshot {vol.pending} rolled back"
        if vol.state == "deleting-snapshot":
            others = [n for n in vol.snapshot_names() if n != vol.pending]
            driver.delete_snapshot(vol.project, vol.name, vol.pending, others, self.key(vol))
            self._settle(key, vol, size=vol.size,
                         snapshots=[x for x in vol.snapshots if x["name"] != vol.pending])
            return f"{where}: interrupted delete of snapshot {vol.pending} finished"
        if vol.state == "restoring" and isinstance(driver, CephPool):
            driver.restore(vol.project, vol.name, vol.pending)  # a rollback half done: redo
        size = driver.virtual_size(vol.project, vol.name, vol.type)  # resizing, restoring
        self._settle(key, vol, size=size)
        what = "resize" if vol.state == "resizing" else f"restore to {vol.pending}"
        return f"{where}: interrupted {what} settled at {format_size(size)}"



def public(vol: Volume) -> dict[str, Any]:
    """The fields of a volume a listing shows (not its owner process)."""
    return {"pool": vol.pool, "project": vol.project, "name": vol.name, "type": vol.type,
            "size": vol.size, "state": vol.state, "attached": vol.attached,
            "created": vol.created, "snapshots": vol.snapshots, "origin": vol.origin,
            "encrypted": encrypted(vol), "shared": vol.shared(), "holders": vol.holders(),
            "config": {**iolimits.show(Storage.io_limits_of(vol)),
                       **({SHARED: "true"} if vol.shared() else {})}}
