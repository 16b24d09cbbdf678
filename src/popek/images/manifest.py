"""The manifest of an image: what it contains and how to boot it.

A manifest is stored as ``manifest.json`` in the image directory.  It names
the kernel and initrd (for VMs) and/or the root filesystem tar (for
containers), the default kernel command line, optionally the default process
of a container, and the size and SHA-256 of every file of the image, so
that an image can be verified before anything runs it.

Format 1 (VM images only) is still read; new manifests are written as format
2, which adds ``rootfs`` and the optional ``process`` and lets ``kernel`` and
``initrd`` be "" in an image that has none.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from popek.errors import ImageError
from popek.images.process import Process

MANIFEST_NAME = "manifest.json"
FORMAT = 2
READABLE_FORMATS = (1, 2)

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
FILE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
NAME_RULE = "1-63 characters from a-z, 0-9, '.', '_', '-', starting with a letter or digit"

_STR_FIELDS = (
    "name",
    "version",
    "created",
    "kernel",
    "initrd",
    "cmdline",
    "kernel_version",
    "arch",
    "rootfs",
)
_ALL_FIELDS = frozenset((*_STR_FIELDS, "files", "format", "process"))
# Fields a manifest of each format must have ("rootfs" came with format 2).
_REQUIRED = {
    1: frozenset({*_STR_FIELDS, "files"} - {"rootfs"}),
    2: frozenset({*_STR_FIELDS, "files"}),
}


def valid_name(name: str) -> bool:
    """Return whether ``name`` is an acceptable image name."""
    return NAME_RE.fullmatch(name) is not None


@dataclass(frozen=True)
class FileEntry:
    """Size and SHA-256 (lowercase hex) of one file of an image."""

    sha256: str
    size: int

    def __post_init__(self) -> None:
        if not isinstance(self.sha256, str) or SHA256_RE.fullmatch(self.sha256) is None:
            raise ImageError(f"sha256 {self.sha256!r} is not 64 lowercase hex digits")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise ImageError(f"size {self.size!r} is not a non-negative integer")


@dataclass(frozen=True)
class Manifest:
    """Everything popek records about an image; validated on construction."""

    name: str
    version: str
    created: str
    kernel: str
    initrd: str
    cmdline: str
    files: dict[str, FileEntry]
    kernel_version: str
    arch: str
    rootfs: str = ""
    process: Process | None = None

    def __post_init__(self) -> None:
        for key in _STR_FIELDS:
            if not isinstance(getattr(self, key), str):
                raise ImageError(f"manifest field '{key}' must be a string")
        if not valid_name(self.name):
            raise ImageError(f"manifest name {self.name!r} is not valid: {NAME_RULE}")
        for key in ("version", "arch"):
            if not getattr(self, key).strip():
                raise ImageError(f"manifest field '{key}' is empty")
        if self.kernel and not self.kernel_version.strip():
            raise ImageError("manifest field 'kernel_version' is empty")
        if self.process is not None and not isinstance(self.process, Process):
            raise ImageError("manifest field 'process' is not a process record")
        _check_created(self.created)
        if not isinstance(self.files, dict):
            raise ImageError("manifest field 'files' must be an object")
        for fname, entry in self.files.items():
            _check_file_name(fname)
            if not isinstance(entry, FileEntry):
                raise ImageError(f"manifest entry for file '{fname}' is not a file entry")
        if bool(self.kernel) != bool(self.initrd):
            raise ImageError("manifest must name both a kernel and an initrd, or neither")
        if not self.kernel and not self.rootfs:
            raise ImageError(
                "manifest names neither a kernel and initrd (VM) nor a rootfs (container)"
            )
        for role in ("kernel", "initrd", "rootfs"):
            fname = getattr(self, role)
            if not fname:
                continue
            _check_file_name(fname)
            if fname not in self.files:
                raise ImageError(f"manifest {role} '{fname}' is not listed in 'files'")

    def to_json(self) -> str:
        """Return the manifest as stable, indented JSON (keys sorted)."""
        doc: dict[str, Any] = {key: getattr(self, key) for key in _STR_FIELDS}
        doc["format"] = FORMAT
        if self.process is not None:
            doc["process"] = self.process.to_doc()
        doc["files"] = {
            fname: {"sha256": e.sha256, "size": e.size} for fname, e in sorted(self.files.items())
        }
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse and validate a manifest; raise :class:`ImageError` saying what is wrong."""
        try:
            doc = json.loads(text)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ImageError(f"manifest is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise ImageError("manifest must be a JSON object")
        fmt = doc.get("format", 1)
        if type(fmt) is not int or fmt not in READABLE_FORMATS:
            expected = ", ".join(str(f) for f in READABLE_FORMATS)
            raise ImageError(f"manifest format {fmt!r} is not supported (expected {expected})")
        missing = sorted(_REQUIRED[fmt] - doc.keys())
        if missing:
            raise ImageError(f"manifest lacks field(s): {', '.join(missing)}")
        unknown = sorted(doc.keys() - _ALL_FIELDS)
        if fmt == 1:
            unknown = sorted({*unknown, *({"rootfs", "process"} & doc.keys())})
        if unknown:
            raise ImageError(f"manifest has unknown field(s): {', '.join(unknown)}")
        raw_files = doc["files"]
        if not isinstance(raw_files, dict):
            raise ImageError("manifest field 'files' must be an object")
        files: dict[str, FileEntry] = {}
        for fname, raw in raw_files.items():
            if not isinstance(raw, dict) or set(raw) != {"sha256", "size"}:
                raise ImageError(
                    f"manifest entry for file {fname!r} must be an object with 'sha256' and 'size'"
                )
            try:
                files[fname] = FileEntry(sha256=raw["sha256"], size=raw["size"])
            except ImageError as exc:
                raise ImageError(f"manifest entry for file {fname!r}: {exc}") from exc
        values = {key: doc[key] for key in _STR_FIELDS if key in doc}
        process = None
        if doc.get("process") is not None:
            try:
                process = Process.from_doc(doc["process"])
            except ImageError as exc:
                text = str(exc)
                raise ImageError(
                    text if text.startswith("manifest") else f"manifest {text}"
                ) from exc
        return cls(files=files, process=process, **values)


def _check_file_name(fname: object) -> None:
    if not isinstance(fname, str) or FILE_RE.fullmatch(fname) is None or fname == MANIFEST_NAME:
        raise ImageError(
            f"manifest file name {fname!r} is not valid: a plain file name in the image "
            f"directory (letters, digits, '.', '_', '+', '-'), not {MANIFEST_NAME}"
        )


def _check_created(created: str) -> None:
    try:
        when = datetime.fromisoformat(created)
    except ValueError as exc:
        raise ImageError(f"manifest 'created' {created!r} is not an ISO 8601 time") from exc
    if when.utcoffset() != timedelta(0):
        raise ImageError(f"manifest 'created' {created!r} must be in UTC (end with 'Z' or +00:00)")
