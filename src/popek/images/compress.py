"""Recognise and undo the compressions an imported tar may have (gzip, xz, zstd).

The kind is found from the first bytes, not the file name.  gzip and xz are
handled by the standard library; zstd by the ``zstd`` program (Python 3.11
has no zstd module), read through a pipe.

What a compressed file may expand to is bounded (:func:`bound`), so that a
"compression bomb" (a few MiB of gzip that inflate to terabytes) is refused
after :func:`bound` bytes instead of filling the disk: at most
:data:`MAX_RATIO` times the compressed size, but always :data:`FLOOR` (small
images compress well), and never more than :data:`CAP` in one import.  A
root file system compresses 2-5x with gzip and 3-8x with xz or zstd; only
files of zeros go beyond 100x (docs/ARCHITECTURE.md, images).
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
from popek.units import format_size

CHUNK = 1 << 20
#: the most a compressed file may expand to, as a multiple of its compressed size ...
MAX_RATIO = 100
#: ... but a file may always expand to this much ...
FLOOR = 256 << 20
#: ... and one import never to more than this, all its layers together
CAP = 32 << 30
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


def bound(compressed: int) -> int:
    """Return how many bytes a file of ``compressed`` bytes may decompress to (see above)."""
    return min(CAP, max(FLOOR, compressed * MAX_RATIO))


class TooLarge(ImageError):
    """A compressed file expanded past its bound (a compression bomb, or a too large image)."""


def decompress(src: Path, dst: Path, limit: int | None = None) -> FileEntry:
    """Write ``src`` uncompressed to ``dst``; return the size and SHA-256 of what was written.

    At most ``min(bound(size of src), limit)`` bytes are written: past that,
    :class:`TooLarge` (an :class:`ImageError`) is raised and ``dst`` is
    removed.  Raises :class:`ImageError` if ``src`` is corrupt or ``zstd`` is missing.
    """
    kind = sniff(src)
    compressed = src.stat().st_size
    most = bound(compressed) if kind != "none" else compressed
    if limit is not None:
        most = min(most, limit)
    try:
        if kind == "zstd":
            return _zstd(src, dst, most)
        with dst.open("wb") as out:
            if kind == "gzip":
                with gzip.open(src, "rb") as f:
                    return _copy_hashing(f, out, most, src.name, kind, compressed)
            if kind == "xz":
                with lzma.open(src, "rb") as f:
                    return _copy_hashing(f, out, most, src.name, kind, compressed)
            with src.open("rb") as f:
                return _copy_hashing(f, out, most, src.name, kind, compressed)
    except TooLarge:
        dst.unlink(missing_ok=True)
        raise
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise ImageError(f"cannot decompress {src.name} ({kind}): {exc}") from exc


class _Reader(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


def _too_large(name: str, kind: str, compressed: int, most: int) -> TooLarge:
    return TooLarge(
        f"{name} ({kind}, {format_size(compressed)} compressed) decompresses to more than "
        f"{format_size(most)}; refusing it as a compression bomb; allowed: at most "
        f"{MAX_RATIO}x the compressed size or {format_size(FLOOR)}, whichever is larger, "
        f"and {format_size(CAP)} for a whole import")


def _copy_hashing(f: _Reader, out: IO[bytes], most: int, name: str, kind: str,
                  compressed: int) -> FileEntry:
    digest = hashlib.sha256()
    size = 0
    # read one byte past the bound: a file of exactly ``most`` bytes is fine
    while chunk := f.read(min(CHUNK, most + 1 - size)):
        size += len(chunk)
        if size > most:
            raise _too_large(name, kind, compressed, most)
        digest.update(chunk)
        out.write(chunk)
    return FileEntry(sha256=digest.hexdigest(), size=size)


def _zstd(src: Path, dst: Path, most: int) -> FileEntry:
    tool = proc.tool("zstd")
    if tool is None:
        raise ImageError(f"{src.name} is zstd-compressed and the 'zstd' program is not installed")
    with subprocess.Popen([tool, "-d", "-q", "-c", str(src)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as child:
        assert child.stdout is not None and child.stderr is not None
        try:
            with dst.open("wb") as out:
                got = _copy_hashing(child.stdout, out, most, src.name, "zstd",
                                    src.stat().st_size)
        except BaseException:
            child.kill()
            raise
        err = child.stderr.read(4096).decode(errors="replace")
        if child.wait() != 0:
            raise ImageError(f"cannot decompress {src.name} (zstd): "
                             f"{err.strip() or f'exit code {child.returncode}'}")
    return got
