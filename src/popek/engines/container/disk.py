"""A container's writable layer on a file system of its own, as large as ``limits.disk``.

::

    <workdir>/bundle/disk.ext4   a sparse file holding an ext4 file system:
                                 /upper (the overlay's writes) and /work
    <workdir>/bundle/disk.loop   the loop device it was last attached to

A process in the container that writes past the limit gets ENOSPC from its
own file system; the host's file system grows by at most the limit, and the
neighbours never notice.  Why this mechanism and what it costs: see
docs/CONTAINERS.md ("The writable layer's bound").

The file system is mounted on the host only while the container's overlay is
made: the overlay keeps its own reference to it, and the kernel releases it
(and the loop device, which is attached with autoclear) when the container's
last process exits.  A start that comes before that release finds the loop
device still bound to the file (``disk.loop``) and mounts the same device
again, so one file system is never mounted through two devices.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from popek import proc
from popek.engines.container import idmap
from popek.errors import EngineError

DEFAULT_DISK = 10 << 30
MIN_DISK = 64 << 20
MAX_DISK = 64 << 40
#: ext4's block size in these file systems
BLOCK = 4096


def journal_mib(size: int) -> int:
    """ext4's journal for a file system of ``size`` bytes: 1/64 of it, 4 to 16 MiB."""
    return max(4, min(16, (size >> 20) // 64))

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LOOP_GET_STATUS64 = 0x4C05
LOOP_SET_CAPACITY = 0x4C07
LO_FLAGS_AUTOCLEAR = 4
EXT4_IOC_RESIZE_FS = 0x40086610
MS_NODEV = 4
#: struct loop_info64: 5 u64, 4 u32, name[64], crypt name[64], key[32], 2 u64
_LOOP_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")
_LOOP_CONFIG = struct.Struct(f"=II{_LOOP_INFO64.size}s64x")

_libc = ctypes.CDLL(None, use_errno=True)


def _tool(name: str) -> str:
    """e2fsprogs' ``name`` from popek's fixed tool path, never the caller's PATH."""
    found = proc.tool(name)
    if found is None:
        raise EngineError(f"container disk: {name} not found in {proc.TOOL_PATH} "
                          "(install e2fsprogs)")
    return found

def image(bundle: Path) -> Path:
    """The file that holds the file system of the container whose bundle is ``bundle``."""
    return bundle / "disk.ext4"


def has_disk(bundle: Path) -> bool:
    """Whether the container has a bounded writable layer (containers made before
    ``limits.disk`` keep theirs in ``bundle/upper``, unbounded)."""
    return image(bundle).is_file()


def check_size(size: int) -> int:
    """``size`` if it is an allowed ``limits.disk``; else :class:`InvalidInput`."""
    from popek.errors import InvalidInput
    from popek.units import format_size

    if not MIN_DISK <= size <= MAX_DISK:
        raise InvalidInput(f"invalid limits.disk {format_size(size)}: must be from "
                           f"{format_size(MIN_DISK)} to {format_size(MAX_DISK)}")
    return size


def create(bundle: Path, size: int, upper_uid: int, upper_gid: int, upper_mode: int) -> None:
    """Make the container's file system: ``size`` bytes, sparse, with its /upper (owned
    and moded as the overlay's root must be) and /work.  Removes what it made on failure."""
    path = image(bundle)
    seed = Path(tempfile.mkdtemp(prefix=".disk-", dir=bundle))
    try:
        (seed / "upper").mkdir(mode=0o700)
        (seed / "work").mkdir(mode=0o700)
        os.chown(seed / "upper", upper_uid, upper_gid)
        os.chmod(seed / "upper", upper_mode & 0o7777)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        # no resize inode (its reserved blocks cost half of mkfs's time and 4 MiB for
        # 10 GiB): ext4 and resize2fs grow without it (meta_bg)
        _run([_tool("mkfs.ext4"), "-q", "-F", "-b", str(BLOCK), "-m", "0", "-i", "16384",
              "-O", "^resize_inode", "-J", f"size={journal_mib(size)}",
              "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0",
              "-L", "popek-disk", "-d", str(seed), str(path)], "making its file system")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(seed, ignore_errors=True)


def _run(argv: list[str], what: str) -> None:
    p = subprocess.run(argv, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        msg = (p.stderr.strip().splitlines() or ["no message"])[-1][:300]
        if "No space left on device" in msg:  # the host's file system, under the file
            from popek.errors import no_space

            full = no_space(OSError(errno.ENOSPC, msg, argv[-1]))
            assert full is not None
            raise full
        raise EngineError(f"container disk: {what} failed: {msg}")


def size_of(bundle: Path) -> int:
    """The size of the container's file system, read from its superblock (the file may
    be longer: a growth that failed half-way leaves the file's tail unused)."""
    with open(image(bundle), "rb") as f:
        f.seek(1024)
        sb = f.read(1024)
    if len(sb) < 0x154 or sb[0x38:0x3A] != b"\x53\xef":
        raise EngineError(f"container disk: {image(bundle)} holds no ext4 file system")
    lo, = struct.unpack_from("<I", sb, 0x4)
    log, = struct.unpack_from("<I", sb, 0x18)
    hi, = struct.unpack_from("<I", sb, 0x150)
    return int(((hi << 32) | lo) * (1024 << log))


def _backing(fd: int) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file the open loop device ``fd`` is bound to; None if unbound."""
    buf = bytearray(_LOOP_INFO64.size)
    try:
        fcntl.ioctl(fd, LOOP_GET_STATUS64, buf)
    except OSError:
        return None  # ENXIO: not bound
    fields = _LOOP_INFO64.unpack(bytes(buf))
    return fields[0], fields[1]


def _recorded(bundle: Path) -> tuple[str, int] | None:
    """The recorded loop device, opened, if it is still bound to this very file."""
    try:
        dev = (bundle / "disk.loop").read_text().strip()
        st = image(bundle).stat()
    except OSError:
        return None
    if not dev.startswith("/dev/loop"):
        return None
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    if _backing(fd) == (st.st_dev, st.st_ino):
        return dev, fd
    os.close(fd)
    return None


def device(bundle: Path) -> int | None:
    """``st_rdev`` of the loop device bound to the container's file system now (the one
    its I/O limits apply to); None when there is none (no bounded layer, or released)."""
    found = _recorded(bundle)
    if found is None:
        return None
    try:
        return os.fstat(found[1]).st_rdev
    finally:
        os.close(found[1])


def hold(bundle: Path) -> tuple[str, int]:
    """A loop device bound to the container's file system, and an open descriptor of it
    that keeps it bound until the caller closes it: the one recorded, if it is still
    bound to this very file, else a new one (autoclear: it goes with its last user)."""
    path = image(bundle)
    found = _recorded(bundle)
    if found is not None:
        return found
    dev, loop_fd = bind_loop(path)
    tmp = (bundle / "disk.loop").with_suffix(".new")
    tmp.write_text(dev + "\n")
    os.replace(tmp, bundle / "disk.loop")
    return dev, loop_fd


def bind_loop(path: Path) -> tuple[str, int]:
    """A free loop device bound to the file ``path`` (autoclear: it is released with its
    last user), and an open descriptor of it that keeps it bound until closed."""
    file_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(16):  # another process may take the free device first
            ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
            try:
                n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            finally:
                os.close(ctl)
            dev = f"/dev/loop{n}"
            info = _LOOP_INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, LO_FLAGS_AUTOCLEAR,
                                     os.fsencode(str(path))[:63], b"", b"", 0, 0)
            loop_fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(loop_fd, LOOP_CONFIGURE, _LOOP_CONFIG.pack(file_fd, 0, info))
            except OSError as exc:
                os.close(loop_fd)
                if exc.errno == errno.EBUSY:
                    continue
                raise EngineError(f"attaching {path} to {dev}: {exc.strerror}") from exc
            return dev, loop_fd
    finally:
        os.close(file_fd)
    raise EngineError(f"no free loop device for {path}")


def backing(fd: int) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file the open loop device ``fd`` is bound to; None if
    unbound."""
    return _backing(fd)


def mount(bundle: Path, target: Path) -> None:
    """Mount the container's file system on ``target`` (private: no copy elsewhere)."""
    dev, fd = hold(bundle)
    try:
        if _libc.mount(os.fsencode(dev), os.fsencode(str(target)), b"ext4", MS_NODEV,
                       None) != 0:
            raise _fail(f"mounting {image(bundle)} on {target}")
        try:
            idmap.make_private(str(target))
        except EngineError:
            idmap.unmount(str(target))
            raise
    finally:
        os.close(fd)  # the mount holds the device now


def _fail(what: str) -> EngineError:
    return EngineError(f"container disk: {what}: {os.strerror(ctypes.get_errno())}")


def grow(bundle: Path, size: int, scratch: Path, mounted: bool) -> None:
    """Grow the container's file system to ``size`` bytes.

    Unmounted (the container stopped) with resize2fs on the file; mounted (it
    runs) online with ext4's resize call, on ``scratch`` (an empty directory
    the file system is mounted on for the call).  The online call needs
    CAP_SYS_RESOURCE: where popek runs without it, the growth is refused, with
    nothing changed, and works once the container is stopped.
    """
    path = image(bundle)
    old = size_of(bundle)
    if size <= old:
        return
    if not mounted:
        _check_released(bundle)
        _run([_tool("e2fsck"), "-f", "-p", str(path)], "checking its file system")
        os.truncate(path, size)
        _run([_tool("resize2fs"), str(path), f"{size // 1024}K"], "growing its file system")
        return
    os.truncate(path, size)
    _dev, fd = hold(bundle)
    try:
        fcntl.ioctl(fd, LOOP_SET_CAPACITY)
        mount(bundle, scratch)
        try:
            dfd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fcntl.ioctl(dfd, EXT4_IOC_RESIZE_FS, struct.pack("=Q", size // BLOCK))
            finally:
                os.close(dfd)
        finally:
            idmap.unmount(str(scratch))
    except OSError as exc:
        os.truncate(path, old)  # the file system did not grow: nothing past ``old`` is used
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd, LOOP_SET_CAPACITY)
        why = ("popek lacks CAP_SYS_RESOURCE, which ext4 needs to grow online"
               if exc.errno == errno.EPERM else exc.strerror)
        raise EngineError(f"container disk: cannot grow {path} while the container runs "
                          f"({why}); stop it, set limits.disk, start it") from exc
    finally:
        os.close(fd)


def _check_released(bundle: Path) -> None:
    """Refuse to touch the file while the kernel still has its file system mounted (a
    container that just stopped: its last mount goes a moment after its processes)."""
    found = _recorded(bundle)
    if found is None:
        return
    dev, fd = found
    os.close(fd)
    try:
        os.close(os.open(dev, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise EngineError(f"container disk: {image(bundle)} is still mounted by the "
                              "kernel (the container has just stopped); try again") from exc


def shrink(bundle: Path, size: int) -> None:
    """Shrink the (unmounted: the container is stopped) file system to ``size`` bytes;
    refused, with nothing changed, when its contents do not fit."""
    path = image(bundle)
    if size >= size_of(bundle):
        return
    _check_released(bundle)
    _run([_tool("e2fsck"), "-f", "-p", str(path)], "checking its file system")
    p = subprocess.run([_tool("resize2fs"), str(path), f"{size // 1024}K"],
                       capture_output=True, text=True, check=False)
    if p.returncode != 0:
        from popek.errors import InvalidInput
        from popek.units import format_size

        raise InvalidInput(f"limits.disk {format_size(size)} is smaller than what the "
                           "container's files need; delete files in it first, or choose a "
                           "larger size")
    os.truncate(path, size)
