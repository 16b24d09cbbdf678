"""Image commands through the real CLI: import a root filesystem and run it, bad input."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

from framework import popek, popek_json


def test_import_rootfs_tarball_and_run_it(popek_home: Path, minimal_image: str,
                                          tmp_path: Path) -> None:
    src = tmp_path / "rootfs.tar.gz"
    with open(popek_home / "images" / minimal_image / "rootfs.tar", "rb") as f, \
            gzip.open(src, "wb") as g:
        shutil.copyfileobj(f, g)
    popek("image", "import", str(src), "imported")
    listed = {i["name"]: i for i in popek_json("image", "list")}
    assert listed["imported"]["kinds"] == ["container"]
    # a container-only image refuses to boot as a VM, with the reason
    proc = popek("launch", "imported", "vmfromct", check=False)
    assert proc.returncode != 0 and "--container" in proc.stderr
    popek("launch", "imported", "fromtar", "--container")
    try:
        assert popek("exec", "fromtar", "--", "echo", "ok").stdout == "ok\n"
        refused = popek("image", "delete", "imported", check=False)
        assert refused.returncode != 0 and "fromtar" in refused.stderr
    finally:
        popek("delete", "--force", "fromtar")
    popek("image", "delete", "imported")
    assert "imported" not in {i["name"] for i in popek_json("image", "list")}


def test_import_bad_input_changes_nothing(popek_home: Path, minimal_image: str,
                                          tmp_path: Path) -> None:
    before = popek_json("image", "list")
    missing = popek("image", "import", str(tmp_path / "nope.tar"), "x", check=False)
    assert missing.returncode != 0 and "nope.tar" in missing.stderr
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar archive" * 100)
    bad = popek("image", "import", str(junk), "junk", check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    badname = popek("image", "import", str(junk), "Bad Name", check=False)
    assert badname.returncode != 0
    assert popek_json("image", "list") == before
    assert not any(p.name.startswith((".", "junk", "x")) and p.name not in (".lock", ".projects")
                   for p in (popek_home / "images").iterdir())


def test_unknown_builder(popek_home: Path) -> None:
    proc = popek("image", "build", "windows", check=False)
    assert proc.returncode != 0 and "unknown image builder 'windows'" in proc.stderr
