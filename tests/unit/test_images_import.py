"""Importing rootfs tarballs and OCI image layouts (built here, no network, no root)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import platform
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from popek.errors import AlreadyExists, ImageError, InvalidInput
from popek.images import ImageStore
from popek.images.oci import GOARCH
from popek.images.process import Process

Entry = tuple[str, bytes, bytes, dict[str, object]]


def tar_bytes(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data, kw in entries:
            info = tarfile.TarInfo(name)
            info.type, info.mtime = kind, 1_600_000_000
            info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            for key, value in kw.items():
                setattr(info, key, value)
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


def f(name: str, data: bytes = b"", **kw: object) -> Entry:
    return (name, tarfile.REGTYPE, data, kw)


def d(name: str, **kw: object) -> Entry:
    return (name, tarfile.DIRTYPE, b"", kw)


def members(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return {i.name: i for i in tar.getmembers()}


def read(path: Path, name: str) -> bytes:
    with tarfile.open(path) as tar:
        got = tar.extractfile(name)
        assert got is not None
        return got.read()


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(root=tmp_path / "images", cache=tmp_path / "cache")


def left_behind(store: ImageStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir() if p.name != ".lock")


# -- rootfs tarballs --------------------------------------------------------------

ROOTFS = [
    d("./"),
    d("./bin"),
    f("./bin/sh", b"#!shell", mode=0o755),
    f("./usr/bin/passwd", b"suid", mode=0o4755, uid=0, gid=0),
    ("./bin/ln", tarfile.LNKTYPE, b"", {"linkname": "./bin/sh"}),
    ("./dev/null", tarfile.CHRTYPE, b"", {"devmajor": 1, "devminor": 3}),
    ("./dev/fifo", tarfile.FIFOTYPE, b"", {}),
    f("./home/u/file", b"data", uid=1000, gid=1000, uname="someone", gname="users"),
]


def compressors() -> list[str]:
    found = ["tar", "tar.gz", "tar.xz"]
    return [*found, "tar.zst"] if shutil.which("zstd") else found


def write_compressed(path: Path, blob: bytes, kind: str) -> Path:
    out = path.with_name(f"{path.name}.{kind}")
    if kind == "tar.gz":
        out.write_bytes(gzip.compress(blob))
    elif kind == "tar.xz":
        out.write_bytes(lzma.compress(blob))
    elif kind == "tar.zst":
        out.with_suffix("").write_bytes(blob)
        subprocess.run(["zstd", "-q", "-f", "-o", str(out), str(out.with_suffix(""))], check=True)
    else:
        out.write_bytes(blob)
    return out


@pytest.mark.parametrize("kind", compressors())
def test_tarball_import_normalises(tmp_path: Path, store: ImageStore, kind: str) -> None:
    src = write_compressed(tmp_path / "rootfs", tar_bytes(ROOTFS), kind)
    img = store.import_file(src, "imported")
    assert img.kinds() == ["container"]
    assert img.manifest.version == "sha256:" + hashlib.sha256(src.read_bytes()).hexdigest()
    assert img.manifest.process is None and img.manifest.kernel == ""
    img.verify()
    out = img.file("rootfs")
    got = members(out)
    assert list(got) == [
        ".", "bin", "bin/ln", "bin/sh", "home", "home/u", "home/u/file", "usr", "usr/bin",
        "usr/bin/passwd",
    ]  # fmt: skip
    # bin/ln sorts first, so it carries the data and bin/sh becomes the hardlink
    assert got["bin/ln"].isreg() and read(out, "bin/ln") == b"#!shell"
    assert got["bin/sh"].islnk() and got["bin/sh"].linkname == "bin/ln"
    assert got["usr/bin/passwd"].mode == 0o4755
    assert (got["home/u/file"].uid, got["home/u/file"].uname) == (1000, "")
    img.extract_rootfs(tmp_path / "x", 0, 0)
    assert (tmp_path / "x/bin/ln").read_bytes() == b"#!shell"


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([f("/etc/passwd", b"x")], "'/etc/passwd' has an absolute path"),
        ([f("../x", b"x")], "'../x' has a '..' component"),
        (
            [("lib", tarfile.SYMTYPE, b"", {"linkname": "/"}), f("lib/x", b"x")],
            "'lib/x' lies under 'lib', which is a symlink",
        ),
        ([("h", tarfile.LNKTYPE, b"", {"linkname": "/etc/shadow"})], "absolute path"),
    ],
)
def test_unsafe_tarball_refused(
    tmp_path: Path, store: ImageStore, entries: list[Entry], message: str
) -> None:
    src = tmp_path / "bad.tar"
    src.write_bytes(tar_bytes(entries))
    with pytest.raises(ImageError, match="tar member") as info:
        store.import_file(src, "bad")
    assert message in str(info.value)
    assert left_behind(store) == []
    assert list((tmp_path / "cache").iterdir()) == []


def test_import_bad_input(tmp_path: Path, store: ImageStore) -> None:
    with pytest.raises(InvalidInput, match="image name 'Bad' is not valid"):
        store.import_file(tmp_path / "x.tar", "Bad")
    with pytest.raises(InvalidInput, match="does not exist"):
        store.import_file(tmp_path / "nope.tar", "ok")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ImageError, match="not a valid tar archive"):
        store.import_file(tmp_path / "junk.tar", "ok")
    (tmp_path / "junk.tar.gz").write_bytes(b"\x1f\x8b" + b"broken")
    with pytest.raises(ImageError, match="cannot decompress junk.tar.gz"):
        store.import_file(tmp_path / "junk.tar.gz", "ok")
    assert left_behind(store) == []
    (tmp_path / "ok.tar").write_bytes(tar_bytes(ROOTFS))
    store.import_file(tmp_path / "ok.tar", "ok")
    with pytest.raises(AlreadyExists):
        store.import_file(tmp_path / "ok.tar", "ok")
    store.import_file(tmp_path / "ok.tar", "ok", force=True)


# -- OCI layouts ------------------------------------------------------------------


class Layout:
    """Writes an OCI image layout with blobs named by their digest."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs/sha256").mkdir(parents=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')

    def blob(self, data: bytes, media_type: str) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (self.root / "blobs/sha256" / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


LAYER1 = [
    d("etc"),
    f("etc/a", b"a"),
    f("etc/b", b"b"),
    d("data"),
    f("data/x", b"x"),
    f("data/y", b"y"),
    f("bin/tool", b"old"),
    ("dev/null", tarfile.CHRTYPE, b"", {"devmajor": 1, "devminor": 3}),
]
LAYER2 = [
    f("etc/.wh.a"),
    f("data/.wh..wh..opq"),
    f("data/z", b"z"),
    f("bin/tool", b"new", mode=0o755),
    ("bin/alias", tarfile.LNKTYPE, b"", {"linkname": "etc/b"}),
]
CONFIG = {
    "Entrypoint": ["/bin/tool"],
    "Cmd": ["--serve"],
    "Env": ["PATH=/bin", "MODE=test"],
    "WorkingDir": "/data",
}


def make_oci(root: Path, corrupt_layer: bool = False, bad_diff_id: bool = False) -> Path:
    lay = Layout(root)
    t1, t2 = tar_bytes(LAYER1), tar_bytes(LAYER2)
    l1 = lay.blob(t1, "application/vnd.oci.image.layer.v1.tar")
    l2 = lay.blob(gzip.compress(t2, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip")
    diff_ids = [f"sha256:{hashlib.sha256(t).hexdigest()}" for t in (t1, t2)]
    if bad_diff_id:
        diff_ids[1] = "sha256:" + "0" * 64
    arch = GOARCH.get(platform.machine(), platform.machine())
    config = {
        "architecture": arch,
        "os": "linux",
        "config": CONFIG,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    cfg = lay.blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cfg,
        "layers": [l1, l2],
    }
    man = lay.blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    other = dict(man, platform={"os": "linux", "architecture": "s390x"})
    index = {
        "schemaVersion": 2,
        "manifests": [other, dict(man, platform={"os": "linux", "architecture": arch})],
    }
    (root / "index.json").write_text(json.dumps(index))
    if corrupt_layer:
        path = root / "blobs/sha256" / str(l1["digest"]).removeprefix("sha256:")
        data = bytearray(path.read_bytes())
        data[data.index(b"a", 600)] ^= 1
        path.write_bytes(bytes(data))
    return root


def check_oci_result(store: ImageStore, name: str, tmp_path: Path) -> None:
    img = store.get(name)
    img.verify()
    assert img.kinds() == ["container"]
    assert img.manifest.version.startswith("sha256:")
    assert img.manifest.process == Process(
        entrypoint=("/bin/tool",), cmd=("--serve",), env=("PATH=/bin", "MODE=test"),
        working_dir="/data",
    )  # fmt: skip
    out = img.file("rootfs")
    got = members(out)
    assert sorted(got) == [
        ".", "bin", "bin/alias", "bin/tool", "data", "data/z", "etc", "etc/b",
    ]  # fmt: skip
    assert read(out, "bin/tool") == b"new" and got["bin/tool"].mode == 0o755
    assert got["bin/alias"].isreg() and read(out, "bin/alias") == b"b"  # sorts before etc/b
    assert got["etc/b"].islnk() and got["etc/b"].linkname == "bin/alias"
    dest = tmp_path / f"{name}-rootfs"
    img.extract_rootfs(dest, 0, 0)
    assert (dest / "etc/b").read_bytes() == b"b" and not (dest / "etc/a").exists()


def test_oci_layout_dir_import(tmp_path: Path, store: ImageStore) -> None:
    src = make_oci(tmp_path / "layout")
    store.import_file(src, "app")
    check_oci_result(store, "app", tmp_path)


@pytest.mark.parametrize("packing", ["tar", "tar.gz"])
def test_oci_layout_tar_import(tmp_path: Path, store: ImageStore, packing: str) -> None:
    src = make_oci(tmp_path / "layout")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for p in sorted(src.rglob("*")):
            tar.add(p, arcname=p.relative_to(src).as_posix(), recursive=False)
    archive = write_compressed(tmp_path / "app", buf.getvalue(), packing)
    store.import_file(archive, "app")
    check_oci_result(store, "app", tmp_path)


def test_oci_digest_mismatch_refused(tmp_path: Path, store: ImageStore) -> None:
    src = make_oci(tmp_path / "layout", corrupt_layer=True)
    with pytest.raises(
        ImageError,
        match=r"OCI blob sha256:[0-9a-f]{64} has digest .* does not " "match its descriptor",
    ):
        store.import_file(src, "app")
    assert left_behind(store) == []
    assert list((tmp_path / "cache").iterdir()) == []


def test_oci_diff_id_mismatch_refused(tmp_path: Path, store: ImageStore) -> None:
    src = make_oci(tmp_path / "layout", bad_diff_id=True)
    with pytest.raises(ImageError, match="but the config's diff_id is sha256:0000"):
        store.import_file(src, "app")
    assert left_behind(store) == []


def test_oci_symlinked_blob_refused(tmp_path: Path, store: ImageStore) -> None:
    src = make_oci(tmp_path / "layout")
    (tmp_path / "elsewhere").mkdir()
    (src / "blobs").rename(tmp_path / "elsewhere/blobs")
    (src / "blobs").symlink_to(tmp_path / "elsewhere/blobs")
    with pytest.raises(ImageError, match="cannot open blobs/sha256/"):
        store.import_file(src, "app")


def test_oci_no_matching_platform(tmp_path: Path, store: ImageStore) -> None:
    src = make_oci(tmp_path / "layout")
    index = json.loads((src / "index.json").read_text())
    for m in index["manifests"]:
        m["platform"]["architecture"] = "s390x"
    (src / "index.json").write_text(json.dumps(index))
    with pytest.raises(ImageError, match="has no linux/.* manifest .found: linux/s390x"):
        store.import_file(src, "app")


# -- compression bombs --------------------------------------------------------------

BOMB_PART = 64 << 20  # zeros per compressed member; 20 members inflate to 1.25 GiB


def write_bomb(path: Path, kind: str, parts: int = 20) -> Path:
    """A small file of ``kind`` that decompresses to ``parts`` x 64 MiB of zeros.

    gzip, xz and zstd all read concatenated members (streams, frames) as one
    file, so one compressed member is repeated: cheap to make, costly to inflate.
    """
    zeros = bytes(BOMB_PART)
    if kind == "gzip":
        member = gzip.compress(zeros, compresslevel=9, mtime=0)
    elif kind == "xz":
        member = lzma.compress(zeros, preset=0)
    else:
        member = subprocess.run(["zstd", "-q", "-19", "-c"], input=zeros, capture_output=True,
                                check=True).stdout
    path.write_bytes(member * parts)
    return path


def test_decompression_bound() -> None:
    from popek.images import compress

    assert compress.bound(0) == compress.bound(1 << 20) == 256 << 20  # the floor
    assert compress.bound(10 << 20) == 1000 << 20  # 100x
    assert compress.bound(1 << 40) == 32 << 30  # the cap


@pytest.mark.parametrize("kind", ["gzip", "xz", *(["zstd"] if shutil.which("zstd") else [])])
def test_compression_bomb_refused(tmp_path: Path, store: ImageStore, kind: str) -> None:
    """A 1.25 GiB bomb in a few MiB is refused once it has inflated 256 MiB, not fully."""
    from popek.images import compress

    src = write_bomb(tmp_path / "bomb.tar.x", kind)
    assert compress.sniff(src) == kind and src.stat().st_size < (256 << 20) // 100
    with pytest.raises(ImageError) as info:
        store.import_file(src, "bomb")
    message = str(info.value)
    assert message.startswith(f"bomb.tar.x ({kind}, ") and "\n" not in message
    assert "decompresses to more than 256MiB; refusing it as a compression bomb" in message
    assert "allowed: at most 100x the compressed size or 256MiB" in message
    assert left_behind(store) == []
    assert list((tmp_path / "cache").iterdir()) == []


def test_compression_bomb_layer_refused(tmp_path: Path, store: ImageStore) -> None:
    """The same bomb as an OCI layer (its diff_id is never reached)."""
    lay = Layout(tmp_path / "layout")
    bomb = write_bomb(tmp_path / "layer.gz", "gzip").read_bytes()
    layer = lay.blob(bomb, "application/vnd.oci.image.layer.v1.tar+gzip")
    arch = GOARCH.get(platform.machine(), platform.machine())
    config = {"architecture": arch, "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]}}
    cfg = lay.blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": cfg, "layers": [layer]}
    man = lay.blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    (tmp_path / "layout/index.json").write_text(json.dumps({"schemaVersion": 2,
                                                            "manifests": [man]}))
    with pytest.raises(ImageError, match=r"^layer0\.blob \(gzip, .*decompresses to more than "
                                         r"256MiB; refusing it as a compression bomb"):
        store.import_file(tmp_path / "layout", "bomb")
    assert left_behind(store) == []
    assert list((tmp_path / "cache").iterdir()) == []
