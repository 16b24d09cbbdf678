"""Read an OCI image layout (a directory or a tar of one), verifying every blob.

``index.json`` names manifests; popek takes the first linux manifest for
this host's architecture (or the only one), following one nested index.  The
manifest names a config and layers by digest; every blob is checked against
its descriptor's size and sha256 digest before it is used, and each
uncompressed layer against the config's ``rootfs.diff_ids``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from popek.errors import ImageError
from popek.images import members
from popek.images.process import Process

MAX_JSON = 4 << 20
CHUNK = 1 << 20
DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")
INDEX_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
MANIFEST_TYPES = frozenset(
    {
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    }
)
GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le"}
UNAME_ARCH = {v: k for k, v in GOARCH.items()}


class Layout(Protocol):
    """Read access to the files of an OCI layout by relative path."""

    def open(self, rel: str) -> IO[bytes]:
        """Open the regular file ``rel``; raise :class:`ImageError` if there is none."""
        ...


class DirLayout:
    """An OCI layout directory; no path component may be a symlink."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def open(self, rel: str) -> IO[bytes]:
        """Open ``rel`` under the layout directory without following symlinks."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.root, flags | os.O_DIRECTORY)
        try:
            parts = rel.split("/")
            for part in parts[:-1]:
                nxt = os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = nxt
            file_fd = os.open(parts[-1], flags, dir_fd=fd)
        except OSError as exc:
            raise ImageError(f"OCI layout {self.root}: cannot open {rel}: {exc.strerror}") from None
        finally:
            os.close(fd)
        if not stat.S_ISREG(os.fstat(file_fd).st_mode):
            os.close(file_fd)
            raise ImageError(f"OCI layout {self.root}: {rel} is not a regular file")
        return open(file_fd, "rb")  # noqa: SIM115 - the caller closes it


class TarLayout:
    """An OCI layout packed in an (uncompressed, seekable) tar."""

    def __init__(self, tar: tarfile.TarFile, label: str) -> None:
        self.tar = tar
        self.label = label
        self.files = {members.member_path(i.name): i for i in tar.getmembers() if i.isreg()}

    def open(self, rel: str) -> IO[bytes]:
        """Open the member ``rel`` of the layout tar."""
        info = self.files.get(rel)
        f = self.tar.extractfile(info) if info is not None else None
        if f is None:
            raise ImageError(f"OCI layout {self.label}: {rel} is missing or not a regular file")
        return f


@dataclass(frozen=True)
class Descriptor:
    """A validated OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    platform: dict[str, Any]

    @property
    def path(self) -> str:
        """The blob's path in the layout."""
        return "blobs/sha256/" + self.digest.removeprefix("sha256:")

    @classmethod
    def parse(cls, raw: object, what: str) -> Descriptor:
        """Validate a descriptor object; raise :class:`ImageError` naming ``what``."""
        if not isinstance(raw, dict):
            raise ImageError(f"OCI {what} descriptor is not an object")
        digest, size = raw.get("digest"), raw.get("size")
        if not isinstance(digest, str) or DIGEST_RE.fullmatch(digest) is None:
            raise ImageError(f"OCI {what} digest {digest!r} is not sha256:<64 hex digits>")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ImageError(f"OCI {what} size {size!r} is not a non-negative integer")
        plat = raw.get("platform")
        return cls(
            str(raw.get("mediaType", "")), digest, size, plat if isinstance(plat, dict) else {}
        )


@dataclass(frozen=True)
class OciImage:
    """What an OCI layout holds for this host: config facts and verified layer blobs."""

    manifest_digest: str
    layers: list[Descriptor]
    diff_ids: list[str]
    arch: str
    process: Process | None


def copy_blob(layout: Layout, desc: Descriptor, out: IO[bytes]) -> None:
    """Copy the blob of ``desc`` to ``out``, refusing a size or digest mismatch."""
    digest = hashlib.sha256()
    size = 0
    with layout.open(desc.path) as f:
        while chunk := f.read(CHUNK):
            size += len(chunk)
            if size > desc.size:
                break
            digest.update(chunk)
            out.write(chunk)
    _check(desc, size, digest.hexdigest())


def _check(desc: Descriptor, size: int, hexdigest: str) -> None:
    if size != desc.size:
        raise ImageError(
            f"OCI blob {desc.digest} has {'more than ' if size > desc.size else ''}{size} bytes "
            f"but its descriptor says {desc.size}; refusing it"
        )
    if f"sha256:{hexdigest}" != desc.digest:
        raise ImageError(
            f"OCI blob {desc.digest} has digest sha256:{hexdigest}; it does not match its "
            "descriptor, refusing it"
        )


def _json_blob(layout: Layout, desc: Descriptor, what: str) -> dict[str, Any]:
    if desc.size > MAX_JSON:
        raise ImageError(f"OCI {what} of {desc.size} bytes is larger than {MAX_JSON}")
    with layout.open(desc.path) as f:
        data = f.read(desc.size + 1)
    _check(desc, len(data), hashlib.sha256(data).hexdigest())
    return _parse_json(data, what)


def _parse_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageError(f"OCI {what} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ImageError(f"OCI {what} is not a JSON object")
    return doc


def _choose(descs: list[Descriptor], what: str) -> Descriptor:
    want = GOARCH.get(platform.machine(), platform.machine())
    for d in descs:
        if d.platform.get("os") == "linux" and d.platform.get("architecture") == want:
            return d
    if len(descs) == 1:
        return descs[0]
    found = ", ".join(
        f"{d.platform.get('os', '?')}/{d.platform.get('architecture', '?')}" for d in descs
    )
    raise ImageError(f"OCI {what} has no linux/{want} manifest (found: {found or 'none'})")


def read(layout: Layout) -> OciImage:
    """Resolve ``layout`` to the manifest for this host; verify the JSON blobs on the way."""
    with layout.open("oci-layout") as f:
        marker = _parse_json(f.read(MAX_JSON), "oci-layout file")
    if not isinstance(marker.get("imageLayoutVersion"), str):
        raise ImageError("OCI oci-layout file has no imageLayoutVersion")
    with layout.open("index.json") as f:
        doc = _parse_json(f.read(MAX_JSON), "index.json")
    what = "index.json"
    for _ in range(3):
        raw = doc.get("manifests")
        if not isinstance(raw, list) or not raw:
            raise ImageError(f"OCI {what} lists no manifests")
        desc = _choose([Descriptor.parse(m, f"{what} manifest") for m in raw], what)
        what = f"manifest {desc.digest}"
        doc = _json_blob(layout, desc, what)
        media = str(doc.get("mediaType", desc.media_type))
        if media not in INDEX_TYPES and "manifests" not in doc:
            return _image(layout, desc, doc)
    raise ImageError("OCI indexes are nested too deeply")


def _image(layout: Layout, desc: Descriptor, manifest: dict[str, Any]) -> OciImage:
    media = str(manifest.get("mediaType", desc.media_type))
    if media and media not in MANIFEST_TYPES:
        raise ImageError(f"OCI manifest {desc.digest} has unsupported media type {media!r}")
    config_desc = Descriptor.parse(manifest.get("config"), "config")
    config = _json_blob(layout, config_desc, "config")
    raw_layers = manifest.get("layers")
    if not isinstance(raw_layers, list):
        raise ImageError(f"OCI manifest {desc.digest} has no 'layers' list")
    layers = [Descriptor.parse(x, f"layer {n}") for n, x in enumerate(raw_layers)]
    for layer in layers:
        if "layer" not in layer.media_type and "rootfs.diff" not in layer.media_type:
            raise ImageError(f"OCI layer {layer.digest} has media type {layer.media_type!r}")
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
        raise ImageError("OCI config rootfs.diff_ids does not match the manifest's layers")
    arch = str(config.get("architecture") or GOARCH.get(platform.machine(), ""))
    return OciImage(
        manifest_digest=desc.digest,
        layers=layers,
        diff_ids=[str(d) for d in diff_ids],
        arch=UNAME_ARCH.get(arch, arch) or platform.machine(),
        process=_process(config.get("config")),
    )


def _process(raw: object) -> Process | None:
    if not isinstance(raw, dict):
        return None

    def strings(key: str) -> tuple[str, ...]:
        value = raw.get(key)
        if value is None:
            return ()
        if not isinstance(value, list):
            raise ImageError(f"OCI config {key} must be a list of strings")
        return tuple(value)

    process = Process(
        entrypoint=strings("Entrypoint"),
        cmd=strings("Cmd"),
        env=strings("Env"),
        working_dir=str(raw.get("WorkingDir") or ""),
    )
    return process if process != Process() else None
