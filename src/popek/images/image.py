"""An image on disk: a directory with ``manifest.json`` and the files it lists.

An image is a VM image when it has a kernel and an initrd, a container image
when it has a root filesystem tar; it may be both.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from popek.errors import ImageError, IntegrityError, InvalidInput
from popek.images.manifest import MANIFEST_NAME, FileEntry, Manifest

CHUNK = 1 << 20
SIG_NAME = "manifest.sig"  # written by popek.trust.imagesig
ROLES = ("kernel", "initrd", "rootfs")
HINT = "rebuild or re-import the image"


class _HashingReader:
    """A read-only stream that hashes every byte it hands out, up to ``limit`` bytes."""

    def __init__(self, raw: IO[bytes], limit: int) -> None:
        self.raw = raw
        self.limit = limit
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.size += len(data)
        if self.size > self.limit:
            raise _TooLong
        self.digest.update(data)
        return data

    def drain(self) -> None:
        """Read (and hash) whatever the tar reader left after the end-of-archive marker."""
        while self.read(CHUNK):
            pass


class _TooLong(Exception):
    """The stream is longer than the manifest says."""


def hash_file(path: Path) -> FileEntry:
    """Return size and SHA-256 of ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileEntry(sha256=digest.hexdigest(), size=size)


@dataclass(frozen=True)
class Image:
    """A stored image: its name, directory and (validated) manifest."""

    name: str
    path: Path
    manifest: Manifest

    def has(self, role: str) -> bool:
        """Return whether the image has a file with ``role`` ("kernel", "initrd", "rootfs").

        Raises :class:`InvalidInput` for an unknown role.
        """
        if role not in ROLES:
            raise InvalidInput(f"unknown image file role {role!r}; allowed: {', '.join(ROLES)}")
        return bool(getattr(self.manifest, role))

    def kinds(self) -> list[str]:
        """Return what the image can run as: "vm" (kernel + initrd), "container" (rootfs)."""
        found = []
        if self.has("kernel") and self.has("initrd"):
            found.append("vm")
        if self.has("rootfs"):
            found.append("container")
        return found

    def file(self, role: str) -> Path:
        """Return the absolute path of the file with ``role`` ("kernel", "initrd", "rootfs").

        Raises :class:`InvalidInput` for an unknown role, :class:`ImageError` if
        the image has no such file (a container-only image has no kernel).
        """
        if not self.has(role):
            kinds = " and ".join(self.kinds()) or "no"
            raise ImageError(f"image '{self.name}' has no {role} file (it is a {kinds} image)")
        fname: str = getattr(self.manifest, role)
        return (self.path / fname).absolute()

    def extract_rootfs(self, dest: Path, uid_shift: int, gid_shift: int) -> None:
        """Extract the root filesystem into the new directory ``dest``, verified as it streams.

        The tar is read once; its size and SHA-256 are computed on the very
        bytes that are extracted and compared with the manifest at the end.
        Owners are shifted by ``uid_shift``/``gid_shift`` (when running as
        root; otherwise files belong to the caller).  Device nodes and fifos
        are skipped.  On any failure ``dest`` is removed entirely.

        Raises :class:`ImageError` for a missing rootfs, an existing ``dest``
        or an unsafe member (named in the message), :class:`IntegrityError`
        if the tar does not match the manifest.
        """
        path = self.file("rootfs")
        fname = self.manifest.rootfs
        want = self.manifest.files[fname]
        from popek.images.extract import Extractor  # only containers need the tar machinery
        from popek.images.tarread import TarStream

        ext = Extractor(dest, uid_shift, gid_shift, chown=os.geteuid() == 0)
        try:
            raw = path.open("rb")
        except OSError as exc:
            raise IntegrityError(
                f"image '{self.name}': cannot read '{fname}': {exc}; {HINT}"
            ) from exc
        with raw:
            reader = _HashingReader(raw, want.size)
            ext.start()
            try:
                try:
                    ext.run(TarStream(reader))
                    reader.drain()
                except ImageError as exc:
                    self._check_stream(reader, want, exc)
                    raise ImageError(f"image '{self.name}': {fname}: {exc}") from exc
                self._check_stream(reader, want, None)
                ext.finish()
            except _TooLong:
                ext.abort()
                raise IntegrityError(
                    f"image '{self.name}': file '{fname}' has more than {want.size} bytes but "
                    f"the manifest records {want.size}; {HINT}"
                ) from None
            except BaseException:
                ext.abort()
                raise

    def _check_stream(
        self, reader: _HashingReader, want: FileEntry, cause: BaseException | None,
        fname: str = "",
    ) -> None:
        """Raise :class:`IntegrityError` if the streamed bytes differ from ``want``."""
        if cause is not None:
            try:
                reader.drain()
            except _TooLong:
                raise
            except OSError:
                return
        fname = fname or self.manifest.rootfs
        if reader.size != want.size:
            raise IntegrityError(
                f"image '{self.name}': file '{fname}' has {reader.size} bytes but the "
                f"manifest records {want.size}; {HINT}"
            ) from cause
        got = reader.digest.hexdigest()
        if got != want.sha256:
            raise IntegrityError(
                f"image '{self.name}': file '{fname}' has sha256 {got} but the manifest "
                f"records {want.sha256}; {HINT}"
            ) from cause

    def copy_verified(self, role: str, dest: Path) -> None:
        """Copy the file ``role`` to the new file ``dest`` (mode 0444), hashing what is copied.

        The size and SHA-256 are computed on the very bytes written to
        ``dest``, which is what the engine then reads: swapping or editing the
        image file after this check changes nothing for the instance.
        Raises :class:`IntegrityError` (and leaves no ``dest``) on a mismatch.
        """
        src = self.file(role)
        fname: str = getattr(self.manifest, role)
        want = self.manifest.files[fname]
        try:
            raw = src.open("rb")
        except OSError as exc:
            raise IntegrityError(f"image '{self.name}': cannot read '{fname}': {exc}; "
                                 f"{HINT}") from exc
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        try:
            with raw, os.fdopen(fd, "wb") as out:
                reader = _HashingReader(raw, want.size)
                try:
                    while chunk := reader.read(CHUNK):
                        out.write(chunk)
                except _TooLong:
                    raise IntegrityError(
                        f"image '{self.name}': file '{fname}' has more than {want.size} bytes "
                        f"but the manifest records {want.size}; {HINT}") from None
                self._check_stream(reader, want, None, fname)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise

    def verify_file(self, fname: str) -> None:
        """Check the file ``fname`` against the manifest (size, then SHA-256).

        Raises :class:`IntegrityError` for a missing or changed file.
        """
        want = self.manifest.files[fname]
        path = self.path / fname
        try:
            st = path.lstat()
        except FileNotFoundError:
            raise IntegrityError(
                f"image '{self.name}': file '{fname}' is missing; {HINT}") from None
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(
                f"image '{self.name}': file '{fname}' is not a regular file; {HINT}")
        if st.st_size != want.size:
            raise IntegrityError(
                f"image '{self.name}': file '{fname}' has {st.st_size} bytes but the "
                f"manifest records {want.size}; {HINT}")
        got = hash_file(path)
        if got != want:
            raise IntegrityError(
                f"image '{self.name}': file '{fname}' has sha256 {got.sha256} but the "
                f"manifest records {want.sha256}; {HINT}")

    def verify(self) -> None:
        """Check every file against the manifest (size, then SHA-256).

        Raises :class:`IntegrityError` for a missing, changed or unlisted file.
        """
        for fname in sorted(self.manifest.files):
            self.verify_file(fname)
        extra = sorted(
            p.name
            for p in self.path.iterdir()
            if p.name not in (MANIFEST_NAME, SIG_NAME) and p.name not in self.manifest.files
        )
        if extra:
            raise IntegrityError(
                f"image '{self.name}': file(s) not listed in the manifest: "
                f"{', '.join(repr(x) for x in extra)}; {HINT}"
            )
