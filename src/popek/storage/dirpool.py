"""The ``dir`` driver: the volumes of a pool as files in one directory.

A ``block`` volume is a qcow2 file (thin: it takes the space its data takes),
which QEMU opens as a virtio disk; a ``filesystem`` volume is a sparse raw
file holding an ext4 filesystem, which a container gets mounted through a
loop device (thin as well).  Files live at ``PATH/PROJECT/NAME.qcow2`` and
``PATH/PROJECT/NAME.ext4``; a file is made under a temporary name
(``.NAME.TYPE.new``) and renamed into place, so a name is never half made.
The tools are ``qemu-img`` (QEMU's) and ``mkfs.ext4``/``resize2fs``/``e2fsck``
(e2fsprogs), run with a timeout; their failure is an :class:`EngineError`
with the tool's own message.

An encrypted block volume (``--encrypt``) is a qcow2 with LUKS encryption,
every file of its chain (its snapshots and overlays) under its project's key.
``qemu-img`` gets the key through a pipe it inherits (``--object secret,
file=/dev/fd/N``), never on its command line nor in a file; the LUKS key
slot's PBKDF runs :data:`ITER_TIME_MS` (the key is 256 random bits, which
stretching cannot make stronger; QEMU's default of 2 s would be paid at every
open of every layer).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

from popek import proc
from popek.errors import EngineError, InvalidInput

#: the file suffix of each volume type
SUFFIX = {"block": ".qcow2", "filesystem": ".ext4"}
TOOL_TIMEOUT_S = 120.0
#: the file formats a block volume is imported from and exported to
FORMATS = ("qcow2", "raw")
QCOW2_MAGIC = b"QFI\xfb"
_PERCENT = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
#: the encryption of an encrypted volume's files
ENCRYPTION = "luks"
#: the id of the volume key's secret object in a ``qemu-img`` run
SECRET_ID = "popek-volume-key"
#: how long LUKS' key derivation runs per key slot, in milliseconds
ITER_TIME_MS = 10
#: what QEMU 7.2 says when timing its PBKDF measured 0 ms of CPU (a busy host, now and
#: then: 1 run of 7 of the unit tests here); the same command is tried again
LUKS_TIMING = "Unable to get accurate CPU usage"
LUKS_TRIES = 3
#: the ``-o`` options of a new encrypted qcow2 file
ENCRYPT_OPTS = (f"encrypt.format={ENCRYPTION},encrypt.key-secret={SECRET_ID},"
                f"encrypt.iter-time={ITER_TIME_MS}")


@contextlib.contextmanager
def key_pipe(key: str | None) -> Iterator[tuple[list[str], tuple[int, ...]]]:
    """The ``--object`` arguments and the descriptor to pass that give ``qemu-img`` the
    volume ``key`` through a pipe (none without a key); the pipe is closed after."""
    if key is None:
        yield [], ()
        return
    r, w = os.pipe()
    try:
        try:
            os.write(w, key.encode())  # 64 bytes: far below the pipe's buffer
        finally:
            os.close(w)
        yield ["--object", f"secret,id={SECRET_ID},file=/dev/fd/{r}"], (r,)
    finally:
        os.close(r)


def image_opts(f: Path, layers: int) -> str:
    """The ``--image-opts`` of encrypted qcow2 ``f`` whose chain has ``layers`` files,
    each given the volume key's secret."""
    parts = ["driver=qcow2", "file.filename=" + str(f).replace(",", ",,")]
    parts += ["backing." * i + f"encrypt.key-secret={SECRET_ID}" for i in range(layers)]
    return ",".join(parts)


def probe(source: Path) -> tuple[str, int]:
    """The format (``qcow2`` by its magic bytes, else ``raw``: never guessed by QEMU) and
    the size an instance would see of the file ``source``.

    A qcow2 file that names another file (a backing file, an external data file) or is
    encrypted is refused: popek imports self-contained images only, and a backing file
    name would make QEMU open a file of the host's choosing.
    """
    try:
        with source.open("rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise InvalidInput(f"cannot read {source}: {exc.strerror or exc}") from exc
    fmt = "qcow2" if head == QCOW2_MAGIC else "raw"
    out = _run(["qemu-img", "info", "-f", fmt, "--output", "json", str(source)],
               f"reading {source.name}")
    info = json.loads(out)
    data = (info.get("format-specific") or {}).get("data") or {}
    if info.get("backing-filename") or data.get("data-file"):
        raise InvalidInput(f"{source} names another file (a backing or data file): import a "
                           "self-contained image (qemu-img convert -O qcow2 it first)")
    if info.get("encrypted") or data.get("encrypt"):
        raise InvalidInput(f"{source} is encrypted: import a plain qcow2 or raw image")
    return fmt, int(info["virtual-size"])


@contextlib.contextmanager
def made(target: Path) -> Iterator[Path]:
    """A temporary name beside ``target`` (``.NAME.new``) for the block to write; renamed
    to ``target`` (mode 0600) when the block ends, removed when it fails."""
    tmp = target.with_name(f".{target.name}.new")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.chmod(tmp, 0o600)
        os.rename(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def convert(source: Path, source_fmt: str, target: Path, target_fmt: str,
            progress: Callable[[int], None], key: str | None = None,
            source_layers: int = 0) -> None:
    """``qemu-img convert`` ``source`` into the new file ``target`` (made under a temporary
    name), calling ``progress`` with each whole percent done.  With ``key``: an encrypted
    source (``source_layers`` > 0: its chain's length) is decrypted, else the target is
    made encrypted."""
    opts = ["preallocation=off"] if target_fmt == "qcow2" else []
    src = ["-f", source_fmt, str(source)]
    if key is not None and source_layers:
        src = ["--image-opts", image_opts(source, source_layers)]
    elif key is not None:
        opts.append(ENCRYPT_OPTS)
    with made(target) as tmp:
        run_convert(["-O", target_fmt, *(["-o", ",".join(opts)] if opts else []), *src,
                     str(tmp)], f"converting {source.name}", progress, key)


def run_convert(args: list[str], what: str, progress: Callable[[int], None],
                key: str | None = None) -> None:
    """Run ``qemu-img convert -p ARGS`` (with ``key``: its secret object read from a
    pipe), calling ``progress`` with each whole percent done; :class:`EngineError` naming
    ``what`` with qemu-img's last line when it fails."""
    path = proc.tool("qemu-img")
    if path is None:
        raise EngineError("qemu-img is not installed: make setup installs it")
    shown = -1
    for _ in range(LUKS_TRIES):
        with key_pipe(key) as (objects, fds), subprocess.Popen(
                [path, "convert", "-p", *objects, *args], stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=proc.tool_env(),
                pass_fds=fds) as p:
            assert p.stdout is not None
            while chunk := p.stdout.read1(4096):  # type: ignore[attr-defined]
                for m in _PERCENT.finditer(chunk):
                    pct = int(float(m.group(1)))
                    if pct > shown:
                        shown = pct
                        progress(pct)
            err = p.stderr.read().decode(errors="replace") if p.stderr else ""
        if not (p.returncode and key is not None and LUKS_TIMING in err):
            break
    if p.returncode != 0:
        said = err.strip().splitlines()
        raise EngineError(f"{what}: qemu-img failed: {said[-1] if said else p.returncode}")


def _run(argv: list[str], what: str, key: str | None = None) -> str:
    """Run the tool ``argv``; with ``key``, ``qemu-img`` gets it as a secret object read
    from an inherited pipe (``argv[1]`` is the subcommand)."""
    path = proc.tool(argv[0])
    if path is None:
        raise EngineError(f"{argv[0]} is not installed: {what} needs it (make setup installs it)")
    for _ in range(LUKS_TRIES):
        try:
            with key_pipe(key) as (objects, fds):
                done = proc.run([path, *argv[1:2], *objects, *argv[2:]], TOOL_TIMEOUT_S,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=proc.tool_env(),
                                pass_fds=fds)
        except subprocess.TimeoutExpired as exc:
            raise EngineError(f"{what}: {argv[0]} did not finish in {TOOL_TIMEOUT_S:g} s") \
                from exc
        if not (done.returncode and key is not None and LUKS_TIMING in done.stderr):
            break
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise EngineError(f"{what}: {argv[0]} failed: {said[-1] if said else done.returncode}")
    return str(done.stdout)



#: running ``qemu-img`` (or another tool) with a volume key through a pipe, for the other
#: drivers (the ceph driver's encrypted images)
run_tool = _run

class DirPool:
    """The files of one ``dir`` pool under ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def check(self) -> None:
        """Raise :class:`InvalidInput` unless ``path`` is a directory popek may write."""
        if not self.path.is_absolute():
            raise InvalidInput(f"invalid pool path {str(self.path)!r}: give an absolute path")
        if self.path.exists() and not self.path.is_dir():
            raise InvalidInput(f"pool path {self.path} is not a directory: give an empty "
                               "directory")
        if not self.path.is_dir():
            raise InvalidInput(f"pool directory {self.path} does not exist: make it first, or "
                               "leave path= out for one under POPEK_HOME")
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise InvalidInput(f"pool directory {self.path} is not writable by popek")

    def file(self, project: str, name: str, kind: str) -> Path:
        """The file of volume ``name`` of ``project``."""
        return self.path / project / f"{name}{SUFFIX[kind]}"

    def create(self, project: str, name: str, kind: str, size: int,
               key: str | None = None) -> None:
        """Make the volume's file (empty, thin), under a temporary name renamed into place;
        with ``key`` (block only), encrypted with it."""
        final = self.file(project, name, kind)
        final.parent.mkdir(mode=0o700, exist_ok=True)
        with made(final) as tmp:
            if kind == "block":
                _run(["qemu-img", "create", "-q", "-f", "qcow2",
                      *(["-o", ENCRYPT_OPTS] if key is not None else []), str(tmp), str(size)],
                     f"creating volume {name}", key)
                return
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
            _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "root_owner=0:0", str(tmp)],
                 f"making the filesystem of volume {name}")

    def resize(self, project: str, name: str, kind: str, size: int, old: int,
               key: str | None = None) -> None:
        """Grow (or, for a filesystem whose data fits, shrink) the volume to ``size``."""
        f = self.file(project, name, kind)
        if kind == "block":
            image = (["--image-opts", image_opts(f, len(self.chain(project, name)))]
                     if key is not None else ["-f", "qcow2", str(f)])
            _run(["qemu-img", "resize", "-q", *image, str(size)], f"resizing volume {name}",
                 key)
            return
        if size > old:
            os.truncate(f, size)
            _run(["resize2fs", "-f", str(f)], f"growing the filesystem of volume {name}")
            return
        _run(["e2fsck", "-f", "-p", str(f)], f"checking the filesystem of volume {name}")
        _run(["resize2fs", str(f), f"{size // 1024}K"],
             f"shrinking the filesystem of volume {name} (its data must fit)")
        os.truncate(f, size)

    def delete(self, project: str, name: str, kind: str, snapshots: tuple[str, ...] = ()) -> None:
        """Remove the volume's file and its ``snapshots``' (gone already: nothing to do)."""
        f = self.file(project, name, kind)
        f.unlink(missing_ok=True)
        f.with_name(f".{f.name}.new").unlink(missing_ok=True)
        for snap in snapshots:
            self.snapshot_file(project, name, snap, kind).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            f.parent.rmdir()  # the project's directory, when it was the last

    # -- snapshots and clones (block volumes: qcow2 backing chains) -------------------
    #
    # A snapshot freezes the volume's file as NAME@SNAP.qcow2 (read-only) and puts a new,
    # empty overlay in its place, backed by it: constant time whatever the size.  A clone
    # and a restore are overlays on a snapshot's file; deleting a snapshot first copies
    # what it holds into the file it backs (qemu-img rebase), then removes it.

    def snapshot_file(self, project: str, name: str, snap: str, kind: str = "block") -> Path:
        """The frozen file of snapshot ``snap`` of volume ``name`` (of type ``kind``)."""
        return self.path / project / f"{name}@{snap}{SUFFIX[kind]}"

    # -- snapshots and clones of filesystem volumes: copies ---------------------------
    #
    # A filesystem volume is one raw ext4 file, with no chain to put an overlay on: a
    # snapshot, a restore and a clone are each a copy (``cp --reflink=auto
    # --sparse=always``): on a pool directory whose file system has reflinks (XFS,
    # btrfs) the copy shares the blocks and takes the same time whatever the size; on
    # ext4 it is a sparse copy, as long as the data.  Each copy is made under a
    # temporary name and renamed into place, so a killed copy leaves only a temporary
    # file (removed by reconcile) and the volume as it was.  The volume is detached while
    # copied (the service refuses otherwise): nothing writes into it meanwhile.

    def is_filesystem(self, project: str, name: str) -> bool:
        """Whether volume ``name``'s file is a filesystem volume's (raw ext4)."""
        return self.file(project, name, "filesystem").exists()

    def copy(self, source: Path, target: Path) -> None:
        """Copy ``source`` to the new file ``target`` (reflinked where the file system
        can, sparse always), under a temporary name renamed into place."""
        with made(target) as tmp:
            _run(["cp", "--reflink=auto", "--sparse=always", "--", str(source), str(tmp)],
                 f"copying {source.name}")

    def _fs_snapshot(self, project: str, name: str, snap: str) -> None:
        frozen = self.snapshot_file(project, name, snap, "filesystem")
        if not frozen.exists():  # a killed run that renamed it into place: done
            self.copy(self.file(project, name, "filesystem"), frozen)
        os.chmod(frozen, 0o400)

    def _overlay(self, target: Path, backing: Path, key: str | None = None) -> None:
        """Make ``target`` an empty qcow2 overlay on ``backing`` (named relative to it),
        encrypted with ``key`` when given."""
        rel = os.path.relpath(backing, target.parent)
        with made(target) as tmp:
            _run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", rel, "-F", "qcow2",
                  *(["-o", ENCRYPT_OPTS] if key is not None else []), str(tmp)],
                 f"making an overlay on {backing.name}", key)

    def snapshot(self, project: str, name: str, snap: str, key: str | None = None) -> None:
        """Freeze the volume as ``snap`` and put an empty overlay on it in its place (a
        filesystem volume: a copy of its file); a step a killed process did not take is
        taken (roll forward)."""
        if self.is_filesystem(project, name):
            self._fs_snapshot(project, name, snap)
            return
        active, frozen = self.file(project, name, "block"), self.snapshot_file(project, name,
                                                                                snap)
        if active.exists() and not frozen.exists():
            os.rename(active, frozen)
        os.chmod(frozen, 0o400)
        if not active.exists():
            self._overlay(active, frozen, key)

    def restore(self, project: str, name: str, snap: str, key: str | None = None) -> None:
        """Put an empty overlay on ``snap`` in the volume's place (what was written since is
        dropped; later snapshots stay, each its own chain); a filesystem volume's file
        is replaced by a copy of the snapshot's."""
        if self.is_filesystem(project, name):
            self.copy(self.snapshot_file(project, name, snap, "filesystem"),
                      self.file(project, name, "filesystem"))  # rename: atomic replace
            return
        self._overlay(self.file(project, name, "block"), self.snapshot_file(project, name, snap),
                      key)

    def clone(self, project: str, name: str, snap: str, new: str,
              key: str | None = None) -> None:
        """Make block volume ``new`` (same project) an overlay on ``snap`` of ``name``;
        a filesystem volume's clone is a copy of the snapshot's file."""
        if self.is_filesystem(project, name):
            target = self.file(project, new, "filesystem")
            target.parent.mkdir(mode=0o700, exist_ok=True)
            self.copy(self.snapshot_file(project, name, snap, "filesystem"), target)
            return
        self.file(project, new, "block").parent.mkdir(mode=0o700, exist_ok=True)
        self._overlay(self.file(project, new, "block"), self.snapshot_file(project, name, snap),
                      key)

    def backing(self, f: Path) -> str:
        """The file name ``f`` is an overlay on (its directory's), empty for none."""
        out = _run(["qemu-img", "info", "-f", "qcow2", "--output", "json", "-U", str(f)],
                   f"reading {f.name}")
        name = str(json.loads(out).get("backing-filename", ""))
        if name.startswith("json:"):  # an encrypted merge's first step (delete_snapshot)
            name = str(json.loads(name[5:]).get("file", {}).get("filename", ""))
        return os.path.basename(name)

    def chain(self, project: str, name: str) -> list[Path]:
        """The files block volume ``name`` reads, its own first, then each backing file in
        turn; every one inside this pool (a header naming another file is refused)."""
        top = self.file(project, name, "block")
        out = _run(["qemu-img", "info", "-U", "--backing-chain", "-f", "qcow2", "--output",
                    "json", str(top)], f"reading volume {name}")
        files = [Path(str(info["filename"])) for info in json.loads(out)]
        root = self.path.resolve()
        for f in files:
            if root not in f.resolve().parents:
                raise EngineError(f"volume {name} names {f}, outside its pool {self.path}: "
                                  "popek does not open it")
        return files

    def delete_snapshot(self, project: str, name: str, snap: str, others: list[str],
                        key: str | None = None) -> None:
        """Remove ``snap``: each file of the volume it backs (the volume's own, or one of
        the snapshots ``others``: after a restore two can) takes what it holds first and is
        put on ``snap``'s own backing file (or none).

        An encrypted chain takes two steps per file, since ``qemu-img rebase`` opens the
        new backing file without a key: the merge onto a ``json:`` name of the base that
        carries the key's secret id (no key), then the header is set to the base's plain
        name (``rebase -u``); a run killed between them is finished by the next."""
        fs = self.snapshot_file(project, name, snap, "filesystem")
        if fs.exists() or self.is_filesystem(project, name):  # a copy: nothing to merge
            fs.unlink(missing_ok=True)
            return
        frozen = self.snapshot_file(project, name, snap)
        if not frozen.exists():
            return
        base = self.backing(frozen)
        files = [self.file(project, name, "block"),
                 *(self.snapshot_file(project, name, o) for o in others)]
        for child in files:
            if not child.exists():
                continue
            now = self.backing(child)
            if now != frozen.name and not (key is not None and base and now == base and
                                           self._json_backing(child)):
                continue
            mode = child.stat().st_mode & 0o777
            os.chmod(child, 0o600)
            if key is None:
                _run(["qemu-img", "rebase", "-q", "-f", "qcow2", "-b", base,
                      *(["-F", "qcow2"] if base else []), str(child)],
                     f"merging snapshot {snap} into {child.name}")
            else:
                self._rebase_encrypted(child, frozen, base, key, now == frozen.name)
            os.chmod(child, mode)  # a later snapshot stays read-only
        frozen.unlink()

    def _json_backing(self, f: Path) -> bool:
        out = _run(["qemu-img", "info", "-f", "qcow2", "--output", "json", "-U", str(f)],
                   f"reading {f.name}")
        return str(json.loads(out).get("backing-filename", "")).startswith("json:")

    def _rebase_encrypted(self, child: Path, frozen: Path, base: str, key: str,
                          merge: bool) -> None:
        """Put encrypted ``child`` on ``base`` (a name beside it; empty: none), merging
        what ``frozen`` holds first when ``merge``."""
        what = f"merging snapshot {frozen.name} into {child.name}"
        depth = len(self._files(child))
        if merge:
            target = ""
            if base:
                target = "json:" + json.dumps({
                    "file": {"driver": "file", "filename": str(child.parent / base)},
                    "encrypt.key-secret": SECRET_ID})
            _run(["qemu-img", "rebase", "-q", "--image-opts", image_opts(child, depth),
                  "-b", target, *(["-F", "qcow2"] if base else [])], what, key)
        if base:
            _run(["qemu-img", "rebase", "-q", "-u", "--image-opts", image_opts(child, 1),
                  "-b", base, "-F", "qcow2"], what, key)

    def _files(self, top: Path) -> list[Path]:
        out = _run(["qemu-img", "info", "-U", "--backing-chain", "-f", "qcow2", "--output",
                    "json", str(top)], f"reading {top.name}")
        return [Path(str(info["filename"])) for info in json.loads(out)]

    def used(self, project: str, name: str, kind: str) -> int:
        """The bytes the volume's file takes on disk (0 when it is missing)."""
        try:
            return os.stat(self.file(project, name, kind)).st_blocks * 512
        except OSError:
            return 0

    def virtual_size(self, project: str, name: str, kind: str) -> int:
        """The size the instance sees, as the file says (qcow2's header; the raw length)."""
        f = self.file(project, name, kind)
        if kind != "block":
            return os.stat(f).st_size
        out = _run(["qemu-img", "info", "-U", "-f", "qcow2", "--output", "json", str(f)],
                   f"reading volume {name}")
        return int(json.loads(out)["virtual-size"])

    def has_snapshot(self, project: str, name: str, snap: str) -> bool:
        """Whether snapshot ``snap`` of ``name`` was frozen (its file is there)."""
        return any(self.snapshot_file(project, name, snap, kind).exists() for kind in SUFFIX)

    def exists(self, project: str, name: str, kind: str) -> bool:
        """Whether the volume's file is there."""
        return self.file(project, name, kind).is_file()

    def files(self) -> list[tuple[str, str, str]]:
        """Every volume file and temporary file here: (project, name, type); a temporary
        file's name keeps its leading dot."""
        out: list[tuple[str, str, str]] = []
        if not self.path.is_dir():
            return out
        for d in sorted(p for p in self.path.iterdir() if p.is_dir()):
            for f in sorted(d.iterdir()):  # a snapshot's file: NAME@SNAP
                for kind, suffix in SUFFIX.items():
                    if f.name.endswith(suffix):
                        out.append((d.name, f.name[:-len(suffix)], kind))
                    elif f.name.startswith(".") and f.name.endswith(suffix + ".new"):
                        out.append((d.name, f.name[:-len(suffix + ".new")], kind))
        return out

    def import_file(self, project: str, name: str, source: Path, fmt: str,
                    progress: Callable[[int], None], key: str | None = None) -> None:
        """Make block volume ``name`` a qcow2 copy of ``source`` (of format ``fmt``),
        encrypted with ``key`` when given."""
        target = self.file(project, name, "block")
        target.parent.mkdir(mode=0o700, exist_ok=True)
        convert(source, fmt, target, "qcow2", progress, key)

    def export_file(self, project: str, name: str, target: Path, fmt: str,
                    progress: Callable[[int], None], key: str | None = None) -> None:
        """Write block volume ``name`` (its whole chain, flattened; decrypted with ``key``
        when it is encrypted) to the new ``target``."""
        top = self.file(project, name, "block")
        convert(top, "qcow2", target, fmt, progress, key,
                len(self.chain(project, name)) if key is not None else 0)

    def remove_temporary(self, project: str, name: str, kind: str) -> None:
        """Remove a temporary file ``files`` listed (its ``name`` with the leading dot)."""
        (self.path / project / f"{name}{SUFFIX[kind]}.new").unlink(missing_ok=True)

    def capacity(self) -> tuple[int, int]:
        """The filesystem's size and the bytes free for popek, in bytes."""
        st = os.statvfs(self.path)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
