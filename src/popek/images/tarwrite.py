"""Write deterministic root filesystem tars.

Members are written in sorted path order with numeric owners only (no user
or group names), the permission bits including setuid/setgid/sticky, and no
extended attributes.  Device nodes, fifos and sockets are never written:
the OCI runtime provides ``/dev``.  The root directory is the member ".".
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20


@dataclass
class PackStats:
    """What :func:`pack_tree` wrote and what it left out."""

    members: int = 0
    skipped: int = 0


def open_out(out: Path) -> tarfile.TarFile:
    """Open ``out`` for writing a PAX tar (UTF-8 names, undecodable bytes kept)."""
    return tarfile.open(out, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 - caller closes


def header(
    name: str,
    kind: bytes,
    mode: int,
    owner: tuple[int, int],
    mtime: int,
    linkname: str = "",
    size: int = 0,
) -> tarfile.TarInfo:
    """Return a normalised member header (``name`` "" is the root, written as ".")."""
    info = tarfile.TarInfo(name or ".")
    info.type = kind
    info.mode = mode & 0o7777
    info.uid, info.gid = owner
    info.uname = info.gname = ""
    info.mtime = mtime
    info.linkname = linkname
    info.size = size if kind == tarfile.REGTYPE else 0
    return info


def _walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Yield (relative path, lstat) depth first, in sorted path order; never follows links."""
    yield "", os.lstat(root)
    stack: list[Iterator[str]] = [iter(_listdir(root, ""))]
    while stack:
        rel = next(stack[-1], None)
        if rel is None:
            stack.pop()
            continue
        st = os.lstat(os.path.join(root, rel))
        yield rel, st
        if stat.S_ISDIR(st.st_mode):
            stack.append(iter(_listdir(root, rel)))


def _listdir(root: Path, rel: str) -> list[str]:
    with os.scandir(os.path.join(root, rel) if rel else root) as it:
        return [f"{rel}/{e.name}" if rel else e.name for e in sorted(it, key=lambda e: e.name)]


def pack_tree(
    root: Path, out: Path, mtime: int | None = None, owner: tuple[int, int] | None = None
) -> PackStats:
    """Pack the tree at ``root`` into the tar ``out``.

    ``mtime`` (if given) replaces every time stamp and ``owner`` (if given)
    every owner, for reproducible images; otherwise both are kept from the
    tree.  Hardlinked files become one file plus hardlink members.
    """
    stats = PackStats()
    first_name: dict[tuple[int, int], str] = {}
    with open_out(out) as tar:
        for rel, st in _walk(root):
            who = owner if owner is not None else (st.st_uid, st.st_gid)
            when = mtime if mtime is not None else int(st.st_mtime)
            mode = st.st_mode
            path = os.path.join(root, rel) if rel else str(root)
            if stat.S_ISDIR(mode):
                tar.addfile(header(rel, tarfile.DIRTYPE, mode, who, when))
            elif stat.S_ISLNK(mode):
                target = os.readlink(path)
                tar.addfile(header(rel, tarfile.SYMTYPE, mode, who, when, target))
            elif stat.S_ISREG(mode):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in first_name:
                    tar.addfile(header(rel, tarfile.LNKTYPE, mode, who, when, first_name[key]))
                else:
                    first_name[key] = rel
                    info = header(rel, tarfile.REGTYPE, mode, who, when, size=st.st_size)
                    with open(path, "rb") as data:
                        tar.addfile(info, data)
            else:
                stats.skipped += 1
                continue
            stats.members += 1
    return stats
