"""Requests on images: build, import, sign, delete."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from popek.core.service import NOT_AUDITED, Progress, Request, _noop
from popek.errors import PopekError

if TYPE_CHECKING:
    from popek.core.service import Core
    from popek.images import Image
    from popek.trust.imagesig import Verdict


def _sign(core: Core, image: Image, key: str, days: int | None = None) -> Verdict:
    """Sign ``image`` with ``key`` (default: this host's image key, made on first use)."""
    from popek.trust.imagesig import sign_image

    signer = key or core.trust.host_key("image")
    if days is None:
        return sign_image(core.trust, image, signer)
    return sign_image(core.trust, image, signer, days)


@dataclass(frozen=True)
class Built:
    """A built or imported image, and its signature (``None``: not signed)."""

    image: Image
    signature: Verdict | None


@dataclass(frozen=True)
class ImageBuild(Request[Built]):
    """Build image ``name`` from Debian packages, and sign it unless ``sign`` is false."""

    op = "image.build"
    shown = ("force", "sign", "key")
    name: str
    force: bool = False
    sign: bool = True
    key: str = ""
    progress: Progress = field(default=_noop, metadata=NOT_AUDITED, compare=False)

    def run(self, core: Core) -> Built:
        """Build (and sign) it."""
        image = core.images.build(self.name, progress=self.progress, force=self.force)
        return Built(image, _sign(core, image, self.key) if self.sign else None)


@dataclass(frozen=True)
class ImageImport(Request[Built]):
    """Import a root filesystem tarball or an OCI layout as image ``name`` (and sign it)."""

    op = "image.import"
    shown = ("file", "force", "sign", "key")
    file: str
    name: str
    force: bool = False
    sign: bool = True
    key: str = ""
    progress: Progress = field(default=_noop, metadata=NOT_AUDITED, compare=False)

    def target(self) -> str:
        """The file imported (as ``popek image import FILE NAME`` names it)."""
        return self.file

    def run(self, core: Core) -> Built:
        """Import (and sign) it."""
        from pathlib import Path

        image = core.images.import_file(Path(self.file), self.name, progress=self.progress,
                                        force=self.force)
        return Built(image, _sign(core, image, self.key) if self.sign else None)


@dataclass(frozen=True)
class ImageSign(Request["Verdict"]):
    """Sign image ``name``'s manifest with an image key for ``days`` days."""

    op = "image.sign"
    shown = ("key", "days")
    name: str
    key: str = ""
    days: int = 365

    def run(self, core: Core) -> Verdict:
        """Sign it."""
        return _sign(core, core.images.get(self.name), self.key, self.days)


@dataclass(frozen=True)
class ImageDelete(Request[None]):
    """Delete image ``name``: refused while instances use it; its container base goes too."""

    op = "image.delete"
    name: str

    def reconciles(self) -> list[str]:
        """Nothing: any record, running or not, keeps the image."""
        return []

    def run(self, core: Core) -> None:
        """Delete it, then the container base nothing uses any more."""
        users = core.instances.image_in_use(self.name)
        if users:
            raise PopekError(f"image {self.name!r} is used by instance(s) {', '.join(users)}; "
                             "delete them first")
        from popek.engines.container import rootfs

        core.images.delete(self.name)
        rootfs.prune()
