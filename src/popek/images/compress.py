"""Recognise and undo the compressions an imported tar may have (gzip, xz, zstd).

The kind is found from the first bytes, not the file name.  gzip and xz are
handled by the standard library; zstd by the ``zstd`` program (Python 3.11
has no zstd module).
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import subprocess
from pathlib import Path
from typing import IO, Protocol

from popek import proc
from popek.errors import ImageError
from popek.images.manifest import FileEntry

CHUNK = 1 << 20
MAGIC = {
    b"\x1f\x8b": "gzip",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
}


def sniff(path: Path) -> str:
    """Return "gzip", "xz", "zstd" or "none" from the first bytes of ``path``."""
    with path.open("rb") as f:
        head = f.read(8)
    for magic, kind in MAGIC.items():
        if head.startswith(magic):
            return kind
    return "none"


def decompress(src: Path, dst: Path) -> FileEntry:
    """Write ``src`` uncompressed to ``dst``; return the size and SHA-256 of what was written.

    Raises :class:`ImageError` if ``src`` is corrupt or ``zstd`` is missing.
    """
    kind = sniff(src)
    try:
        if kind == "zstd":
            return _zstd(src, dst)
        with dst.open("wb") as out:
            if kind == "gzip":
                with gzip.open(src, "rb") as f:
                    return _copy_hashing(f, out)
            if kind == "xz":
                with lzma.open(src, "rb") as f:
                    return _copy_hashing(f, out)
            with src.open("rb") as f:
                return _copy_hashing(f, out)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise ImageError(f"cannot decompress {src.name} ({kind}): {exc}") from exc


class _Reader(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


def _copy_hashing(f: _Reader, out: IO[bytes]) -> FileEntry:
    digest = hashlib.sha256()
    size = 0
    while chunk := f.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
        out.write(chunk)
    return FileEntry(sha256=digest.hexdigest(), size=size)


def _zstd(src: Path, dst: Path) -> FileEntry:
    tool = proc.tool("zstd")
    if tool is None:
        raise ImageError(f"{src.name} is zstd-compressed and the 'zstd' program is not installed")
    res = subprocess.run(
        [tool, "-d", "-q", "-f", "-o", str(dst), str(src)], capture_output=True, text=True
    )
    if res.returncode != 0:
        raise ImageError(f"cannot decompress {src.name} (zstd): {res.stderr.strip()}")
    digest = hashlib.sha256()
    size = 0
    with dst.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileEntry(sha256=digest.hexdigest(), size=size)
