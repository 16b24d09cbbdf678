"""Requests on images: build, import, sign, delete."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from popek.core.service import NOT_AUDITED, Progress, Request, _noop
from popek.errors import InvalidInput, PopekError
from popek.names import DEFAULT_PROJECT

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


def check_signer(core: Core, key: str) -> None:
    """Refuse, before anything is built, a ``key`` that cannot sign images on this host
    (``""``: the host's image key, made on first use): InvalidInput (a bad name), NotFound
    (no trusted key or no private key of that name), TrustError (revoked, expired, or not
    an image key)."""
    from popek.errors import NotFound
    from popek.trust.keys import private_key_path

    if not key:
        return
    path = private_key_path(key)  # InvalidInput for a name no key can have
    core.trust.check_key(core.trust.by_name(key).id, "image")
    if not path.exists():
        raise NotFound(f"no private key named {key!r} on this host (make one with: popek "
                       f"trust keygen {key} --role image)")


def check_may_make(core: Core, name: str, sign: bool) -> None:
    """Refuse, before anything is done, an image the core's identity may not make in the
    core's project: one it would sign with the host's keys (signing is the host admin's),
    or one that would take the place of ``default``'s image of that name under instances
    of the project already launched from it."""
    if sign and not core.identity.host_admin:
        raise InvalidInput(f"a project admin may not sign images with the host's keys: make "
                           f"{name!r} with --no-sign (\"sign\": false); the host admin signs it "
                           f"with popek image sign {name} --project {core.project}")
    if core.project == DEFAULT_PROJECT or (core.images.in_project(core.project).root
                                           / name).is_dir():
        return
    users = [u for u in core.instances.image_in_use(name) if u.startswith(f"{core.project}/")]
    if users:
        raise InvalidInput(f"instance(s) {', '.join(users)} of project {core.project!r} run "
                           f"the default project's image {name!r}: an image {name!r} of the "
                           "project would replace it at their next start; pick another name")


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
        """Build (and sign) it in the core's project."""
        check_may_make(core, self.name, self.sign)
        if self.sign:
            check_signer(core, self.key)
        image = core.images.in_project(core.project).build(self.name, progress=self.progress,
                                                           force=self.force)
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
        """Import (and sign) it in the core's project."""
        from pathlib import Path

        check_may_make(core, self.name, self.sign)
        image = core.images.in_project(core.project).import_file(
            Path(self.file), self.name, progress=self.progress, force=self.force)
        return Built(image, _sign(core, image, self.key) if self.sign else None)


@dataclass(frozen=True)
class ImageSign(Request["Verdict"]):
    """Sign image ``name`` (of the core's project) with an image key for ``days`` days."""

    op = "image.sign"
    shown = ("key", "days")
    name: str
    key: str = ""
    days: int = 365

    def run(self, core: Core) -> Verdict:
        """Sign it."""
        return _sign(core, core.images.in_project(core.project).get(self.name), self.key,
                     self.days)


@dataclass(frozen=True)
class ImageDelete(Request[None]):
    """Delete image ``name`` of the core's project (never ``default``'s from another): refused
    while instances use it; its container base goes too."""

    op = "image.delete"
    name: str

    def reconciles(self) -> list[str]:
        """Nothing: any record, running or not, keeps the image."""
        return []

    def run(self, core: Core) -> None:
        """Delete it, then the container base nothing uses any more."""
        store = core.images.in_project(core.project)
        users = core.instances.image_in_use(self.name, core.project)
        if users:
            raise PopekError(f"image {self.name!r} is used by instance(s) {', '.join(users)}; "
                             "delete them first")
        from popek.engines.container import rootfs

        store.delete(self.name)
        rootfs.prune()
