"""Manifests, image verification and the image store, on fake image dirs (no root, no QEMU)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popek.errors import AlreadyExists, ImageError, IntegrityError, InvalidInput, NotFound
from popek.images import FileEntry, Image, ImageStore, Manifest
from popek.images.process import Process

KERNEL = b"kernel bytes " * 1000
INITRD = b"initrd bytes " * 3000


def entry(data: bytes) -> FileEntry:
    return FileEntry(sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def make_manifest(name: str = "minimal", **changes: object) -> Manifest:
    fields: dict[str, object] = {
        "name": name,
        "version": "20261126.1",
        "created": "2026-11-26T12:00:00Z",
        "kernel": "vmlinuz",
        "initrd": "initrd.img",
        "cmdline": "console=ttyS0 panic=-1 quiet",
        "files": {"vmlinuz": entry(KERNEL), "initrd.img": entry(INITRD)},
        "kernel_version": "6.1.0-28-cloud-amd64",
        "arch": "x86_64",
    }
    fields.update(changes)
    return Manifest(**fields)  # type: ignore[arg-type]


def make_image_dir(root: Path, name: str = "minimal") -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "vmlinuz").write_bytes(KERNEL)
    (path / "initrd.img").write_bytes(INITRD)
    (path / "manifest.json").write_text(make_manifest(name).to_json())
    return path


def good_doc() -> dict[str, object]:
    doc: dict[str, object] = json.loads(make_manifest().to_json())
    return doc


# -- manifest ---------------------------------------------------------------


def test_round_trip() -> None:
    m = make_manifest()
    assert Manifest.from_json(m.to_json()) == m


ROOTFS = b"rootfs tar " * 2000


def test_round_trip_container_and_both() -> None:
    ct = make_manifest(
        kernel="", initrd="", kernel_version="", cmdline="", rootfs="rootfs.tar",
        files={"rootfs.tar": entry(ROOTFS)},
        process=Process(entrypoint=("/bin/sh",), cmd=("-c", "x"), env=("A=1",), working_dir="/"),
    )  # fmt: skip
    assert Manifest.from_json(ct.to_json()) == ct
    doc = json.loads(ct.to_json())
    assert doc["format"] == 2 and doc["kernel"] == "" and doc["rootfs"] == "rootfs.tar"
    assert doc["process"] == {
        "entrypoint": ["/bin/sh"], "cmd": ["-c", "x"], "env": ["A=1"], "working_dir": "/",
    }  # fmt: skip
    both = make_manifest(
        rootfs="rootfs.tar",
        files={"vmlinuz": entry(KERNEL), "initrd.img": entry(INITRD), "rootfs.tar": entry(ROOTFS)},
    )
    assert Manifest.from_json(both.to_json()) == both
    assert "process" not in json.loads(both.to_json())


def test_format_1_still_read() -> None:
    doc = good_doc()
    doc["format"] = 1
    del doc["rootfs"]
    old = Manifest.from_json(json.dumps(doc))
    assert old == make_manifest()
    assert old.rootfs == "" and old.process is None
    del doc["format"]  # the earliest manifests had no format field
    assert Manifest.from_json(json.dumps(doc)) == make_manifest()
    doc.update(format=1, rootfs="")
    with pytest.raises(ImageError, match="unknown field"):
        Manifest.from_json(json.dumps(doc))


def test_kinds_of_container_image(tmp_path: Path) -> None:
    path = tmp_path / "ct"
    path.mkdir()
    (path / "rootfs.tar").write_bytes(ROOTFS)
    m = make_manifest(
        "ct", kernel="", initrd="", kernel_version="", rootfs="rootfs.tar",
        files={"rootfs.tar": entry(ROOTFS)},
    )  # fmt: skip
    (path / "manifest.json").write_text(m.to_json())
    img = load(tmp_path, "ct")
    img.verify()
    assert img.kinds() == ["container"]
    assert img.file("rootfs") == (path / "rootfs.tar").absolute()
    with pytest.raises(ImageError, match="image 'ct' has no kernel file .it is a container image"):
        img.file("kernel")


def test_to_json_is_stable() -> None:
    assert make_manifest().to_json() == make_manifest().to_json()


@given(
    version=st.text(min_size=1).filter(str.strip),
    cmdline=st.text(),
    extra=st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9._-]{0,20}", fullmatch=True).filter(
            lambda s: s not in ("vmlinuz", "initrd.img", "manifest.json")
        ),
        st.tuples(st.binary(min_size=32, max_size=32), st.integers(0, 2**40)),
        max_size=4,
    ),
)
def test_round_trip_any_content(
    version: str, cmdline: str, extra: dict[str, tuple[bytes, int]]
) -> None:
    files = {"vmlinuz": entry(KERNEL), "initrd.img": entry(INITRD)}
    files.update({k: FileEntry(sha256=d.hex(), size=n) for k, (d, n) in extra.items()})
    m = make_manifest(version=version, cmdline=cmdline, files=files)
    assert Manifest.from_json(m.to_json()) == m


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("kernel"), "lacks field(s): kernel"),
        (lambda d: d.update(extra=1), "unknown field(s): extra"),
        (lambda d: d.update(name="Bad Name"), "name 'Bad Name' is not valid"),
        (lambda d: d.update(version=3), "'version' must be a string"),
        (lambda d: d.update(arch=""), "'arch' is empty"),
        (lambda d: d.update(created="yesterday"), "not an ISO 8601 time"),
        (lambda d: d.update(created="2026-11-26T12:00:00"), "must be in UTC"),
        (lambda d: d.update(files=[]), "'files' must be an object"),
        (lambda d: d.update(kernel="bzImage"), "kernel 'bzImage' is not listed"),
        (lambda d: d.update(format=3), "format 3 is not supported"),
        (lambda d: d.update(format="2"), "format '2' is not supported"),
        (lambda d: d.pop("rootfs"), "lacks field(s): rootfs"),
        (lambda d: d.update(kernel=""), "both a kernel and an initrd, or neither"),
        (lambda d: d.update(kernel="", initrd=""), "neither a kernel and initrd (VM) nor a rootfs"),
        (lambda d: d.update(rootfs="rootfs.tar"), "rootfs 'rootfs.tar' is not listed"),
        (lambda d: d.update(kernel_version=""), "'kernel_version' is empty"),
        (lambda d: d.update(process=[]), "'process' must be an object"),
        (lambda d: d.update(process={"cmd": "sh"}), "'process.cmd' must be a list"),
        (lambda d: d.update(process={"env": ["NOEQUALS"]}), "not NAME=VALUE"),
        (lambda d: d.update(process={"working_dir": "rel"}), "not an absolute path"),
        (lambda d: d.update(process={"user": "x"}), "unknown field(s): user"),
        (lambda d: d["files"].update({"../etc/passwd": d["files"]["vmlinuz"]}), "not valid"),
        (lambda d: d["files"].update({"manifest.json": d["files"]["vmlinuz"]}), "not valid"),
        (lambda d: d["files"]["vmlinuz"].update(sha256="abc"), "is not 64 lowercase hex"),
        (lambda d: d["files"]["vmlinuz"].update(size=-1), "not a non-negative integer"),
        (lambda d: d["files"]["vmlinuz"].update(size=True), "not a non-negative integer"),
        (lambda d: d["files"]["vmlinuz"].pop("size"), "must be an object with 'sha256'"),
    ],
)
def test_from_json_rejects(mutate: object, message: str) -> None:
    doc = good_doc()
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(ImageError, match="manifest") as info:
        Manifest.from_json(json.dumps(doc))
    assert message in str(info.value)


@pytest.mark.parametrize("text", ["", "{", "[]", "null", '"x"', "42"])
def test_from_json_rejects_non_objects(text: str) -> None:
    with pytest.raises(ImageError, match="manifest"):
        Manifest.from_json(text)


@given(st.text(max_size=200))
def test_from_json_never_crashes(text: str) -> None:
    with contextlib.suppress(ImageError):
        Manifest.from_json(text)


# -- image ------------------------------------------------------------------


def load(root: Path, name: str = "minimal") -> Image:
    return ImageStore(root=root, cache=root / "cache").get(name)


def test_verify_accepts_intact_image(tmp_path: Path) -> None:
    make_image_dir(tmp_path)
    img = load(tmp_path)
    img.verify()
    assert img.file("kernel") == (tmp_path / "minimal" / "vmlinuz").absolute()
    assert img.file("initrd") == (tmp_path / "minimal" / "initrd.img").absolute()
    assert img.kinds() == ["vm"]
    assert (img.has("kernel"), img.has("initrd"), img.has("rootfs")) == (True, True, False)
    with pytest.raises(ImageError, match="image 'minimal' has no rootfs file"):
        img.file("rootfs")
    with pytest.raises(ImageError, match="has no rootfs file"):
        img.extract_rootfs(tmp_path / "x", 0, 0)
    with pytest.raises(InvalidInput, match="unknown image file role"):
        img.file("disk")
    with pytest.raises(InvalidInput, match="unknown image file role"):
        img.has("disk")


def test_verify_detects_flipped_byte(tmp_path: Path) -> None:
    path = make_image_dir(tmp_path) / "vmlinuz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as info:
        load(tmp_path).verify()
    msg = str(info.value)
    assert msg.startswith("image 'minimal': file 'vmlinuz' has sha256 ")
    assert f"but the manifest records {entry(KERNEL).sha256}" in msg
    assert msg.endswith("rebuild or re-import the image")


def test_verify_detects_truncated_file(tmp_path: Path) -> None:
    path = make_image_dir(tmp_path) / "initrd.img"
    path.write_bytes(INITRD[:-1])
    with pytest.raises(IntegrityError, match="'initrd.img' has .* bytes but the manifest"):
        load(tmp_path).verify()


def test_verify_detects_missing_file(tmp_path: Path) -> None:
    (make_image_dir(tmp_path) / "initrd.img").unlink()
    with pytest.raises(IntegrityError, match="file 'initrd.img' is missing"):
        load(tmp_path).verify()


def test_verify_detects_extra_file(tmp_path: Path) -> None:
    (make_image_dir(tmp_path) / "evil.sh").write_text("#!/bin/sh\n")
    with pytest.raises(IntegrityError, match="not listed in the manifest: 'evil.sh'"):
        load(tmp_path).verify()


def test_verify_detects_symlink_swap(tmp_path: Path) -> None:
    path = make_image_dir(tmp_path)
    (path / "real").write_bytes(KERNEL)
    (path / "vmlinuz").unlink()
    (path / "vmlinuz").symlink_to(path / "real")
    with pytest.raises(IntegrityError, match="not a regular file"):
        load(tmp_path).verify()


# -- store ------------------------------------------------------------------


def test_store_list_get_delete(tmp_path: Path) -> None:
    store = ImageStore(root=tmp_path, cache=tmp_path / "cache")
    assert store.list() == []
    make_image_dir(tmp_path, "minimal")
    make_image_dir(tmp_path, "alpha")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    (tmp_path / ".build-minimal-x").mkdir()
    assert [i.name for i in store.list()] == ["alpha", "minimal"]
    img = store.get("minimal")
    assert img.manifest == make_manifest("minimal")
    assert img.path == (tmp_path / "minimal").absolute()
    with pytest.raises(ImageError, match="image 'broken' is broken: manifest is not valid JSON"):
        store.get("broken")
    with pytest.raises(NotFound, match="image 'nope' not found; available: alpha, broken, minimal"):
        store.get("nope")
    store.delete("broken")
    store.delete("alpha")
    assert [i.name for i in store.list()] == ["minimal"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["minimal"]
    with pytest.raises(NotFound, match="image 'alpha' not found; available: minimal"):
        store.delete("alpha")


def test_store_missing_root(tmp_path: Path) -> None:
    store = ImageStore(root=tmp_path / "none", cache=tmp_path / "cache")
    assert store.list() == []
    with pytest.raises(NotFound, match="available: none"):
        store.get("minimal")


def test_store_get_broken_images(tmp_path: Path) -> None:
    store = ImageStore(root=tmp_path, cache=tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="manifest.json is missing"):
        store.get("empty")
    make_image_dir(tmp_path, "other")
    (tmp_path / "other").rename(tmp_path / "renamed")
    with pytest.raises(ImageError, match="its manifest names it 'other'"):
        store.get("renamed")


@pytest.mark.parametrize("name", ["", "../etc", "a/b", "Minimal", ".hidden", "x" * 64])
def test_store_rejects_bad_names(tmp_path: Path, name: str) -> None:
    store = ImageStore(root=tmp_path, cache=tmp_path / "cache")
    with pytest.raises(InvalidInput, match="is not valid"):
        store.get(name)
    with pytest.raises(InvalidInput, match="is not valid"):
        store.delete(name)


def test_build_unknown_builder(tmp_path: Path) -> None:
    store = ImageStore(root=tmp_path, cache=tmp_path / "cache")
    with pytest.raises(InvalidInput, match="unknown image builder 'nope'; available: debian, min"):
        store.build("nope")


def test_build_existing_image(tmp_path: Path) -> None:
    make_image_dir(tmp_path, "minimal")
    store = ImageStore(root=tmp_path, cache=tmp_path / "cache")
    with pytest.raises(AlreadyExists, match="delete it first or use --force"):
        store.build("minimal")


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from popek.images import store as store_mod
    from popek.images.builder import BuildContext, BuildResult

    def failing(ctx: BuildContext) -> BuildResult:
        (ctx.out / "vmlinuz").write_bytes(KERNEL)
        raise ImageError("download failed")

    monkeypatch.setitem(store_mod.BUILDERS, "minimal", failing)
    make_image_dir(tmp_path, "minimal")
    store = ImageStore(root=tmp_path, cache=tmp_path / "cache")
    with pytest.raises(ImageError, match="download failed"):
        store.build("minimal", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "minimal"]
    store.get("minimal").verify()


def test_fake_build_publishes_verified_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from popek.images import store as store_mod
    from popek.images.builder import BuildContext, BuildResult

    def fake(ctx: BuildContext) -> BuildResult:
        ctx.progress("writing")
        (ctx.out / "vmlinuz").write_bytes(KERNEL)
        (ctx.out / "initrd.img").write_bytes(INITRD)
        return BuildResult("1", "vmlinuz", "initrd.img", "console=ttyS0", "6.1.0-1", "x86_64")

    monkeypatch.setitem(store_mod.BUILDERS, "minimal", fake)
    messages: list[str] = []
    store = ImageStore(root=tmp_path / "images", cache=tmp_path / "cache")
    img = store.build("minimal", progress=messages.append)
    img.verify()
    assert "writing" in messages
    assert img.manifest.files == {"vmlinuz": entry(KERNEL), "initrd.img": entry(INITRD)}
    for p in img.path.iterdir():
        assert p.stat().st_mode & 0o777 == 0o644
    assert img.path.stat().st_mode & 0o777 == 0o755
    assert store.build("minimal", force=True).manifest.files == img.manifest.files
