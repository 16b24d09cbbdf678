"""Filesystem volumes in containers: an ext4 file mounted at a path, owned by the
container's id range, at start and while it runs.

A volume's file is bound to a loop device (autoclear), its file system
mounted once on a private staging directory of the container's bundle, and
a clone of that mount id-mapped with the container's user namespace: on the
disk, files are owned by ids 0..65535, which the container sees as its own
root and users whatever range it runs with; the host's ids never land on
the volume, so it moves between containers unchanged.

- At start the id-mapped mount sits at ``bundle/vols/N`` and the OCI runtime
  binds it at the volume's path (it resolves that path inside the root
  filesystem safely); the host's staging mounts go once the container has
  its copies.
- While running, a child process enters the container's mount namespace
  (its root becomes the container's root, so no symbolic link the container
  made leads out of it), makes the path and moves the detached mount there;
  detaching unmounts it there, and the loop device goes with the last user.
- Growing: the file grows, the loop device learns its capacity, and ext4
  resizes online, through a descriptor of the mounted directory opened in
  the container's namespace (after checking the mount there is this very
  volume's).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

from popek.engines.container import disk, idmap
from popek.errors import EngineError

CLONE_NEWNS = 0x00020000
MS_NODEV, MS_NOSUID = 4, 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _err(what: str) -> EngineError:
    return EngineError(f"volume: {what}: {os.strerror(ctypes.get_errno())}")


def staging(bundle: Path, slot: int) -> Path:
    """The staging directory of the ``slot``-th volume mounted at start."""
    return bundle / "vols" / str(slot)


def bound_loops(file: str) -> list[str]:
    """The loop devices (``/dev/loopN``) bound to this very ``file`` now: named by sysfs'
    ``backing_file``, then checked by the device's own record of the file's device and
    inode (a path can name another file by now)."""
    st = os.stat(file)
    real = os.path.realpath(file)
    found = []
    for entry in sorted(Path("/sys/block").glob("loop*")):
        try:
            named = (entry / "loop" / "backing_file").read_text().rstrip("\n")
        except OSError:
            continue  # unbound
        if named != real:
            continue
        try:
            fd = os.open(f"/dev/{entry.name}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if disk.backing(fd) == (st.st_dev, st.st_ino):
                found.append(f"/dev/{entry.name}")
        finally:
            os.close(fd)
    return found


def _loop_of(file: str) -> tuple[str, int]:
    """The loop device of ``file`` and a descriptor that keeps it bound: the one bound to
    it already (a shared volume another container mounted: one device, so one ext4
    superblock, never two over the same blocks), else a new one.  The caller holds the
    file's lock (:func:`_file_lock`)."""
    st = os.stat(file)
    for dev in bound_loops(file):
        try:
            fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue  # released meanwhile
        if disk.backing(fd) == (st.st_dev, st.st_ino):  # still: the descriptor holds it
            return dev, fd
        os.close(fd)
    return disk.bind_loop(Path(file))


@contextlib.contextmanager
def _file_lock(file: str) -> Iterator[None]:
    """An exclusive lock on volume ``file`` (flock on the file itself) while its loop
    device is found or bound and mounted: two containers mounting it at once would each
    bind a device of their own."""
    fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _mount_fd(file: str, userns_fd: int, scratch: Path) -> int:
    """A detached, id-mapped mount of the ext4 file system in ``file`` (its owners mapped
    by ``userns_fd``), as a descriptor; ``scratch`` is an empty directory used for the
    moment it takes.  The loop device is the one already bound to ``file`` when there is
    one (the same device mounted again is the same superblock)."""
    with _file_lock(file):
        return _mount_fd_locked(file, userns_fd, scratch)


def _mount_fd_locked(file: str, userns_fd: int, scratch: Path) -> int:
    dev, loop_fd = _loop_of(file)
    try:
        scratch.mkdir(parents=True, exist_ok=True, mode=0o700)
        if _libc.mount(os.fsencode(dev), os.fsencode(str(scratch)), b"ext4",
                       MS_NODEV | MS_NOSUID, None) != 0:
            raise _err(f"mounting {file}")
        try:
            idmap.make_private(str(scratch))
            fd = _libc.syscall(idmap.SYS_OPEN_TREE, idmap.AT_FDCWD,
                               os.fsencode(str(scratch)),
                               idmap.OPEN_TREE_CLONE | idmap.OPEN_TREE_CLOEXEC)
            if fd < 0:
                raise _err(f"cloning the mount of {file}")
            attr = struct.pack("QQQQ", idmap.MOUNT_ATTR_IDMAP | idmap.MOUNT_ATTR_NODEV |
                               idmap.MOUNT_ATTR_NOSUID, 0, 0, userns_fd)
            if _libc.syscall(idmap.SYS_MOUNT_SETATTR, fd, b"", idmap.AT_EMPTY_PATH, attr,
                             len(attr)) != 0:
                os.close(fd)
                raise _err(f"id-mapping the mount of {file}")
            return int(fd)
        finally:
            idmap.unmount(str(scratch))  # the clone keeps the file system
            with contextlib.suppress(OSError):
                scratch.rmdir()
    finally:
        os.close(loop_fd)  # the mount holds the device now


def _scratch(bundle: Path) -> Path:
    """A new empty directory name for one mount's moment on the host."""
    return bundle / "vols" / f".scratch-{os.getpid()}-{os.urandom(4).hex()}"


def _move(fd: int, target: str) -> None:
    if _libc.syscall(idmap.SYS_MOVE_MOUNT, fd, b"", idmap.AT_FDCWD, os.fsencode(target),
                     idmap.MOVE_MOUNT_F_EMPTY_PATH) != 0:
        raise _err(f"mounting on {target}")


def mount_for_start(bundle: Path, volumes: tuple[tuple[str, str, str], ...], uid: int,
                    gid: int, id_range: int) -> list[tuple[str, str, bool]]:
    """Mount each (ref, file, path) volume id-mapped on its staging directory; return the
    binds the runtime makes of them (staging, path, read-only)."""
    if not volumes:
        return []
    binds: list[tuple[str, str, bool]] = []
    ns = idmap.userns(uid, gid, id_range)
    try:
        for slot, (ref, file, path) in enumerate(volumes):
            target = staging(bundle, slot)
            target.mkdir(parents=True, exist_ok=True, mode=0o700)
            idmap.unmount(str(target))
            try:
                fd = _mount_fd(file, ns, _scratch(bundle))
            except EngineError as exc:
                raise EngineError(f"volume {ref}: {exc}") from exc
            try:
                _move(fd, str(target))
            finally:
                os.close(fd)
            idmap.make_private(str(target))
            binds.append((str(target), path, False))
    except BaseException:
        unmount_staging(bundle)
        raise
    finally:
        os.close(ns)
    return binds


def unmount_staging(bundle: Path) -> None:
    """Remove the host's staging mounts (the container keeps its copies)."""
    vols = bundle / "vols"
    if not vols.is_dir():
        return
    for d in vols.iterdir():
        if d.name.isdigit():
            idmap.unmount(str(d))


def _in_mount_ns(pid: int, act: Callable[[], None]) -> None:
    """Run ``act`` in a child that entered the mount namespace of process ``pid`` (its
    root and working directory become that namespace's root); raise what it failed with."""
    ns = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            code = 0
            try:
                os.close(r)
                if _libc.setns(ns, CLONE_NEWNS) != 0:
                    raise _err("entering the container's mount namespace")
                os.chdir("/")
                act()
            except BaseException as exc:  # reported to the parent
                code = 1
                with contextlib.suppress(OSError):
                    os.write(w, str(exc).encode()[:1000])
            finally:
                os._exit(code)
        os.close(w)
        w = -1
        said = b""
        while chunk := os.read(r, 4096):
            said += chunk
        _, status = os.waitpid(child, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise EngineError(said.decode(errors="replace") or "volume: the helper failed")
    finally:
        os.close(ns)
        os.close(r)
        if w >= 0:
            os.close(w)


def _make_dirs(path: str, uid: int, gid: int) -> None:
    """``mkdir -p`` ``path`` (resolved in the current root), new directories owned by
    ``uid``/``gid`` (the container's root); refuse a path that is not a directory."""
    cur = "/"
    for part in [p for p in path.split("/") if p]:
        cur = os.path.join(cur, part)
        try:
            os.mkdir(cur, 0o755)
            os.chown(cur, uid, gid)
        except FileExistsError:
            if not os.path.isdir(cur):
                raise EngineError(f"volume: {cur} in the container is not a directory") \
                    from None


def attach_live(pid: int, file: str, path: str, uid: int, gid: int, bundle: Path) -> None:
    """Mount the volume in ``file`` at ``path`` in the running container whose init is
    ``pid``, owned by its id range (the user namespace of that init)."""
    userns = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd = _mount_fd(file, userns, _scratch(bundle))
    finally:
        os.close(userns)
    try:
        def move() -> None:
            _make_dirs(path, uid, gid)
            _move(fd, path)

        _in_mount_ns(pid, move)
    finally:
        os.close(fd)


def detach_live(pid: int, path: str) -> None:
    """Unmount the volume at ``path`` in the running container whose init is ``pid``."""
    def umount() -> None:
        if _libc.umount2(os.fsencode(path), idmap.MNT_DETACH) != 0 and \
                ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):
            raise _err(f"unmounting {path}")

    _in_mount_ns(pid, umount)


def _open_in_ns(pid: int, path: str) -> int:
    """A descriptor of directory ``path`` as the container whose init is ``pid`` sees it
    (opened in its mount namespace, passed back over a socket pair)."""
    import socket

    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        def send() -> None:
            dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
            socket.send_fds(there, [b"d"], [dfd])

        _in_mount_ns(pid, send)
        _msg, fds, _flags, _addr = socket.recv_fds(here, 1, 1)
        if not fds:
            raise EngineError(f"volume: cannot open {path} in the container")
        return fds[0]
    finally:
        here.close()
        there.close()


#: ``FIFREEZE`` / ``FITHAW`` (linux/fs.h): hold a mounted file system's writes, flushed
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878


@contextlib.contextmanager
def frozen(pid: int, file: str, path: str) -> Iterator[None]:
    """The ext4 of the volume in ``file``, mounted at ``path`` in the running container
    whose init is ``pid``, frozen (its dirty data and journal on the file, new writes held)
    for the time of the block, then thawed.  The mount is checked to be this very file's
    loop device before anything is frozen: a container that put another file system at
    ``path`` gets an error, never its root (or the host's) frozen."""
    dfd = _open_in_ns(pid, path)
    try:
        _check_mount(dfd, file, path)
        guard = _thaw_guard(dfd)
        try:
            try:
                fcntl.ioctl(dfd, FIFREEZE, 0)
            except OSError as exc:
                raise EngineError(f"volume: cannot freeze the file system at {path}: "
                                  f"{exc.strerror}") from exc
            try:
                yield
            finally:
                with contextlib.suppress(OSError):  # EINVAL: the guard thawed it already
                    fcntl.ioctl(dfd, FITHAW, 0)
        finally:
            os.write(guard, b"k")
            os.close(guard)
    finally:
        os.close(dfd)


def _thaw_guard(dfd: int) -> int:
    """A child process, in a session of its own, that thaws the file system of ``dfd`` if
    this process dies while it is frozen (a freeze outlives the process that asked for
    it: a killed popek would leave the container's writes hung).  Returns the pipe to
    write one byte to, then close, once thawed; the child then exits."""
    r, w = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:  # pragma: no cover - the child process
        try:
            os.setsid()
            os.close(w)
            if os.read(r, 1) != b"k":  # end of file: the parent died before thawing
                with contextlib.suppress(OSError):
                    fcntl.ioctl(dfd, FITHAW, 0)
        finally:
            os._exit(0)
    os.close(r)
    _reap_later(child)
    return w


def _reap_later(child: int) -> None:
    """Reap ``child`` when it exits, without blocking (a thread waits on it)."""
    import threading

    threading.Thread(target=os.waitpid, args=(child, 0), daemon=True).start()


def _check_mount(dfd: int, file: str, path: str) -> tuple[int, int]:
    """(major, minor) of the device of directory ``dfd`` (``path`` in a container), which
    must be a loop device bound to this very ``file``; EngineError otherwise."""
    st = os.stat(file)
    dev = os.fstat(dfd).st_dev
    try:
        name = os.path.basename(os.readlink(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"))
        if not name.startswith("loop"):
            raise FileNotFoundError(name)
        loop = os.open(f"/dev/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise EngineError(f"volume: {path} in the container is not this volume's mount") \
            from exc
    try:
        if disk.backing(loop) != (st.st_dev, st.st_ino):
            raise EngineError(f"volume: {path} in the container is not this volume's mount")
    finally:
        os.close(loop)
    return os.major(dev), os.minor(dev)


def device(pid: int, file: str, path: str) -> tuple[int, int]:
    """(major, minor) of the loop device of the volume in ``file`` mounted at ``path`` in
    the running container whose init is ``pid`` (what its I/O limits apply to), after
    checking that device is bound to this very file."""
    dfd = _open_in_ns(pid, path)
    try:
        return _check_mount(dfd, file, path)
    finally:
        os.close(dfd)


def _resize_on_host(dev: str, blocks: int, bundle: Path) -> None:
    """Grow the mounted ext4 on ``dev`` to ``blocks`` online: through a second, private
    mount of it on the host for the moment of the call (ext4 refuses the call through
    the container's id-mapped mount)."""
    scratch = _scratch(bundle)
    scratch.mkdir(parents=True, mode=0o700)
    try:
        if _libc.mount(os.fsencode(dev), os.fsencode(str(scratch)), b"ext4",
                       MS_NODEV | MS_NOSUID, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        try:
            idmap.make_private(str(scratch))
            dfd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fcntl.ioctl(dfd, disk.EXT4_IOC_RESIZE_FS, struct.pack("=Q", blocks))
            finally:
                os.close(dfd)
        finally:
            idmap.unmount(str(scratch))
    finally:
        with contextlib.suppress(OSError):
            scratch.rmdir()


def grow_live(pid: int, file: str, path: str, size: int, bundle: Path) -> None:
    """Grow the volume in ``file``, mounted at ``path`` in the running container whose
    init is ``pid``, to ``size`` bytes: the file, then its loop device, then ext4 online
    (after checking the mount at ``path`` is this very file's)."""
    st = os.stat(file)
    old = st.st_size
    dfd = _open_in_ns(pid, path)
    try:
        dev = os.fstat(dfd).st_dev
        try:  # the device's name from sysfs (no udev: no /dev/block here)
            name = os.path.basename(os.readlink(f"/sys/dev/block/{os.major(dev)}:"
                                                f"{os.minor(dev)}"))
            if not name.startswith("loop"):
                raise FileNotFoundError(name)
            loop = os.open(f"/dev/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise EngineError(f"volume: {path} in the container is not this volume's "
                              "mount") from exc
        try:
            if disk.backing(loop) != (st.st_dev, st.st_ino):
                raise EngineError(f"volume: {path} in the container is not this volume's "
                                  "mount")
            block = os.fstatvfs(dfd).f_bsize
            os.truncate(file, size)
            try:
                fcntl.ioctl(loop, disk.LOOP_SET_CAPACITY)
                _resize_on_host(f"/dev/{name}", size // block, bundle)
            except OSError as exc:
                os.truncate(file, old)  # the file system did not grow: nothing past old used
                with contextlib.suppress(OSError):
                    fcntl.ioctl(loop, disk.LOOP_SET_CAPACITY)
                why = ("popek lacks CAP_SYS_RESOURCE, which ext4 needs to grow online"
                       if exc.errno == errno.EPERM else exc.strerror)
                raise EngineError(f"volume: cannot grow {path} while the container runs "
                                  f"({why}); stop the container, resize, start it") from exc
        finally:
            os.close(loop)
    finally:
        os.close(dfd)
