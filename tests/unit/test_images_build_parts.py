"""Pieces of the minimal builder that need neither root nor downloads."""

from __future__ import annotations

import gzip
import stat
import subprocess
from pathlib import Path

import pytest

from popek.errors import ImageError
from popek.images import cpio, debs, kmods, minimal

URIS = (
    "'http://deb.debian.org/debian/pool/main/b/busybox/busybox-static_1%3a1.35.0-4_amd64.deb' "
    "busybox-static_1%3a1.35.0-4_amd64.deb 928188 SHA256:" + "ab" * 32 + "\n"
)


def test_parse_print_uris() -> None:
    (loc,) = debs.parse_print_uris("W: some warning\n" + URIS)
    assert loc.filename == "busybox-static_1%3a1.35.0-4_amd64.deb"
    assert (loc.size, loc.hash_alg, loc.hash_hex) == (928188, "SHA256", "ab" * 32)
    assert debs.parse_print_uris("") == []


@pytest.mark.parametrize(
    ("depends", "expected"),
    [
        ("linux-image-6.1.0-28-cloud-amd64 (= 6.1.119-1)", "linux-image-6.1.0-28-cloud-amd64"),
        ("foo, linux-image-6.1.0-9-cloud-amd64 | bar", "linux-image-6.1.0-9-cloud-amd64"),
    ],
)
def test_kernel_package(monkeypatch: pytest.MonkeyPatch, depends: str, expected: str) -> None:
    monkeypatch.setattr(debs, "deb_field", lambda deb, name: depends)
    assert minimal.kernel_package(Path("meta.deb")) == expected


def test_kernel_package_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(debs, "deb_field", lambda deb, name: "libc6")
    with pytest.raises(ImageError, match="depends on no linux-image package"):
        minimal.kernel_package(Path("meta.deb"))


def test_apt_lists_empty_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(debs, "APT_LISTS", tmp_path)
    monkeypatch.setattr(subprocess, "run", _fake_failed_run)
    cache = debs.DebCache(tmp_path / "debs", lambda m: None)
    with pytest.raises(ImageError, match="apt package lists are empty; run apt-get update"):
        cache.fetch("linux-image-cloud-amd64")


def _fake_failed_run(*args: object, **kw: object) -> object:
    class Result:
        returncode = 100
        stdout = ""
        stderr = "E: Unable to locate package linux-image-cloud-amd64"

    return Result()


def test_builtin_modules(tmp_path: Path) -> None:
    moddir = tmp_path / "lib/modules/6.1.0-1"
    moddir.mkdir(parents=True)
    (moddir / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\nkernel/x/virtio-rng.ko\n")
    assert kmods.builtin_modules(tmp_path, "6.1.0-1") == {"ext4", "virtio_rng"}
    with pytest.raises(ImageError, match="no modules directory"):
        kmods.module_dir(tmp_path, "9.9")


def _read_newc(blob: bytes) -> list[tuple[str, int, int, int, bytes]]:
    out: list[tuple[str, int, int, int, bytes]] = []
    pos = 0
    while True:
        assert blob[pos : pos + 6] == b"070701"
        f = [int(blob[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        name = blob[pos + 110 : pos + 110 + f[11] - 1].decode()
        pos = (pos + 110 + f[11] + 3) & ~3
        data = blob[pos : pos + f[6]]
        pos = (pos + f[6] + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out.append((name, f[1], f[2], f[3], data))


def test_initramfs_is_deterministic_newc(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "dev").mkdir()
    (root / "bin/tool").write_bytes(b"\x7fELF...")
    (root / "bin/tool").chmod(0o700)
    (root / "etc").mkdir()
    (root / "etc/conf").write_text("abc")
    (root / "init").symlink_to("/bin/tool")
    node = cpio.Node("dev/console", stat.S_IFCHR | 0o600, 5, 1)
    cpio.write_initramfs(root, tmp_path / "a.img", (node,))
    (root / "etc/conf").touch()
    cpio.write_initramfs(root, tmp_path / "b.img", (node,))
    raw = (tmp_path / "a.img").read_bytes()
    assert raw == (tmp_path / "b.img").read_bytes()
    entries = _read_newc(gzip.decompress(raw))
    assert [e[0] for e in entries] == [
        "bin", "bin/tool", "dev", "dev/console", "etc", "etc/conf", "init",
    ]  # fmt: skip
    by_name = {e[0]: e for e in entries}
    assert by_name["bin/tool"][1] == stat.S_IFREG | 0o755
    assert by_name["etc/conf"][1:] == (stat.S_IFREG | 0o644, 0, 0, b"abc")
    assert by_name["init"][1] == stat.S_IFLNK | 0o777 and by_name["init"][4] == b"/bin/tool"
    assert by_name["dev/console"][1] == stat.S_IFCHR | 0o600
