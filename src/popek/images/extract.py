"""Extract a root filesystem tar safely, with ownership shifted for a user namespace.

Every file is created relative to an open directory descriptor, and every
directory on the way is opened with ``O_NOFOLLOW``: a symlink in the archive
(or any non-directory) can never redirect a later member outside the
destination; such a member is refused.  Members are never replaced (a name
that appears twice is refused, except a directory repeated as a directory),
so the cached directory descriptors always name what they named when opened.
Device nodes and fifos are skipped.  Directories are created 0700 and get
their recorded mode and time only in :meth:`Extractor.finish`, after all
their children exist.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

from popek.errors import ImageError
from popek.images import members
from popek.images.tarread import Member, TarStream

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
CHUNK = 1 << 20
MAX_OPEN_DIRS = 256


class Extractor:
    """Writes the members of one tar stream under ``dest`` (which must not exist)."""

    def __init__(self, dest: Path, uid_shift: int, gid_shift: int, chown: bool) -> None:
        for what, value in (("uid_shift", uid_shift), ("gid_shift", gid_shift)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ImageError(f"{what} {value!r} is not an integer")
            if not 0 <= value <= members.MAX_ID:
                raise ImageError(f"{what} {value} is out of range 0..{members.MAX_ID}")
        self.dest = dest
        self.uid_shift = uid_shift
        self.gid_shift = gid_shift
        self.chown = chown
        self.fds: dict[str, int] = {}
        self.seen: dict[str, str] = {}  # member path -> kind
        self.dirs: dict[str, tuple[int, int | None]] = {}  # dir -> (mode, mtime ns)
        self.skipped: list[str] = []

    # -- life cycle -----------------------------------------------------------------

    def start(self) -> None:
        """Create ``dest`` (0700, owned by the shifted root)."""
        if os.path.lexists(self.dest):
            raise ImageError(f"extraction target {self.dest} already exists")
        try:
            os.mkdir(self.dest, 0o700)
        except OSError as exc:
            raise ImageError(f"cannot create extraction target {self.dest}: {exc}") from exc
        fd = os.open(self.dest, DIR_FLAGS)
        self.fds[""] = fd
        self._own(fd, self.uid_shift, self.gid_shift)
        self.dirs[""] = (0o755, None)

    def run(self, tar: TarStream) -> None:
        """Extract every member of ``tar`` in order."""
        for info in tar:
            try:
                self._member(tar, info)
            except OSError as exc:
                raise ImageError(f"cannot extract tar member {info.name!r}: {exc}") from exc

    def finish(self) -> None:
        """Give directories their modes and times (deepest first), then close them."""
        try:
            for rel in sorted(self.dirs, key=lambda r: r.count("/") + bool(r), reverse=True):
                mode, mtime = self.dirs[rel]
                fd = self._dir(rel, rel or ".")
                os.chmod(fd, mode)
                if mtime is not None:
                    os.utime(fd, ns=(mtime, mtime))
        finally:
            self._close()

    def abort(self) -> None:
        """Close everything and remove ``dest`` entirely."""
        self._close()
        if os.path.lexists(self.dest):
            _make_writable(self.dest)
            shutil.rmtree(self.dest, ignore_errors=True)

    # -- members --------------------------------------------------------------------

    def _member(self, tar: TarStream, info: Member) -> None:
        rel = members.member_path(info.name)
        what = members.kind(info.name, info.type)
        if what == "skip":
            self.skipped.append(rel)
            return
        uid, gid = members.check_ids(info.name, info.uid, info.gid, self.uid_shift, self.gid_shift)
        mode = info.mode & 0o7777
        mtime = int(info.mtime * 1_000_000_000)
        if what == "dir":
            self._mkdir(rel, info.name, uid, gid, mode, mtime)
            return
        if rel == "" or rel in self.seen or rel in self.dirs:
            raise ImageError(f"tar member {info.name!r} appears twice or replaces a directory")
        pfd, base = self._parent(rel, info.name)
        if what == "file":
            fd = os.open(base, FILE_FLAGS, 0o600, dir_fd=pfd)
            with open(fd, "wb", closefd=True) as out:
                while chunk := tar.read(CHUNK):
                    out.write(chunk)
                self._own(fd, uid, gid)
                os.chmod(fd, mode)  # after chown: chown clears setuid/setgid
                os.utime(fd, ns=(mtime, mtime))
        elif what == "symlink":
            os.symlink(info.linkname, base, dir_fd=pfd)
            if self.chown:
                os.chown(base, uid, gid, dir_fd=pfd, follow_symlinks=False)
            os.utime(base, ns=(mtime, mtime), dir_fd=pfd, follow_symlinks=False)
        else:
            target = members.member_path(info.linkname, f"member {info.name!r}: hardlink target")
            if self.seen.get(target) not in ("file", "symlink", "hardlink"):
                raise ImageError(
                    f"tar member {info.name!r} is a hardlink to {info.linkname!r}, which is "
                    "not a file extracted before it"
                )
            tfd, tbase = self._parent(target, info.name)
            os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        self.seen[rel] = what

    def _mkdir(self, rel: str, name: str, uid: int, gid: int, mode: int, mtime: int) -> None:
        if rel in self.seen and self.seen[rel] != "dir":
            raise ImageError(f"tar member {name!r} appears twice with different types")
        if rel and rel not in self.dirs:
            pfd, base = self._parent(rel, name)
            try:
                os.mkdir(base, 0o700, dir_fd=pfd)
            except FileExistsError:
                raise ImageError(f"tar member {name!r} appears twice") from None
        fd = self._dir(rel, name)
        self._own(fd, uid, gid)
        self.dirs[rel] = (mode, mtime)
        self.seen[rel] = "dir"

    # -- directories ----------------------------------------------------------------

    def _parent(self, rel: str, name: str) -> tuple[int, str]:
        parent, _, base = rel.rpartition("/")
        return self._dir(parent, name), base

    def _dir(self, rel: str, name: str) -> int:
        """Return an fd of directory ``rel``, creating missing parents (mode 0755)."""
        fd = self.fds.get(rel)
        if fd is not None:
            return fd
        if len(self.fds) >= MAX_OPEN_DIRS:
            self._close(keep_root=True)
        parent, _, base = rel.rpartition("/")
        pfd = self._dir(parent, name)
        try:
            fd = os.open(base, DIR_FLAGS, dir_fd=pfd)
        except FileNotFoundError:
            os.mkdir(base, 0o700, dir_fd=pfd)
            fd = os.open(base, DIR_FLAGS, dir_fd=pfd)
            self._own(fd, self.uid_shift, self.gid_shift)
            self.dirs[rel] = (0o755, None)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            raise ImageError(
                f"tar member {name!r} lies under {rel!r}, which is a symlink or not a "
                "directory; refusing to write through it"
            ) from None
        self.fds[rel] = fd
        return fd

    def _own(self, fd: int, uid: int, gid: int) -> None:
        """Give ``fd`` the (already shifted) owner ``uid:gid`` when chowning."""
        if self.chown:
            os.fchown(fd, uid, gid)

    def _close(self, keep_root: bool = False) -> None:
        for rel, fd in list(self.fds.items()):
            if keep_root and rel == "":
                continue
            os.close(fd)
            del self.fds[rel]


def _make_writable(root: Path) -> None:
    """Let the owner write every directory under ``root`` (for removal as non-root)."""
    for dirpath, dirnames, _ in os.walk(root):
        for d in (dirpath, *(os.path.join(dirpath, n) for n in dirnames)):
            try:
                st = os.lstat(d)
                if stat.S_ISDIR(st.st_mode):
                    os.chmod(d, st.st_mode | 0o700)
            except OSError:
                continue
