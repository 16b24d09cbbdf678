"""Checks shared by everything that reads tar members of an image.

A member name is accepted only as a relative path without ``..``; the root
of the tree is the empty string.  Device nodes and fifos are dropped (an
image never creates device nodes on the host: the OCI runtime provides
``/dev``); anything else that is not a file, directory, symlink or hardlink
is refused.
"""

from __future__ import annotations

import tarfile

from popek.errors import ImageError

MAX_ID = 2**32 - 2
_KINDS = {
    tarfile.REGTYPE: "file",
    tarfile.AREGTYPE: "file",
    tarfile.CONTTYPE: "file",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "skip",
    tarfile.BLKTYPE: "skip",
    tarfile.FIFOTYPE: "skip",
}


def member_path(raw: str, role: str = "member") -> str:
    """Return ``raw`` as a normalised relative path ("" for the root).

    Raises :class:`ImageError` naming the member for an absolute path or a
    ``..`` component.
    """
    if "\0" in raw:
        raise ImageError(f"tar {role} {raw!r} contains a NUL byte")
    if raw.startswith("/"):
        raise ImageError(f"tar {role} {raw!r} has an absolute path; only relative paths allowed")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageError(f"tar {role} {raw!r} has a '..' component; refusing to leave the root")
    return "/".join(parts)


def kind(name: str, type_flag: bytes) -> str:
    """Classify a member: "dir", "file", "symlink", "hardlink" or "skip" (device, fifo).

    Raises :class:`ImageError` for sparse files and any other type.
    """
    found = _KINDS.get(type_flag)
    if found is None:
        what = "a sparse file" if type_flag == b"S" else f"of unsupported type {type_flag!r}"
        raise ImageError(f"tar member {name!r} is {what}")
    return found


def info_kind(info: tarfile.TarInfo) -> str:
    """:func:`kind` for a :class:`tarfile.TarInfo` (which may be a PAX sparse file)."""
    if info.issparse():
        raise ImageError(f"tar member {info.name!r} is a sparse file")
    return kind(info.name, info.type)


def check_ids(
    name: str, uid: int, gid: int, uid_shift: int = 0, gid_shift: int = 0
) -> tuple[int, int]:
    """Return the member's (uid, gid) plus the shifts, refusing ids out of range."""
    new_uid, new_gid = uid + uid_shift, gid + gid_shift
    if min(uid, gid) < 0 or max(new_uid, new_gid) > MAX_ID:
        raise ImageError(
            f"tar member {name!r} has owner {uid}:{gid}, which is out of range "
            f"after a shift of {uid_shift}:{gid_shift}"
        )
    return new_uid, new_gid
