"""The secret store: one random volume key per project, wrapped by a host key.

An encrypted volume (qcow2 with LUKS) is opened with its project's key.  The
key is 32 random bytes, handed to QEMU and ``qemu-img`` as 64 hex digits
(QEMU reads a LUKS passphrase as UTF-8 text) through a pipe or a FIFO, never
on a command line.  It is a random key, not a person's passphrase, so LUKS'
key stretching protects nothing here: volumes are made with a short PBKDF
time (see ``storage/dirpool.py``).

Layout, under ``POPEK_HOME/trust/secrets`` (every directory 0700, every file
0600, owned by root)::

    host.key            32 random bytes: the key that wraps the others
    volumes/PROJECT.key AES-256-GCM(host key, nonce, project key), with the
                        project's name as associated data

Each file is written whole under a temporary name, synced and linked into
place (``link`` fails when the name exists), so a reader never sees half a
key and two processes making the same project's key at once agree on one.

What the wrapping protects: a copy of ``volumes/`` without ``host.key`` (a
backup of part of the home, a file sent by mistake) tells nothing, and a
wrapped key moved to another project's name does not unwrap (the name is
authenticated).  What it does not: root on the host, or anyone holding the
whole of ``trust/secrets``, reads every key; a running VM's QEMU holds its
project's key in memory.  Without ``host.key`` the volumes cannot be opened
again: it belongs in the host's backups with the volumes.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path

from popek import paths
from popek.errors import TAMPERED, NotFound, PopekError
from popek.names import validate_name

HOST_KEY = "host.key"
KEY_BYTES = 32
NONCE_BYTES = 12
#: the version of a wrapped key file (its first byte)
_FORMAT = b"\x01"
_AAD = b"popek/volume-key/v1\n"


class SecretError(PopekError):
    """A key file is there but cannot be read or unwrapped (damaged, or moved)."""

    exit_code = TAMPERED


def secrets_dir(home: Path | None = None) -> Path:
    """``POPEK_HOME/trust/secrets`` (not made)."""
    return (home or paths.home()) / "trust" / "secrets"


def _mkdir(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)


def _write_new(path: Path, data: bytes) -> bool:
    """Write ``path`` whole (0600) unless it exists; whether this call wrote it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077:
            raise SecretError(f"{path} is readable by others (mode {st.st_mode & 0o777:o}): "
                              "popek does not use a key that may have leaked")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    finally:
        os.close(fd)


class Secrets:
    """The volume keys of the projects of one ``POPEK_HOME``."""

    def __init__(self, home: Path | None = None) -> None:
        self.dir = secrets_dir(home)

    def key_path(self, project: str) -> Path:
        """The file of ``project``'s wrapped key."""
        validate_name(project, "project name")
        return self.dir / "volumes" / f"{project}.key"

    def _host_key(self, create: bool) -> bytes:
        path = self.dir / HOST_KEY
        if create and not path.exists():
            _mkdir(self.dir)
            _write_new(path, secrets.token_bytes(KEY_BYTES))
        try:
            key = _read(path)
        except FileNotFoundError as exc:
            raise NotFound(f"the host key {path} is missing: the volume keys it wraps cannot "
                           "be read (restore it from a backup)") from exc
        if len(key) != KEY_BYTES:
            raise SecretError(f"the host key {path} is damaged ({len(key)} bytes, not "
                              f"{KEY_BYTES})")
        return key

    def volume_key(self, project: str, create: bool = False) -> str:
        """``project``'s volume key, as 64 hex digits; made now when ``create`` and there is
        none.  NotFound when there is none (its encrypted volumes cannot be opened),
        SecretError when its file does not unwrap."""
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        path = self.key_path(project)
        host = self._host_key(create)
        aad = _AAD + project.encode()
        if create and not path.exists():
            _mkdir(path.parent)
            nonce = secrets.token_bytes(NONCE_BYTES)
            sealed = AESGCM(host).encrypt(nonce, secrets.token_bytes(KEY_BYTES), aad)
            _write_new(path, _FORMAT + nonce + sealed)  # another's, when it won: read it
        try:
            blob = _read(path)
        except FileNotFoundError as exc:
            raise NotFound(f"project {project!r} has no volume key ({path} is missing): its "
                           "encrypted volumes cannot be opened (restore the file from a "
                           "backup)") from exc
        if blob[:1] != _FORMAT or len(blob) != 1 + NONCE_BYTES + KEY_BYTES + 16:
            raise SecretError(f"the volume key of project {project!r} ({path}) is damaged")
        try:
            raw = AESGCM(host).decrypt(blob[1:1 + NONCE_BYTES], blob[1 + NONCE_BYTES:], aad)
        except InvalidTag as exc:
            raise SecretError(f"the volume key of project {project!r} ({path}) does not "
                              "unwrap with this host's key: it was damaged, or made for "
                              "another project or host") from exc
        return raw.hex()

    def has_key(self, project: str) -> bool:
        """Whether ``project`` has a volume key file."""
        return self.key_path(project).exists()

    def remove(self, project: str) -> bool:
        """Remove ``project``'s key (its encrypted volumes are unreadable after);
        whether there was one."""
        path = self.key_path(project)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def purge(self) -> None:
        """Remove every key and the host key (``admin reset --purge``)."""
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.dir)
