"""Kernel calls for a container's root filesystem: id-mapped mounts and overlayfs.

An id-mapped mount (Linux 5.12; overlayfs takes one as a layer since 5.19)
shows a directory tree with its owners shifted, without touching the files:
one root-owned, read-only base tree per image serves every container, each
seeing it owned by its own unprivileged id range.  The calls are the new
mount API (``open_tree``, ``mount_setattr``, ``move_mount``), which the
Python standard library does not wrap, so they go through libc's
``syscall`` with the x86-64 numbers.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from popek.errors import EngineError

SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
AT_FDCWD = -100
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC = 0x1, os.O_CLOEXEC
AT_EMPTY_PATH, AT_RECURSIVE = 0x1000, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
MOUNT_ATTR_IDMAP = 0x100000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
CLONE_NEWUSER = 0x10000000
MNT_DETACH = 0x2
MS_PRIVATE = 1 << 18
NEEDS = "Linux 5.19 or later (id-mapped mounts as overlayfs layers)"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _fail(what: str) -> EngineError:
    err = ctypes.get_errno()
    return EngineError(f"{what}: {os.strerror(err)} (containers need {NEEDS}, and "
                       "POPEK_HOME on a file system that supports id-mapped mounts: ext4, "
                       "xfs, btrfs or tmpfs)")


def userns(uid: int, gid: int, count: int) -> int:
    """Return an fd of a new user namespace mapping ids 0..count-1 to uid/gid onwards.

    A short-lived child unshares its user namespace; this process (root in
    the initial namespace) writes its maps and keeps a handle on it.
    """
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    done_r, done_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            # keep only the two pipe ends: an inherited descriptor (a client's
            # connection, the parent's end of these pipes) must not outlive the parent's use
            low, high = sorted((ready_w, done_r))
            os.closerange(3, low)
            os.closerange(low + 1, high)
            os.closerange(high + 1, os.sysconf("SC_OPEN_MAX"))
            code = 1 if _libc.unshare(CLONE_NEWUSER) != 0 else 0
            os.write(ready_w, b"1" if code == 0 else b"0")
            os.read(done_r, 1)
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(done_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise EngineError("cannot create a user namespace for the id map "
                              "(user.max_user_namespaces is 0?)")
        for kind, first in (("uid_map", uid), ("gid_map", gid)):
            with open(f"/proc/{pid}/{kind}", "w") as f:
                f.write(f"0 {first} {count}\n")
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(done_w)
        os.waitpid(pid, 0)


def mount_idmapped(source: str, target: str, userns_fd: int) -> None:
    """Mount ``source`` on ``target`` read-only, without devices, owners mapped by ``userns_fd``."""
    fd = _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(source),
                       OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE)
    if fd < 0:
        raise _fail(f"open_tree {source}")
    try:
        attr = struct.pack("QQQQ", MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY | MOUNT_ATTR_NODEV, 0, 0,
                           userns_fd)
        if _libc.syscall(SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH | AT_RECURSIVE, attr,
                         len(attr)) != 0:
            raise _fail(f"id-mapping {source}")
        if _libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, os.fsencode(target),
                         MOVE_MOUNT_F_EMPTY_PATH) != 0:
            raise _fail(f"mounting {source} on {target}")
    finally:
        os.close(fd)


def mount_overlay(lower: str, upper: str, work: str, target: str) -> None:
    """Mount an overlay of ``lower`` (read-only) and ``upper`` (the writes) on ``target``."""
    for p in (lower, upper, work):
        if "," in p or ":" in p:
            raise EngineError(f"overlay layer path {p!r} has a ',' or ':'")
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    if _libc.mount(b"overlay", os.fsencode(target), b"overlay", 0, os.fsencode(opts)) != 0:
        raise _fail(f"mounting the overlay on {target}")


def make_private(target: str) -> None:
    """Make the mount on ``target`` private: its copies in other mount namespaces (a
    container's, made while the runtime starts it) no longer receive its mount and
    unmount events, nor it theirs."""
    if _libc.mount(None, os.fsencode(target), None, MS_PRIVATE, None) != 0:
        raise _fail(f"making the mount on {target} private")


def unmount(target: str) -> None:
    """Detach every mount on ``target`` (lazily: busy users keep theirs until done)."""
    for _ in range(8):
        if _libc.umount2(os.fsencode(target), MNT_DETACH) != 0:
            if ctypes.get_errno() in (errno.EINVAL, errno.ENOENT):
                return  # not (or no longer) a mount point
            raise _fail(f"unmounting {target}")
    raise EngineError(f"{target}: more than 8 mounts stacked on it")
