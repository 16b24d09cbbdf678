"""The "debian" image: a Debian 12 (bookworm) root filesystem for containers.

``debootstrap --variant=minbase --include=busybox-static,iputils-ping`` builds the tree
from the Debian mirror that apt on this host is configured with (found with
``apt-get indextargets``, never guessed).  Packages are fetched once with
``--make-tarball`` into ``<cache>/debootstrap/`` (with a SHA-256 next to
it); every build then runs ``--unpack-tarball`` and downloads nothing.  The
cache is keyed by mirror, suite, variant and packages; delete it to pick up
newer packages.  Only the bookworm suite is used (no -updates/-security).

``/sbin/init`` (``/usr/sbin/init``: bookworm merges ``/usr``) is a symlink
to busybox-static's ``/bin/busybox``, i.e. busybox init with the same
container inittab as the minimal image (see
:mod:`popek.images.container_init`); Debian's own ``init``/systemd is not
installed.  The image records no kernel or initrd: it does not boot as a
VM yet; this root filesystem is meant to become the basis of a VM disk
later.  ``rootfs.tar`` keeps the tree's numeric owners and times, in sorted
order, without device nodes.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from popek.errors import ImageError
from popek.images import container_init, tarwrite
from popek.images.builder import BuildContext, BuildResult, Progress
from popek.images.image import hash_file

SUITE = "bookworm"
VARIANT = "minbase"
#: busybox-static for init; iputils-ping for a ``ping`` that works without CAP_NET_RAW
#: (an ICMP datagram socket, allowed by the container's ``net.ipv4.ping_group_range``;
#: busybox 1.35's ping only knows raw sockets)
INCLUDE = ("busybox-static", "iputils-ping")
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
ROOTFS_FILE = "rootfs.tar"
TIMEOUT = 1800
# Host-specific or bulky files removed from the tree (apt can fetch lists again).
CLEANUP_GLOBS = ("var/lib/apt/lists/*_*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb")
CLEANUP_FILES = ("var/log/bootstrap.log",)


def _env() -> dict[str, str]:
    return {**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}


def mirror() -> str:
    """Return the URI of the configured apt source for ``bookworm`` main.

    Raises :class:`ImageError` if apt has no such source.
    """
    fmt = "$(REPO_URI)\t$(CODENAME)\t$(IDENTIFIER)\t$(COMPONENT)"
    res = subprocess.run(
        ["apt-get", "indextargets", "--format", fmt],
        capture_output=True,
        text=True,
        env=_env(),
    )
    for line in res.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) == 4 and parts[1:] == [SUITE, "Packages", "main"]:
            return parts[0].rstrip("/")
    raise ImageError(
        f"no apt source for Debian {SUITE} main is configured (apt-get indextargets found "
        "none); add one under /etc/apt/sources.list.d and run apt-get update"
    )


def _debootstrap(args: list[str], log: Path, progress: Progress) -> None:
    argv = [
        "debootstrap",
        f"--variant={VARIANT}",
        f"--include={','.join(INCLUDE)}",
        "--arch=amd64",
        *([f"--keyring={KEYRING}"] if KEYRING.exists() else []),
        *args,
    ]
    progress(" ".join(argv))
    with log.open("w") as out:
        try:
            res = subprocess.run(
                argv, stdout=out, stderr=subprocess.STDOUT, env=_env(), timeout=TIMEOUT
            )
        except FileNotFoundError:
            raise ImageError("debootstrap is not installed (apt-get install debootstrap)") from None
        except subprocess.TimeoutExpired:
            raise ImageError(f"debootstrap took longer than {TIMEOUT} s") from None
    if res.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise ImageError(f"debootstrap failed ({res.returncode}): {' | '.join(tail)}")


def tarball_path(cache: Path, uri: str) -> Path:
    """Where the tarball of .debs for ``uri`` (and this suite, variant, packages) is cached."""
    key = hashlib.sha256(f"{uri}|{SUITE}|{VARIANT}|{','.join(INCLUDE)}".encode()).hexdigest()
    return cache / "debootstrap" / f"{SUITE}-amd64-{VARIANT}-{key[:16]}.tgz"


def package_tarball(cache: Path, uri: str, progress: Progress) -> Path:
    """Return the cached tarball of .debs for ``uri``, making it on first use."""
    tgz = tarball_path(cache, uri)
    directory = tgz.parent
    sidecar = tgz.with_name(tgz.name + ".sha256")
    if tgz.is_file() and sidecar.is_file():
        if hash_file(tgz).sha256 == sidecar.read_text().strip():
            progress(f"using cached packages {tgz.name}")
            return tgz
        progress(f"cached {tgz.name} does not match its hash; downloading again")
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="download-", dir=directory) as tmp:
        made = Path(tmp) / "debs.tgz"
        progress(f"downloading {SUITE}/{VARIANT} packages from {uri}")
        _debootstrap(
            [f"--make-tarball={made}", SUITE, str(Path(tmp) / "target"), uri],
            Path(tmp) / "log",
            progress,
        )
        (Path(tmp) / "sha256").write_text(hash_file(made).sha256 + "\n")
        os.replace(made, tgz)
        os.replace(Path(tmp) / "sha256", sidecar)
    return tgz


def _mounts_under(path: Path) -> list[str]:
    prefix = os.path.realpath(path) + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point.startswith(prefix):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def _remove_staging(path: Path) -> None:
    """Unmount whatever debootstrap left mounted under ``path``, then delete it.

    Never deletes across a mount point (a bind-mounted host /dev would be
    emptied): if a mount stays, the directory is kept and an error raised.
    """
    for point in _mounts_under(path):
        subprocess.run(["umount", "-l", point], capture_output=True)
    left = _mounts_under(path)
    if left:
        raise ImageError(f"cannot unmount {', '.join(left)}; left {path} in place")
    shutil.rmtree(path)


def _customise(root: Path) -> None:
    (root / "etc/hostname").write_text("popek\n")
    resolv = root / "etc/resolv.conf"
    if resolv.is_file() and not resolv.is_symlink():
        resolv.write_text("")  # debootstrap copied the host's; the engine provides one
    for pattern in CLEANUP_GLOBS:
        for p in root.glob(pattern):
            if p.is_file() and not p.is_symlink():
                p.unlink()
    for rel in CLEANUP_FILES:
        (root / rel).unlink(missing_ok=True)
    if not (root / "usr/bin/busybox").is_file():
        raise ImageError("busybox-static did not install /usr/bin/busybox")
    container_init.install(root, link_init=True)


def build(ctx: BuildContext) -> BuildResult:
    """Build the Debian image into ``ctx.out`` (``rootfs.tar`` only)."""
    if platform.machine() != "x86_64":
        raise ImageError(f"the debian image is built for x86_64; this host is {platform.machine()}")
    if os.geteuid() != 0:
        raise ImageError("building the debian image needs root (debootstrap)")
    uri = mirror()
    tgz = package_tarball(ctx.cache, uri, ctx.progress)
    staging = Path(tempfile.mkdtemp(prefix="debian-", dir=ctx.cache))
    try:
        root = staging / "root"
        ctx.progress("installing the packages (debootstrap --unpack-tarball)")
        _debootstrap(
            [f"--unpack-tarball={tgz}", SUITE, str(root), uri], staging / "log", ctx.progress
        )
        _customise(root)
        version = (root / "etc/debian_version").read_text().strip() or SUITE
        ctx.progress("packing the root filesystem")
        stats = tarwrite.pack_tree(root, ctx.out / ROOTFS_FILE)
        ctx.progress(
            f"{ROOTFS_FILE}: {stats.members} members, {stats.skipped} device nodes left out"
        )
    finally:
        _remove_staging(staging)
    return BuildResult(
        version=version,
        kernel="",
        initrd="",
        cmdline="",
        kernel_version="",
        arch="x86_64",
        rootfs=ROOTFS_FILE,
    )
