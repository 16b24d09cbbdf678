"""Merge tar layers into one normalised root filesystem tar.

A plain rootfs tarball is one layer; an OCI image is several, where a later
layer's ``.wh.NAME`` removes ``NAME`` from the layers below and
``.wh..wh..opq`` hides everything the layers below put in its directory.
Every member name is checked (no absolute paths, no ``..``), device nodes
and fifos are dropped, and a member that lies under a symlink or a file of
the merged tree is refused.  The result is written in sorted order with
numeric owners (see :mod:`popek.images.tarwrite`).
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from popek.errors import ImageError
from popek.images import members, tarwrite

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


@dataclass(eq=False)
class Entry:
    """One path of the merged tree and where its header and data come from."""

    kind: str  # "dir", "file", "symlink", "hardlink"
    info: tarfile.TarInfo
    source: tarfile.TarFile | None  # None for a directory nobody listed
    layer: int
    target: Entry | None = None  # a hardlink's file


@dataclass
class Tree:
    """The merged tree: path ("" = root) -> entry."""

    entries: dict[str, Entry] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)

    def add_layer(self, tar: tarfile.TarFile, layer: int, whiteouts: bool) -> None:
        """Apply the members of ``tar`` (seekable, kept open until :meth:`write`)."""
        for info in tar:
            rel = members.member_path(info.name)
            parent, _, base = rel.rpartition("/")
            if whiteouts and base.startswith(WHITEOUT):
                self._whiteout(info.name, parent, base, layer)
                continue
            what = members.info_kind(info)
            if what == "skip":
                self.dropped.append(rel)
                continue
            members.check_ids(info.name, info.uid, info.gid)
            if rel == "" and what != "dir":
                raise ImageError(f"tar member {info.name!r} replaces the root with a non-directory")
            old = self.entries.get(rel)
            if old is not None and not (what == "dir" and old.kind == "dir"):
                self._remove(rel, below=None)
            target = None
            if what == "hardlink":
                target = self._link_target(info)
            self.entries[rel] = Entry(what, info, tar, layer, target)

    def _whiteout(self, name: str, parent: str, base: str, layer: int) -> None:
        if base == OPAQUE:
            self._remove(parent, below=layer, keep_self=True)
            return
        hidden = base[len(WHITEOUT) :]
        if hidden in ("", ".", ".."):
            raise ImageError(f"tar member {name!r} is a whiteout of an invalid name")
        self._remove(f"{parent}/{hidden}" if parent else hidden, below=layer)

    def _remove(self, rel: str, below: int | None, keep_self: bool = False) -> None:
        """Remove ``rel`` and what lies under it (only entries of layers < ``below``)."""
        prefix = f"{rel}/" if rel else ""
        doomed = [
            p
            for p, e in self.entries.items()
            if ((p == rel and not keep_self) or (p.startswith(prefix) and p != rel))
            and (below is None or e.layer < below)
        ]
        for p in doomed:
            del self.entries[p]

    def _link_target(self, info: tarfile.TarInfo) -> Entry:
        target = self.entries.get(
            members.member_path(info.linkname, f"member {info.name!r}: hardlink target")
        )
        if target is None or target.kind not in ("file", "hardlink"):
            raise ImageError(
                f"tar member {info.name!r} is a hardlink to {info.linkname!r}, which is not "
                "a file listed before it"
            )
        return target.target if target.target is not None else target

    def _check_parents(self) -> None:
        """Refuse entries under a non-directory; add directories nobody listed."""
        for rel in list(self.entries):
            parts = rel.split("/")
            for depth in range(len(parts) - 1, -1, -1):
                parent = "/".join(parts[:depth])
                entry = self.entries.get(parent)
                if entry is None:
                    self.entries[parent] = _implicit_dir(parent)
                    continue
                if entry.kind != "dir":
                    raise ImageError(
                        f"tar member {rel!r} lies under {parent!r}, which is a {entry.kind}, "
                        "not a directory"
                    )
                break  # an existing directory's own parents were checked with it

    def write(self, out: Path) -> int:
        """Write the merged tree to ``out``; return the number of members."""
        if not self.entries:
            raise ImageError("the archive has no files")
        self._check_parents()
        written: dict[int, str] = {}  # id(file entry) -> the name that carries its data
        names = sorted(self.entries, key=lambda n: n.split("/"))
        with tarwrite.open_out(out) as tar:
            for rel in names:
                e = self.entries[rel]
                i = e.info
                owner = (i.uid, i.gid)
                if e.kind == "dir":
                    tar.addfile(tarwrite.header(rel, tarfile.DIRTYPE, i.mode, owner, int(i.mtime)))
                elif e.kind == "symlink":
                    hdr = tarwrite.header(
                        rel, tarfile.SYMTYPE, i.mode, owner, int(i.mtime), i.linkname
                    )
                    tar.addfile(hdr)
                else:
                    self._write_file(tar, rel, e.target or e, written)
        return len(names)

    @staticmethod
    def _write_file(tar: tarfile.TarFile, rel: str, data: Entry, written: dict[int, str]) -> None:
        i = data.info
        owner, mtime = (i.uid, i.gid), int(i.mtime)
        first = written.get(id(data))
        if first is not None:
            tar.addfile(tarwrite.header(rel, tarfile.LNKTYPE, i.mode, owner, mtime, first))
            return
        written[id(data)] = rel
        src = data.source.extractfile(i) if data.source is not None else None
        if src is None:
            raise ImageError(f"tar member {i.name!r} has no data")
        with src:
            tar.addfile(
                tarwrite.header(rel, tarfile.REGTYPE, i.mode, owner, mtime, size=i.size), src
            )


def _implicit_dir(rel: str) -> Entry:
    info = tarfile.TarInfo(rel or ".")
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
    return Entry("dir", info, None, -1)
