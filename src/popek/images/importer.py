"""Import a container image: a rootfs tarball or an OCI image layout.

Accepted sources: a tar of a root filesystem (uncompressed, gzip, xz or
zstd), an OCI image layout directory, or a tar (possibly compressed) of an
OCI layout.  Either way the result is one normalised, uncompressed
``rootfs.tar`` (see :mod:`popek.images.layers`); what compressed data may
expand to is bounded (:func:`popek.images.compress.bound`, and
:data:`~popek.images.compress.CAP` for all the layers of an image together),
and scratch files never outlive the import; OCI blobs are verified
against their digests and the config's ``Entrypoint``/``Cmd``/``Env``/
``WorkingDir`` are kept as the image's default process.
"""

from __future__ import annotations

import platform
import tarfile
import tempfile
from contextlib import ExitStack
from pathlib import Path

from popek.errors import ImageError, InvalidInput
from popek.images import compress, oci
from popek.images.builder import BuildContext, Builder, BuildResult
from popek.images.image import hash_file
from popek.images.layers import Tree
from popek.images.process import Process

ROOTFS_FILE = "rootfs.tar"


def importer(src: Path) -> Builder:
    """Return a builder that imports ``src`` (for the store's build-and-publish path)."""

    def build(ctx: BuildContext) -> BuildResult:
        return import_source(src, ctx)

    return build


def import_source(src: Path, ctx: BuildContext) -> BuildResult:
    """Import ``src`` into ``ctx.out`` as ``rootfs.tar``; scratch files go under ``ctx.cache``.

    Raises :class:`InvalidInput` for a missing source, :class:`ImageError`
    for anything unreadable, unsafe or not matching its digests.
    """
    if not src.exists():
        raise InvalidInput(f"import source {src} does not exist")
    ctx.cache.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="import-", dir=ctx.cache) as tmp,
        ExitStack() as stack,
    ):
        scratch = Path(tmp)
        try:
            if src.is_dir():
                ctx.progress(f"reading OCI layout directory {src}")
                return _from_oci(oci.DirLayout(src), scratch, ctx, stack)
            if not src.is_file():
                raise InvalidInput(f"import source {src} is neither a file nor a directory")
            plain = src
            kind = compress.sniff(src)
            if kind != "none":
                ctx.progress(f"decompressing {src.name} ({kind})")
                plain = scratch / "source.tar"
                compress.decompress(src, plain)
            tar = stack.enter_context(tarfile.open(plain, "r:"))
            names = {n.strip("/").removeprefix("./") for n in tar.getnames()}
            if {"oci-layout", "index.json"} <= names:
                ctx.progress(f"reading OCI layout archive {src.name}")
                return _from_oci(oci.TarLayout(tar, src.name), scratch, ctx, stack)
            ctx.progress(f"normalising root filesystem tarball {src.name}")
            tree = Tree()
            tree.add_layer(tar, 0, whiteouts=False)
            _write(tree, ctx)
            return _result(f"sha256:{hash_file(src).sha256}", platform.machine())
        except tarfile.TarError as exc:
            raise ImageError(f"cannot import {src.name}: not a valid tar archive ({exc})") from exc


def _from_oci(
    layout: oci.Layout, scratch: Path, ctx: BuildContext, stack: ExitStack
) -> BuildResult:
    image = oci.read(layout)
    tree = Tree()
    total = len(image.layers)
    expanded = 0  # what the layers decompressed to so far: compress.CAP for them all
    for n, (desc, diff_id) in enumerate(zip(image.layers, image.diff_ids, strict=True)):
        ctx.progress(f"layer {n + 1}/{total}: {desc.digest} ({desc.size} bytes)")
        blob = scratch / f"layer{n}.blob"
        with blob.open("wb") as out:
            oci.copy_blob(layout, desc, out)
        plain = scratch / f"layer{n}.tar"
        got = compress.decompress(blob, plain, limit=compress.CAP - expanded)
        expanded += got.size
        blob.unlink()
        if f"sha256:{got.sha256}" != diff_id:
            raise ImageError(
                f"OCI layer {desc.digest} uncompresses to sha256:{got.sha256} but the config's "
                f"diff_id is {diff_id}; refusing it"
            )
        layer_tar = stack.enter_context(tarfile.open(plain, "r:"))  # noqa: SIM115
        tree.add_layer(layer_tar, n, whiteouts=True)
    _write(tree, ctx)
    return _result(image.manifest_digest, image.arch, image.process)


def _write(tree: Tree, ctx: BuildContext) -> None:
    count = tree.write(ctx.out / ROOTFS_FILE)
    dropped = f", {len(tree.dropped)} device node(s)/fifo(s) dropped" if tree.dropped else ""
    ctx.progress(f"wrote {ROOTFS_FILE}: {count} members{dropped}")


def _result(version: str, arch: str, process: Process | None = None) -> BuildResult:
    return BuildResult(
        version=version,
        kernel="",
        initrd="",
        cmdline="",
        kernel_version="",
        arch=arch,
        rootfs=ROOTFS_FILE,
        process=process,
    )
