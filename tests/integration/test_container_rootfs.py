"""Container root filesystems: one verified base per image, an id-mapped overlay per container.

Real containers on runc through the real CLI; the host side is checked in the
instance directories, the bases and /proc/self/mountinfo.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import popek, popek_json

CTS = ("rfs-a", "rfs-b")


def _tree_digest(root: Path) -> str:
    """Digest of every path, owner, mode and content under ``root``."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames) + dirnames:
            p = Path(dirpath) / name
            st = p.lstat()
            h.update(f"{p.relative_to(root)} {st.st_uid} {st.st_gid} {st.st_mode}".encode())
            if p.is_file() and not p.is_symlink():
                h.update(p.read_bytes())
    return h.hexdigest()


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path) + "/"
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [p for p in points if p.startswith(prefix) or p == str(path)]


@pytest.fixture(scope="module")
def cts(minimal_image: str) -> Iterator[dict[str, dict[str, object]]]:
    for name in CTS:
        popek("launch", minimal_image, name, "--container", "--memory", "64MiB")
    yield {name: popek_json("info", name) for name in CTS}
    for name in CTS:
        popek("delete", "--force", name, check=False)


def test_containers_of_an_image_share_one_read_only_base(
        cts: dict[str, dict[str, object]], popek_home: Path) -> None:
    bases = popek_home / "rootfs-bases"
    shas = {(Path(str(i["workdir"])) / "bundle" / "base").read_text().strip()
            for i in cts.values()}
    assert len(shas) == 1
    base = bases / shas.pop()
    assert base.is_dir() and (base / "bin" / "busybox").stat().st_uid == 0
    assert bases.stat().st_mode & 0o777 == 0o700  # root's alone
    before = _tree_digest(base)
    a, b = CTS
    # inside: the files are root's; writes and even a replaced binary stay in the container
    assert popek("exec", a, "--", "stat", "-c", "%u:%g", "/etc/passwd").stdout == "0:0\n"
    popek("exec", a, "--", "sh", "-c", "echo mine > /etc/only-a && cp /bin/busybox /tmp/bb && "
          "echo junk > /bin/busybox.new && mv /bin/busybox.new /bin/true")
    assert popek("exec", b, "--", "cat", "/etc/only-a", check=False).returncode != 0
    assert popek("exec", b, "--", "true").returncode == 0
    assert _tree_digest(base) == before
    # seen from the host, the write belongs to the container's own range
    root = Path(f"/proc/{popek_json('info', a)['pid']}/root")
    st = (root / "etc" / "only-a").stat()
    assert (st.st_uid, st.st_gid) == (cts[a]["uid"], cts[a]["uid"])
    # the container's root is the overlay over the id-mapped base (unchanged, above)
    mountinfo = (root.parent / "mountinfo").read_text()
    bundle = Path(str(cts[a]["workdir"])) / "bundle"
    assert f"lowerdir={bundle / 'lower'}," in mountinfo


def test_running_containers_leave_no_mount_on_the_host(
        cts: dict[str, dict[str, object]], popek_home: Path) -> None:
    """Every host mount is copied into each new mount namespace (a launch's): the
    host keeps none per running container, so launches do not slow down as
    containers accumulate (bench/scaling.py).  Before, each held two."""
    assert all(popek_json("info", n)["state"] == "running" for n in CTS)
    assert _mounts_under(popek_home) == []


def test_stop_unmounts_and_start_mounts_again(cts: dict[str, dict[str, object]]) -> None:
    a = CTS[0]
    bundle = Path(str(cts[a]["workdir"])) / "bundle"
    pid = popek_json("info", a)["pid"]
    assert f"upperdir={bundle}/" in Path(f"/proc/{pid}/mountinfo").read_text()
    popek("exec", a, "--", "sh", "-c", "echo kept > /root/note")
    popek("stop", a)
    assert _mounts_under(bundle) == []
    popek("start", a)
    assert popek("exec", a, "--", "cat", "/root/note").stdout == "kept\n"


def test_the_base_goes_with_the_last_user_of_a_deleted_image(
        minimal_image: str, popek_home: Path, tmp_path: Path) -> None:
    # a second image with different content, hence a base of its own
    tar = tmp_path / "tiny.tar"
    shutil.copy(popek_home / "images" / minimal_image / "rootfs.tar", tar)
    with tarfile.open(tar, "a") as t:  # one more file: another sha256
        member = tarfile.TarInfo("etc/tiny-marker")
        member.size = 5
        t.addfile(member, io.BytesIO(b"tiny\n"))
    popek("image", "import", str(tar), "tiny")
    popek("launch", "tiny", "rfs-t", "--container", "--memory", "64MiB")
    info = popek_json("info", "rfs-t")
    sha = (Path(info["workdir"]) / "bundle" / "base").read_text().strip()
    base = popek_home / "rootfs-bases" / sha
    assert base.is_dir()
    assert popek("image", "delete", "tiny", check=False).returncode != 0  # in use
    popek("delete", "--force", "rfs-t")
    assert _mounts_under(Path(info["workdir"])) == []
    assert base.is_dir()  # the image still has it
    popek("image", "delete", "tiny")
    assert not base.exists()
    # the minimal image's base stays: its image and containers use it
    assert any(d.name != sha for d in (popek_home / "rootfs-bases").iterdir())
