"""Verified, uid-shifted, safe extraction of a root filesystem tar (no root needed)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from popek.errors import ImageError, IntegrityError
from popek.images import FileEntry, Image, Manifest

ROOT = os.geteuid() == 0
SHIFT = 100000
MTIME = 1_700_000_000


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **kw: object) -> tuple:
    return (name, kind, data, kw)


def make_tar(entries: list[tuple]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data, kw in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mtime = MTIME
            info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            for key, value in kw.items():
                setattr(info, key, value)
            if kind == tarfile.REGTYPE:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def make_image(tmp_path: Path, blob: bytes, recorded: bytes | None = None) -> Image:
    path = tmp_path / "img"
    path.mkdir()
    (path / "rootfs.tar").write_bytes(blob)
    ref = blob if recorded is None else recorded
    entry = FileEntry(sha256=hashlib.sha256(ref).hexdigest(), size=len(ref))
    manifest = Manifest(
        name="ct", version="1", created="2026-11-26T12:00:00Z", kernel="", initrd="",
        cmdline="", files={"rootfs.tar": entry}, kernel_version="", arch="x86_64",
        rootfs="rootfs.tar",
    )  # fmt: skip
    return Image(name="ct", path=path, manifest=manifest)


GOOD = [
    member(".", tarfile.DIRTYPE, mode=0o755),
    member("bin", tarfile.DIRTYPE),
    member("bin/busybox", data=b"\x7fELF" + b"x" * 5000, mode=0o4755, uid=0, gid=0),
    member("bin/sh", tarfile.SYMTYPE, linkname="/bin/busybox"),
    member("bin/ash", tarfile.LNKTYPE, linkname="bin/busybox"),
    member("etc", tarfile.DIRTYPE, mode=0o755),
    member("etc/shadow", data=b"root:*:1::::::\n", mode=0o640, uid=0, gid=42),
    member("home/user/notes", data=b"hello", uid=1000, gid=1000, mode=0o600),
    member("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3),
    member("dev/fifo", tarfile.FIFOTYPE),
    member("proc", tarfile.DIRTYPE, mode=0o555),
    member("tmp", tarfile.DIRTYPE, mode=0o1777),
]


def test_extracts_modes_links_times_and_shifted_owners(tmp_path: Path) -> None:
    img = make_image(tmp_path, make_tar(GOOD))
    dest = tmp_path / "rootfs"
    img.extract_rootfs(dest, SHIFT, SHIFT + 7)
    bb = dest / "bin/busybox"
    assert bb.read_bytes().startswith(b"\x7fELF")
    assert bb.stat().st_mode & 0o7777 == 0o4755  # setuid kept
    assert (dest / "bin/sh").readlink() == Path("/bin/busybox")
    assert (dest / "bin/ash").stat().st_ino == bb.stat().st_ino
    assert (dest / "etc/shadow").stat().st_mode & 0o777 == 0o640
    assert int(bb.stat().st_mtime) == MTIME
    assert os.lstat(dest / "bin/sh").st_mtime == MTIME
    assert int((dest / "etc").stat().st_mtime) == MTIME  # set after its children
    assert (dest / "proc").stat().st_mode & 0o7777 == 0o555
    assert (dest / "tmp").stat().st_mode & 0o7777 == 0o1777
    assert (dest / "home").stat().st_mode & 0o777 == 0o755  # implicit parent
    assert dest.stat().st_mode & 0o777 == 0o755
    assert not (dest / "dev/null").exists() and not (dest / "dev/fifo").exists()
    if not ROOT:
        pytest.skip("owner checks need root")
    assert (dest.stat().st_uid, dest.stat().st_gid) == (SHIFT, SHIFT + 7)
    assert (bb.stat().st_uid, bb.stat().st_gid) == (SHIFT, SHIFT + 7)
    assert (dest / "etc/shadow").stat().st_gid == SHIFT + 7 + 42
    notes = (dest / "home/user/notes").stat()
    assert (notes.st_uid, notes.st_gid) == (SHIFT + 1000, SHIFT + 7 + 1000)
    assert os.lstat(dest / "bin/sh").st_uid == SHIFT
    assert (dest / "home").stat().st_uid == SHIFT


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([member("/etc/passwd", data=b"x")], "'/etc/passwd' has an absolute path"),
        ([member("a/../../escape", data=b"x")], "'a/../../escape' has a '..' component"),
        (
            [member("evil", tarfile.SYMTYPE, linkname="/"), member("evil/etc/pwned", data=b"x")],
            "'evil/etc/pwned' lies under 'evil', which is a symlink",
        ),
        (
            [member("up", tarfile.SYMTYPE, linkname="../.."), member("up/pwned", data=b"x")],
            "'up/pwned' lies under 'up', which is a symlink",
        ),
        (
            [member("f", data=b"x"), member("f/g", data=b"x")],
            "'f/g' lies under 'f', which is a symlink or not a directory",
        ),
        ([member("h", tarfile.LNKTYPE, linkname="/etc/passwd")], "has an absolute path"),
        ([member("h", tarfile.LNKTYPE, linkname="../../x")], "has a '..' component"),
        ([member("h", tarfile.LNKTYPE, linkname="nothere")], "not a file extracted before"),
        ([member("a", data=b"1"), member("a", data=b"2")], "'a' appears twice"),
        ([member("s", tarfile.SYMTYPE, linkname="x"), member("s", tarfile.DIRTYPE)], "twice"),
    ],
)
def test_unsafe_members_are_refused(tmp_path: Path, entries: list[tuple], message: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    img = make_image(tmp_path, make_tar(entries))
    dest = tmp_path / "deep/er/rootfs"
    dest.parent.mkdir(parents=True)
    with pytest.raises(ImageError) as info:
        img.extract_rootfs(dest, SHIFT, SHIFT)
    assert message in str(info.value)
    assert str(info.value).startswith("image 'ct': rootfs.tar: ")
    assert not dest.exists()
    assert list(outside.iterdir()) == []
    assert not Path("/pwned").exists() and not Path("/etc/pwned").exists()


def test_hash_mismatch_removes_dest(tmp_path: Path) -> None:
    good = make_tar(GOOD)
    bad = bytearray(good)
    pos = bad.index(b"root:*:")
    bad[pos] = ord("R")  # same size, valid tar, different content
    img = make_image(tmp_path, bytes(bad), recorded=good)
    dest = tmp_path / "rootfs"
    with pytest.raises(IntegrityError) as info:
        img.extract_rootfs(dest, SHIFT, SHIFT)
    msg = str(info.value)
    assert msg.startswith("image 'ct': file 'rootfs.tar' has sha256 ")
    assert f"but the manifest records {hashlib.sha256(good).hexdigest()}" in msg
    assert not dest.exists()


def test_longer_file_refused(tmp_path: Path) -> None:
    good = make_tar(GOOD)
    img = make_image(tmp_path, good + bytes(10240), recorded=good)
    with pytest.raises(IntegrityError, match="has more than .* bytes but the manifest"):
        img.extract_rootfs(tmp_path / "rootfs", 0, 0)
    assert not (tmp_path / "rootfs").exists()


def test_corrupt_tar_with_bad_hash_reports_integrity(tmp_path: Path) -> None:
    good = make_tar(GOOD)
    bad = bytearray(good)
    bad[600:700] = b"\xff" * 100  # breaks the second header's checksum
    img = make_image(tmp_path, bytes(bad), recorded=good)
    with pytest.raises(IntegrityError, match="has sha256"):
        img.extract_rootfs(tmp_path / "rootfs", 0, 0)
    assert not (tmp_path / "rootfs").exists()


def test_dest_must_not_exist(tmp_path: Path) -> None:
    img = make_image(tmp_path, make_tar(GOOD))
    (tmp_path / "rootfs").mkdir()
    with pytest.raises(ImageError, match="already exists"):
        img.extract_rootfs(tmp_path / "rootfs", 0, 0)
    assert (tmp_path / "rootfs").is_dir()


@pytest.mark.parametrize("shift", [-1, 2**32, True])
def test_bad_shift(tmp_path: Path, shift: int) -> None:
    img = make_image(tmp_path, make_tar(GOOD))
    with pytest.raises(ImageError, match="uid_shift"):
        img.extract_rootfs(tmp_path / "rootfs", shift, 0)
    assert not (tmp_path / "rootfs").exists()


def test_long_names_and_pax(tmp_path: Path) -> None:
    long = "d" * 120 + "/" + "f" * 150
    img = make_image(tmp_path, make_tar([member(long, data=b"long"), member("ü-name", data=b"u")]))
    img.extract_rootfs(tmp_path / "rootfs", 0, 0)
    assert (tmp_path / "rootfs" / long).read_bytes() == b"long"
    assert (tmp_path / "rootfs/ü-name").read_bytes() == b"u"


def test_without_root_owners_are_the_callers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import popek.images.image as image_mod

    monkeypatch.setattr(image_mod.os, "geteuid", lambda: 1000)
    img = make_image(tmp_path, make_tar(GOOD))
    img.extract_rootfs(tmp_path / "rootfs", SHIFT, SHIFT)
    st = (tmp_path / "rootfs/home/user/notes").stat()
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())  # no chown attempted
    assert (tmp_path / "rootfs/bin/busybox").stat().st_mode & 0o7777 == 0o4755
