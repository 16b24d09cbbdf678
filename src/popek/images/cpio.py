"""Write a directory tree as a gzip-compressed newc cpio archive (an initramfs).

The archive is deterministic: entries in sorted path order, owner root:root,
a fixed modification time, and a gzip header without a time stamp.
"""

from __future__ import annotations

import gzip
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Node:
    """A device node to add to the archive (not present in the source tree)."""

    path: str
    mode: int  # full st_mode, e.g. stat.S_IFCHR | 0o600
    major: int
    minor: int


class _Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


class _Writer:
    def __init__(self, out: _Sink, mtime: int) -> None:
        self.out = out
        self.mtime = mtime
        self.ino = 0

    def entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self.ino += 1
        nlink = 2 if stat.S_ISDIR(mode) else 1
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, nlink, self.mtime, len(data), 0, 0, *rdev, len(encoded), 0)
        header = MAGIC + b"".join(b"%08X" % v for v in fields)
        self.out.write(header + encoded + _pad(len(header) + len(encoded)))
        self.out.write(data + _pad(len(data)))


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            yield base / name


def write_initramfs(root: Path, out: Path, nodes: tuple[Node, ...] = (), mtime: int = 0) -> None:
    """Pack ``root`` (plus device ``nodes``) into ``out`` as gzip-compressed newc cpio.

    Directories get mode 0755, executables 0755, other files 0644, whatever
    their mode on disk.
    """
    entries: dict[str, tuple[int, bytes, tuple[int, int]]] = {}
    for path in _walk(root):
        rel = path.relative_to(root).as_posix()
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            entries[rel] = (stat.S_IFLNK | 0o777, os.readlink(path).encode(), (0, 0))
        elif stat.S_ISDIR(st.st_mode):
            entries[rel] = (stat.S_IFDIR | 0o755, b"", (0, 0))
        elif stat.S_ISREG(st.st_mode):
            perm = 0o755 if st.st_mode & 0o111 else 0o644
            entries[rel] = (stat.S_IFREG | perm, path.read_bytes(), (0, 0))
    for node in nodes:
        entries[node.path.strip("/")] = (node.mode, b"", (node.major, node.minor))
    with out.open("wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz:
        writer = _Writer(gz, mtime)
        for name in sorted(entries, key=lambda n: n.split("/")):
            mode, data, rdev = entries[name]
            writer.entry(name, mode, data, rdev)
        writer.entry(TRAILER, 0)
