"""The image store: one directory per image under ``images_dir()``.

Images belong to a project: the ``default`` project's are the directories of
``images_dir()`` (where every image was before projects had images: nothing
moves), another project's under ``images_dir()/.projects/PROJECT/`` (a name no
image can have).  A project sees its own and ``default``'s (:meth:`ImageStore.visible`,
:meth:`ImageStore.resolve`: its own first).

Builds happen in a hidden temporary directory next to the final one and are
published with an atomic rename, so a failed build leaves nothing behind.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from popek import paths
from popek.errors import AlreadyExists, ImageError, InvalidInput, NotFound
from popek.images.builder import BuildContext, Builder, BuildResult, Progress, quiet
from popek.images.image import Image, hash_file
from popek.images.manifest import MANIFEST_NAME, NAME_RULE, Manifest, valid_name
from popek.names import DEFAULT_PROJECT

#: builder name -> the builder, or "module:function" imported on first use (builders pull
#: in modules that commands such as launch never need)
BUILDERS: dict[str, Builder | str] = {
    "minimal": "popek.images.minimal:build",
    "debian": "popek.images.debian:build",
}


def _resolve(builder: Builder | str) -> Builder:
    if isinstance(builder, str):
        import importlib

        module, func = builder.split(":")
        resolved: Builder = getattr(importlib.import_module(module), func)
        return resolved
    return builder
LOCK_NAME = ".lock"
#: the directory of ``images_dir()`` holding the other projects' images
PROJECTS_DIR = ".projects"


class ImageStore:
    """Images stored under ``root``; builders download into ``cache``."""

    def __init__(self, root: Path | None = None, cache: Path | None = None,
                 project: str = DEFAULT_PROJECT, base: Path | None = None) -> None:
        """The images of ``project`` (``root``: where they are; ``base``: where ``default``'s
        are, ``root`` for ``default``)."""
        self.root = root if root is not None else paths.images_dir()
        self.cache = cache if cache is not None else paths.cache_dir()
        self.project = project
        self.base = base if base is not None else self.root

    # -- projects --------------------------------------------------------------
    def in_project(self, project: str) -> ImageStore:
        """The images of ``project`` (on the same host)."""
        if project == self.project:
            return self
        root = self.base if project == DEFAULT_PROJECT else self.base / PROJECTS_DIR / project
        return ImageStore(root, self.cache, project, self.base)

    def projects(self) -> list[str]:
        """The projects with a directory of images (``default`` first)."""
        d = self.base / PROJECTS_DIR
        others = sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []
        return [DEFAULT_PROJECT, *others]

    def visible(self, project: str) -> list[tuple[str, Image]]:
        """The images ``project`` sees, with their project: its own, then ``default``'s
        (shared read-only with every project)."""
        out = [(project, i) for i in self.in_project(project).list()]
        if project != DEFAULT_PROJECT:
            out += [(DEFAULT_PROJECT, i) for i in self.in_project(DEFAULT_PROJECT).list()]
        return out

    def resolve(self, name: str, project: str) -> tuple[str, Image]:
        """Image ``name`` as ``project`` names it, with its project: its own, else
        ``default``'s; NotFound lists those it sees."""
        own = self.in_project(project)
        if project == DEFAULT_PROJECT:
            return project, own.get(name)
        own._check_name(name)
        if (own.root / name).is_dir():
            return project, own.get(name)
        shared = self.in_project(DEFAULT_PROJECT)
        if (shared.root / name).is_dir():
            return DEFAULT_PROJECT, shared.get(name)
        raise own._missing(name)

    def every(self) -> list[Image]:
        """The images of every project (what must not be pruned)."""
        return [i for p in self.projects() for i in self.in_project(p).list()]

    def names(self) -> list[str]:
        """The names of the images here, broken ones too."""
        return self._names()

    def _names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if valid_name(p.name) and p.is_dir())

    def _missing(self, name: str) -> NotFound:
        """The error for image ``name`` that is not there: the images there are, and how to
        make one (built by its builder of that name, or any of them, or imported)."""
        available = ", ".join(self._names()) or "none"
        where = ""
        if self.project != DEFAULT_PROJECT:
            shared = self.in_project(DEFAULT_PROJECT)._names()
            available = ", ".join([*self._names(), *(f"{n} (default)" for n in shared)]) \
                or "none"
            where = f" in project {self.project!r}"
        how = (f"build it with popek image build {name}" if name in BUILDERS else
               f"build one with popek image build NAME ({', '.join(sorted(BUILDERS))}) or "
               "import one with popek image import FILE NAME")
        return NotFound(f"image '{name}' not found{where}; available: {available}; {how}")

    def list(self) -> list[Image]:
        """Return the images with a valid manifest, sorted by name (``get`` reports broken ones)."""
        images = []
        for name in self._names():
            try:
                images.append(self.get(name))
            except ImageError:
                continue
        return images

    def get(self, name: str) -> Image:
        """Return the image ``name``.

        Raises :class:`NotFound` if there is none, :class:`ImageError` if its
        manifest is missing or broken.  Does not hash the files: see
        :meth:`Image.verify`.
        """
        self._check_name(name)
        path = self.root / name
        if not path.is_dir():
            raise self._missing(name)
        try:
            text = (path / MANIFEST_NAME).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ImageError(
                f"image '{name}' is broken: {MANIFEST_NAME} is missing; delete and rebuild it"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ImageError(f"image '{name}': cannot read {MANIFEST_NAME}: {exc}") from exc
        try:
            manifest = Manifest.from_json(text)
        except ImageError as exc:
            raise ImageError(f"image '{name}' is broken: {exc}") from exc
        if manifest.name != name:
            raise ImageError(f"image '{name}' is broken: its manifest names it '{manifest.name}'")
        return Image(name=name, path=path.absolute(), manifest=manifest)

    def delete(self, name: str) -> None:
        """Delete the image ``name`` (broken or not); :class:`NotFound` if there is none."""
        self._check_name(name)
        path = self.root / name
        if not path.is_dir():
            raise self._missing(name)
        with self._lock():
            self._discard(path)

    def build(self, name: str, progress: Progress | None = None, force: bool = False) -> Image:
        """Build image ``name`` with the builder of that name and return it.

        Raises :class:`InvalidInput` for an unknown builder,
        :class:`AlreadyExists` if the image exists and ``force`` is false,
        :class:`ImageError` if the build fails (nothing is left behind).
        """
        builder = BUILDERS.get(name)
        if builder is None:
            raise InvalidInput(
                f"unknown image builder {name!r}; available: {', '.join(sorted(BUILDERS))}"
            )
        return self._publish(name, _resolve(builder), progress, force, "built")

    def import_file(
        self, path: Path, name: str, progress: Progress | None = None, force: bool = False
    ) -> Image:
        """Import ``path`` as the container image ``name`` and return it.

        ``path`` is a root filesystem tarball (.tar, .tar.gz/.tgz, .tar.xz,
        .tar.zst) or an OCI image layout (a directory or a tar of one).
        Raises :class:`InvalidInput` for a bad name or a missing source,
        :class:`AlreadyExists` if the image exists and ``force`` is false,
        :class:`ImageError` if the source is unreadable, unsafe or does not
        match its digests (nothing is left behind).
        """
        from popek.images.importer import importer

        self._check_name(name)
        return self._publish(name, importer(Path(path)), progress, force, "imported")

    def _publish(
        self, name: str, builder: Builder, progress: Progress | None, force: bool, done: str
    ) -> Image:
        """Run ``builder`` in a temporary directory, seal, verify and rename it into place."""
        report = progress or quiet
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock():
            final = self.root / name
            if final.exists() and not force:
                raise AlreadyExists(
                    f"image '{name}' already exists; delete it first or use --force"
                )
            work = Path(_mkdtemp(prefix=f".build-{name}-", dir=self.root))
            try:
                result = builder(BuildContext(out=work, cache=self.cache, progress=report))
                report("hashing files and writing the manifest")
                manifest = self._seal(work, name, result)
                Image(name=name, path=work, manifest=manifest).verify()
                if final.exists():
                    self._discard(final)
                os.rename(work, final)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
        report(f"image '{name}' {done}: {final}")
        return self.get(name)

    @staticmethod
    def _seal(work: Path, name: str, result: BuildResult) -> Manifest:
        files = {}
        for path in sorted(work.iterdir()):
            if not path.is_file() or path.is_symlink():
                raise ImageError(f"builder left {path.name!r}, which is not a regular file")
            path.chmod(0o644)
            files[path.name] = hash_file(path)
        manifest = Manifest(
            name=name,
            version=result.version,
            created=datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
            kernel=result.kernel,
            initrd=result.initrd,
            cmdline=result.cmdline,
            files=files,
            kernel_version=result.kernel_version,
            arch=result.arch,
            rootfs=result.rootfs,
            process=result.process,
        )
        (work / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        (work / MANIFEST_NAME).chmod(0o644)
        work.chmod(0o755)
        return manifest

    def _discard(self, path: Path) -> None:
        """Move ``path`` aside atomically, then remove it."""
        trash = Path(_mkdtemp(prefix=f".delete-{path.name}-", dir=self.root))
        os.rename(path, trash / path.name)
        shutil.rmtree(trash)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / LOCK_NAME).open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @staticmethod
    def _check_name(name: str) -> None:
        if not isinstance(name, str) or not valid_name(name):
            raise InvalidInput(f"image name {name!r} is not valid: {NAME_RULE}")


def _mkdtemp(prefix: str, dir: Path) -> str:
    import tempfile  # with random under it: not needed by launch

    return tempfile.mkdtemp(prefix=prefix, dir=dir)

