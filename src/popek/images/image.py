"""An image on disk: a directory with ``manifest.json`` and the files it lists."""

from __future__ import annotations

import hashlib
import stat
from dataclasses import dataclass
from pathlib import Path

from popek.errors import IntegrityError, InvalidInput
from popek.images.manifest import MANIFEST_NAME, FileEntry, Manifest

CHUNK = 1 << 20
ROLES = ("kernel", "initrd")


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

    def file(self, role: str) -> Path:
        """Return the absolute path of the file with ``role`` ("kernel" or "initrd").

        Raises :class:`InvalidInput` for an unknown role.
        """
        if role not in ROLES:
            raise InvalidInput(f"unknown image file role {role!r}; allowed: {', '.join(ROLES)}")
        fname: str = getattr(self.manifest, role)
        return (self.path / fname).absolute()

    def verify(self) -> None:
        """Check every file against the manifest (size, then SHA-256).

        Raises :class:`IntegrityError` for a missing, changed or unlisted file.
        """
        hint = "rebuild or re-import the image"
        for fname, want in sorted(self.manifest.files.items()):
            path = self.path / fname
            try:
                st = path.lstat()
            except FileNotFoundError:
                raise IntegrityError(
                    f"image '{self.name}': file '{fname}' is missing; {hint}"
                ) from None
            if not stat.S_ISREG(st.st_mode):
                raise IntegrityError(
                    f"image '{self.name}': file '{fname}' is not a regular file; {hint}"
                )
            if st.st_size != want.size:
                raise IntegrityError(
                    f"image '{self.name}': file '{fname}' has {st.st_size} bytes but the "
                    f"manifest records {want.size}; {hint}"
                )
            got = hash_file(path)
            if got != want:
                raise IntegrityError(
                    f"image '{self.name}': file '{fname}' has sha256 {got.sha256} but the "
                    f"manifest records {want.sha256}; {hint}"
                )
        extra = sorted(
            p.name
            for p in self.path.iterdir()
            if p.name != MANIFEST_NAME and p.name not in self.manifest.files
        )
        if extra:
            raise IntegrityError(
                f"image '{self.name}': file(s) not listed in the manifest: "
                f"{', '.join(repr(x) for x in extra)}; {hint}"
            )
