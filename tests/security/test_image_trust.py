"""Attacks with modified, unsigned, replayed or badly signed images: each launch is refused.

The threat (survey, section V): a modified VM image, or an old vulnerable one
put back.  popek checks, before anything starts, the signing key (trusted,
role image, not revoked, valid), the signature, the signed name, the expiry
and the serial (no rollback), then hashes each file on the bytes the engine
uses.  Every refusal must leave no instance and no process behind.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from framework import Home, processes_mentioning

CTR = ["--container", "--memory", "128MiB"]


@pytest.fixture(scope="module")
def home(popek_home: Path, minimal_image: str) -> Iterator[Home]:
    h = Home(popek_home)
    yield h
    h.close()


@pytest.fixture()
def signed(home: Home) -> Iterator[Path]:
    """The minimal image signed by this home's image key; restored after the test."""
    img = home.path / "images" / "minimal"
    backup = home.path / "minimal.orig"
    if not backup.exists():
        shutil.copytree(img, backup)
    home.popek("image", "sign", "minimal")
    yield img
    for name in home.instances():
        home.popek("delete", "--force", name, check=False)
    shutil.rmtree(img)
    shutil.copytree(backup, img)


def _refused(home: Home, *launch: str, why: str, vm: bool = False) -> str:
    name = "victim"
    proc = home.popek("launch", "minimal", name, *(() if vm else CTR), *launch, check=False)
    assert proc.returncode != 0, proc.stdout
    assert why in proc.stderr, proc.stderr
    assert name not in home.instances()
    assert not processes_mentioning(str(home.path / "instances")), "something was started"
    return proc.stderr


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_unsigned_image_refused(home: Home) -> None:
    (home.path / "images" / "minimal" / "manifest.sig").unlink(missing_ok=True)
    _refused(home, why="is not signed")


def test_relaxing_unsigned_is_audited_and_reversible(home: Home) -> None:
    (home.path / "images" / "minimal" / "manifest.sig").unlink(missing_ok=True)
    home.popek("trust", "allow-unsigned", "--project", "default")
    try:
        home.popek("launch", "minimal", "relaxed", *CTR)
        info = json.loads(home.popek("info", "relaxed", "--format", "json").stdout)
        assert info["image_trust"]["signed"] is False
        home.popek("delete", "--force", "relaxed")
    finally:
        home.popek("trust", "allow-unsigned", "--project", "default", "--off")
    log = json.loads(home.popek("audit", "log", "--format", "json").stdout)
    relax = [(r["result"], r["change"]) for r in log if r["op"] == "trust.allow-unsigned"]
    assert relax == [("started", "allow=true"), ("ok", "allow=true"),  # what changed, in words
                     ("started", "allow=false"), ("ok", "allow=false")]
    _refused(home, why="is not signed")


@pytest.mark.parametrize("role", ["kernel", "initrd"])
def test_flipped_byte_in_boot_file_refused(home: Home, signed: Path, role: str) -> None:
    manifest = json.loads((signed / "manifest.json").read_text())
    _flip(signed / manifest[role], 4096)
    err = _refused(home, "--memory", "256MiB", why="sha256", vm=True)
    assert manifest[role] in err


def test_flipped_byte_in_rootfs_refused(home: Home, signed: Path) -> None:
    _flip(signed / "rootfs.tar", 700)
    _refused(home, why="sha256")


def test_flipped_byte_in_manifest_refused(home: Home, signed: Path) -> None:
    path = signed / "manifest.json"
    text = path.read_text()
    path.write_text(text.replace('"arch": "x86_64"', '"arch": "x86_65"')
                    if '"x86_64"' in text else text + " ")
    _refused(home, why="not the one that was signed")


def test_edited_signed_statement_refused(home: Home, signed: Path) -> None:
    sig = json.loads((signed / "manifest.sig").read_text())
    sig["statement"]["cmdline"] += " init=/bin/sh"
    (signed / "manifest.sig").write_text(json.dumps(sig))
    _refused(home, why="does not match what it signs")


def test_signature_by_untrusted_key_refused(home: Home, signed: Path) -> None:
    home.popek("trust", "keygen", "outsider", "--role", "image")
    home.popek("image", "sign", "minimal", "--key", "outsider")
    home.popek("trust", "remove", "outsider")
    _refused(home, why="is not trusted")


def test_signature_by_revoked_key_refused(home: Home, signed: Path) -> None:
    home.popek("trust", "keygen", "leaked", "--role", "image")
    home.popek("image", "sign", "minimal", "--key", "leaked")
    home.popek("launch", "minimal", "before", *CTR)  # fine until revoked
    home.popek("delete", "--force", "before")
    home.popek("trust", "revoke", "leaked", "--reason", "private key leaked")
    _refused(home, why="was revoked")
    again = home.popek("trust", "add", "-", "--name", "leaked2", "--role", "image", check=False,
                       stdin=home.popek("trust", "export", "leaked").stdout.encode())
    assert again.returncode != 0 and "revoked" in again.stderr


def test_key_of_another_role_cannot_sign_images(home: Home, signed: Path) -> None:
    home.popek("trust", "keygen", "auditor", "--role", "audit")
    proc = home.popek("image", "sign", "minimal", "--key", "auditor", check=False)
    assert proc.returncode != 0 and "role 'audit', not 'image'" in proc.stderr


def test_expired_signature_refused(home: Home, signed: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from popek.images import ImageStore
    from popek.state.store import SQLiteStore
    from popek.trust import imagesig
    from popek.trust.keys import TrustStore, now

    monkeypatch.setenv("POPEK_HOME", str(home.path))
    past = now() - timedelta(days=30)
    monkeypatch.setattr(imagesig, "now", lambda: past)
    trust = TrustStore(SQLiteStore(home.path / "state.db"))
    imagesig.sign_image(trust, ImageStore(root=home.path / "images").get("minimal"),
                        "host-image", days=1)
    _refused(home, why="expired")


def test_image_rollback_refused(home: Home, signed: Path) -> None:
    old = (signed / "manifest.sig").read_bytes()
    home.popek("image", "sign", "minimal")  # a newer serial, e.g. after a security fix
    home.popek("launch", "minimal", "current", *CTR)
    home.popek("delete", "--force", "current")
    (signed / "manifest.sig").write_bytes(old)  # an attacker puts the old one back
    _refused(home, why="refusing a rollback")


def test_image_signed_for_another_name_refused(home: Home, signed: Path) -> None:
    other = home.path / "images" / "renamed"
    shutil.copytree(signed, other)
    try:
        # the image store insists the manifest names the directory: rename it there too
        text = (other / "manifest.json").read_text()
        assert '"name": "minimal"' in text
        (other / "manifest.json").write_text(text.replace('"name": "minimal"',
                                                          '"name": "renamed"'))
        proc = home.popek("launch", "renamed", "victim", *CTR, check=False)
        assert proc.returncode != 0 and "not for 'renamed'" in proc.stderr, proc.stderr
    finally:
        shutil.rmtree(other)


def test_qemu_boots_verified_copies_not_the_image_files(home: Home, signed: Path) -> None:
    """No window between check and use: QEMU reads root-owned copies made while hashing."""
    home.popek("launch", "minimal", "vm", "--memory", "256MiB")
    info = json.loads(home.popek("info", "vm", "--format", "json").stdout)
    argv = json.loads((Path(info["workdir"]) / "qemu.argv.json").read_text())
    kernel = argv[argv.index("-kernel") + 1]
    assert kernel == str(Path(info["workdir"]) / "kernel.verified")
    assert not Path(kernel).exists(), "copies are removed once QEMU has loaded them"
    assert info["image_trust"]["signed"] is True
    assert info["image_trust"]["signer"] == "host-image"
