"""Backup and restore of this host's state: the store and the trust private keys.

A backup is one gzip-compressed tar file, mode 0600, written atomically (a
temporary file beside it, synced, then renamed over ``FILE``).  Its members,
in this order:

* ``popek-backup.json``: the manifest: ``format`` (``popek-backup``),
  ``version``, ``created`` (UTC), the store's ``revision`` and
  ``schema_version``, and the size and SHA-256 of every other member;
* ``state.db``: a consistent copy of the state store, taken online with
  SQLite's backup API (other popek processes may go on writing) and checked
  with ``PRAGMA integrity_check``;
* ``trust/private/NAME.key``: every private key of ``$POPEK_HOME/trust/private``
  (the directory :func:`popek.trust.keys.private_key_path` uses).

The audit log is not in it: it is an append-only history that a restore
never rolls back (see :func:`restore`).

:func:`restore` checks the whole file before it changes anything (a foreign
file is :class:`InvalidInput`, exit 2; a damaged one :class:`StoreDamaged`,
exit 7, naming it), refuses while an instance is not stopped (unless
``force``) or while another process has the store open, keeps the store it
replaces as ``state.db.pre-restore-TIME``, and swaps the new one in with a
rename.  This module imports nothing of popek above the state package.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import sqlite3
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from popek import paths
from popek.errors import InvalidInput, NotFound, PopekError, StoreDamaged, StoreError
from popek.state import store as st
from popek.state.schema import AUDIT_ALARM_KEY, AUDIT_HEAD_KEY, INSTANCES_PREFIX, OWNERS_PREFIX

FORMAT = "popek-backup"
VERSION = 1
MANIFEST = "popek-backup.json"
STATE = "state.db"
KEYS = "trust/private/"
_KEY_FILE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}\.key")
#: store keys that describe files a restore does not roll back (the audit log):
#: they are carried over from the store being replaced
CARRIED = (AUDIT_HEAD_KEY, AUDIT_ALARM_KEY)
_MAX_KEY = 64 * 1024


class RestoreRefused(PopekError):
    """A restore would disturb something live (running instances, another process)."""


@dataclass(frozen=True)
class BackupInfo:
    """What :func:`backup` wrote."""

    path: Path
    revision: int
    keys: list[str]
    size: int


@dataclass
class RestoreInfo:
    """What :func:`restore` did."""

    revision: int
    created: str
    keys: list[str] = field(default_factory=list)
    #: keys of this host that the backup does not hold: left in place
    kept_keys: list[str] = field(default_factory=list)
    #: where the replaced store was kept (``None``: there was none)
    previous: Path | None = None
    #: why the replaced store could not be read (then nothing was carried over)
    previous_damage: str = ""


def private_dir() -> Path:
    """The directory of this host's private keys (``$POPEK_HOME/trust/private``)."""
    return paths.home() / "trust" / "private"


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def _keep_as(path: Path, stamp: str) -> Path:
    """Hard-link ``path`` to ``PATH.pre-restore-STAMP`` (``-2``, ``-3``... if taken); return it."""
    for n in range(1, 1000):
        kept = path.with_name(f"{path.name}.pre-restore-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            os.link(path, kept)
        except FileExistsError:
            continue
        return kept
    raise StoreError(f"cannot keep {path}: 999 copies named {path.name}.pre-restore-{stamp}*")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write: Any) -> None:
    """Write ``path`` (mode 0600) through ``write(file)``: a synced temporary file, renamed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _private_keys() -> dict[str, bytes]:
    d = private_dir()
    keys: dict[str, bytes] = {}
    if d.is_dir():
        for p in sorted(d.iterdir()):
            if _KEY_FILE.fullmatch(p.name) and p.is_file() and not p.is_symlink():
                keys[p.name] = p.read_bytes()
    return keys


def backup(dest: Path, store_path: Path | None = None) -> BackupInfo:
    """Write a backup of the store (default :func:`popek.paths.state_db`) and the keys to ``dest``.

    ``dest`` is replaced atomically if it exists.  Raises
    :class:`InvalidInput` for an unusable ``dest`` and :class:`StoreDamaged`
    when the store does not pass ``PRAGMA integrity_check`` (no file is
    written then).
    """
    src = store_path or paths.state_db()
    if not src.is_file():
        raise NotFound(f"there is no state store at {src}: nothing to back up")
    if dest.is_dir():
        raise InvalidInput(f"backup file {dest} is a directory; give a file name")
    if not dest.parent.is_dir():
        raise InvalidInput(f"cannot write the backup {dest}: directory {dest.parent} "
                           "does not exist")
    with tempfile.TemporaryDirectory(dir=src.parent, prefix=".backup-") as tmp:
        copy = Path(tmp) / STATE
        store = st.SQLiteStore(src)
        try:
            revision = store.copy_to(copy)
        finally:
            store.close()
        members: list[tuple[str, bytes | Path]] = [(STATE, copy)]
        members += [(KEYS + name, data) for name, data in _private_keys().items()]
        files = {}
        for name, item in members:
            data = item.read_bytes() if isinstance(item, Path) else item
            files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        manifest = {"format": FORMAT, "version": VERSION,
                    "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "revision": revision, "schema_version": st.SCHEMA_VERSION, "files": files}

        def write(f: IO[bytes]) -> None:
            with tarfile.open(fileobj=f, mode="w:gz", compresslevel=6) as tar:
                for name, item in [(MANIFEST, json.dumps(manifest, indent=1).encode()),
                                   *members]:
                    data = item.read_bytes() if isinstance(item, Path) else item
                    info = tarfile.TarInfo(name)
                    info.size, info.mode, info.mtime = len(data), 0o600, int(
                        datetime.now(UTC).timestamp())
                    tar.addfile(info, io.BytesIO(data))

        try:
            _write_atomic(dest, write)
        except OSError as exc:
            raise InvalidInput(f"cannot write the backup {dest}: {exc.strerror or exc}") from exc
    return BackupInfo(dest, revision, [n[len(KEYS):] for n, _ in members[1:]],
                      dest.stat().st_size)


def save(dest: Path, data: bytes) -> BackupInfo:
    """Write ``data``, a backup another host made (a remote's answer to ``popek admin backup
    FILE REMOTE:``), to ``dest`` as :func:`backup` writes one (atomically, mode 0600), once
    the whole of it passed the checks :func:`restore` makes; what it holds."""
    if dest.is_dir():
        raise InvalidInput(f"backup file {dest} is a directory; give a file name")
    if not dest.parent.is_dir():
        raise InvalidInput(f"cannot write the backup {dest}: directory {dest.parent} "
                           "does not exist")
    with tempfile.TemporaryDirectory(prefix="popek-backup-") as tmp:
        received = Path(tmp) / "received"
        fd = os.open(received, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        manifest, _, keys = _read(received, Path(tmp))
    try:
        _write_atomic(dest, lambda f: f.write(data))
    except OSError as exc:
        raise InvalidInput(f"cannot write the backup {dest}: {exc.strerror or exc}") from exc
    return BackupInfo(dest, int(manifest.get("revision", 0)), sorted(keys), len(data))


def _foreign(path: Path, why: str) -> InvalidInput:
    return InvalidInput(f"{path} is not a popek backup ({why}); nothing was changed")


def _damaged(path: Path, why: str) -> StoreDamaged:
    return StoreDamaged(f"the backup {path} is damaged ({why}); nothing was changed")


def _read(path: Path, workdir: Path) -> tuple[dict[str, Any], Path, dict[str, bytes]]:
    """Check and unpack ``path``: (manifest, the store copy in ``workdir``, keys)."""
    if not path.is_file():
        raise InvalidInput(f"backup file {path} does not exist or is not a regular file")
    try:
        tar = tarfile.open(path, mode="r:*")  # noqa: SIM115 - closed by the ``with`` below
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise _foreign(path, f"not a tar archive: {exc}") from exc
    seen: dict[str, bytes] = {}
    db_copy = workdir / STATE
    try:
        with tar:
            first = tar.next()
            if first is None or first.name != MANIFEST or not first.isfile() \
                    or first.size > 1 << 20:
                raise _foreign(path, f"its first member is not {MANIFEST}")
            raw = tar.extractfile(first)
            try:
                manifest = json.loads(raw.read() if raw else b"")
            except ValueError as exc:
                raise _damaged(path, f"{MANIFEST} is not JSON") from exc
            if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
                raise _foreign(path, f"{MANIFEST} is not of format {FORMAT!r}")
            if manifest.get("version") != VERSION \
                    or manifest.get("schema_version") != st.SCHEMA_VERSION:
                raise InvalidInput(
                    f"backup {path} is format version {manifest.get('version')}, schema "
                    f"{manifest.get('schema_version')}; this popek reads version {VERSION}, "
                    f"schema {st.SCHEMA_VERSION}; nothing was changed")
            files = manifest.get("files")
            if not isinstance(files, dict) or STATE not in files:
                raise _damaged(path, f"{MANIFEST} lists no {STATE}")
            for member in tar:
                if member is first:
                    continue
                name = member.name
                if name not in files or name in seen or not member.isfile() or not (
                        name == STATE or (name.startswith(KEYS) and _KEY_FILE.fullmatch(
                            name[len(KEYS):]) and member.size <= _MAX_KEY)):
                    raise _damaged(path, f"unexpected member {name!r}")
                src = tar.extractfile(member)
                digest = hashlib.sha256()
                if name == STATE:
                    with open(db_copy, "xb") as out:
                        os.fchmod(out.fileno(), 0o600)
                        while chunk := (src.read(1 << 20) if src else b""):
                            digest.update(chunk)
                            out.write(chunk)
                        out.flush()
                        os.fsync(out.fileno())
                    seen[name] = b""
                else:
                    data = src.read() if src else b""
                    digest.update(data)
                    seen[name] = data
                want = files[name]
                if not isinstance(want, dict) or digest.hexdigest() != want.get("sha256"):
                    raise _damaged(path, f"{name} does not match its SHA-256 in {MANIFEST}")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise _damaged(path, f"cannot be read to its end: {exc}") from exc
    missing = sorted(set(files) - set(seen))
    if missing:
        raise _damaged(path, f"members missing: {', '.join(missing)}")
    problem = st.integrity_problem(db_copy)
    if problem:
        raise _damaged(path, f"its {STATE}: {problem}")
    keys = {n[len(KEYS):]: data for n, data in seen.items() if n != STATE}
    return manifest, db_copy, keys


def _not_stopped(store: st.SQLiteStore) -> list[str]:
    """Instances of the store that are not stopped, and intents in progress."""
    busy = []
    for kv in store.range(INSTANCES_PREFIX):
        try:
            state = json.loads(kv.value).get("state", "?")
        except (ValueError, AttributeError):
            state = "?"
        if state != "stopped":
            busy.append(f"{kv.key[len(INSTANCES_PREFIX):]} ({state})")
    busy += [f"{kv.key[len(OWNERS_PREFIX):]} (an operation in progress)"
             for kv in store.range(OWNERS_PREFIX)]
    return busy


def _lock_out_others(path: Path) -> int:
    """Take SQLite's dead-man-switch lock of ``path``: only free when nobody has it open.

    Every process with the store open holds a shared lock on byte 128 of its
    ``-shm`` file; an exclusive lock here means none does, and keeps new
    openers out (SQLite reports them busy) until the returned descriptor is
    closed.  Raises :class:`RestoreRefused` otherwise.
    """
    shm = path.with_name(path.name + "-shm")
    fd = os.open(shm, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 128)
    except OSError as exc:
        os.close(fd)
        raise RestoreRefused(
            f"another process has the state store {path} open (a popek command, the API "
            "server?); restore needs it to itself: let it finish or stop it, then retry") from exc
    return fd


def restore(src: Path, force: bool = False, store_path: Path | None = None) -> RestoreInfo:
    """Replace the store (default :func:`popek.paths.state_db`) and the keys from backup ``src``.

    Checks the whole backup first; refuses (:class:`RestoreRefused`) while
    an instance of the current store is not stopped, unless ``force``, and
    while another process has the store open.  The audit head and alarm are
    carried over from the current store (the audit log is not rolled back);
    when the current store is damaged they come from the backup, and the next
    audited command notes any records the backup does not know of.  The
    replaced store is kept as ``state.db.pre-restore-TIME``; private keys of
    the backup replace those of the same name (an older different one is kept
    as ``NAME.key.pre-restore-TIME``); other keys are left in place.
    """
    path = store_path or paths.state_db()
    path.parent.mkdir(parents=True, exist_ok=True, mode=st.HOME_MODE)
    stamp = _stamp()
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".restore-") as tmp:
        manifest, db_copy, keys = _read(src, Path(tmp))
        info = RestoreInfo(revision=int(manifest.get("revision", 0)),
                           created=str(manifest.get("created", "")))
        carried: dict[str, bytes | None] = {}
        st.close_stores_of(path)  # this process's own connections would hide from the lock below
        if path.exists():
            try:
                current = st.SQLiteStore(path)
            except StoreDamaged as exc:
                info.previous_damage = str(exc)
            else:
                try:
                    busy = _not_stopped(current)
                    if busy and not force:
                        raise RestoreRefused(
                            f"cannot restore while instances are not stopped: {', '.join(busy)}; "
                            "stop them first, or pass --force (their records then come from "
                            "the backup, and engines it does not know of keep running unmanaged)")
                    for key in CARRIED:
                        kv = current.get(key)
                        carried[key] = kv.value if kv else None
                    current.checkpoint()  # the copy kept below is then whole
                finally:
                    current.close()
        if carried:
            restored = st.SQLiteStore(db_copy)
            try:
                for key, value in carried.items():
                    if value is None:
                        restored.delete(key)
                    else:
                        restored.put(key, value)
                restored.checkpoint()
                info.revision = restored.revision()
            finally:
                restored.close()
        try:  # the copy is in rollback-journal mode (one file); the live store is WAL
            db = sqlite3.connect(str(db_copy), isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
            finally:
                db.close()  # the last connection: the WAL is checkpointed and removed
        except sqlite3.Error as exc:
            raise _damaged(src, f"its {STATE}: {exc}") from exc
        lock = _lock_out_others(path)
        try:
            if path.exists():
                info.previous = _keep_as(path, stamp)
            os.replace(db_copy, path)
            for suffix in ("-wal", "-shm"):  # the old store's: never to be applied to the new
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path.with_name(path.name + suffix))
            _fsync_dir(path.parent)
        except OSError as exc:
            raise StoreError(f"cannot put the restored store in place at {path}: {exc}") from exc
        finally:
            os.close(lock)
    _restore_keys(keys, stamp, info)
    return info


def _restore_keys(keys: dict[str, bytes], stamp: str, info: RestoreInfo) -> None:
    d = private_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d.parent, 0o700)
    os.chmod(d, 0o700)
    for name, data in sorted(keys.items()):
        target = d / name
        if target.is_file() and target.read_bytes() != data:
            _keep_as(target, stamp)
        _write_atomic(target, lambda f, data=data: f.write(data))
        info.keys.append(name)
    info.kept_keys = sorted(n for n in _private_keys() if n not in keys)
