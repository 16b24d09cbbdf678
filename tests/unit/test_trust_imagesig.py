"""Signed images: what check_image refuses before anything runs (fake image dirs, no root)."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popek.errors import InvalidInput, NotFound
from popek.images import Image, ImageStore
from popek.images.image import SIG_NAME
from popek.state.store import SQLiteStore
from popek.trust import imagesig
from popek.trust.imagesig import (
    allow_unsigned,
    check_image,
    read_signature,
    set_allow_unsigned,
    sign_image,
)
from popek.trust.keys import PURPOSES, TrustError, TrustStore, canonical, now, private_key_path
from unit.test_images_manifest import make_image_dir, make_manifest


@pytest.fixture
def trust(trust: TrustStore) -> TrustStore:
    """The shared trust store with an image key named ``signer``."""
    trust.keygen("signer", "image")
    return trust


@pytest.fixture
def images(tmp_path: Path) -> ImageStore:
    make_image_dir(tmp_path / "images", "minimal")
    make_image_dir(tmp_path / "images", "other")
    return ImageStore(root=tmp_path / "images", cache=tmp_path / "cache")


def sig_doc(image: Image) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((image.path / SIG_NAME).read_text())
    return doc


def write_sig(image: Image, doc: dict[str, Any]) -> None:
    (image.path / SIG_NAME).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def forge(image: Image, statement: dict[str, Any], priv: Ed25519PrivateKey,
          purpose: bytes = PURPOSES["image"]) -> None:
    """Write a manifest.sig over ``statement`` signed by ``priv`` (as an attacker could)."""
    sig = base64.b64encode(priv.sign(purpose + canonical(statement))).decode()
    write_sig(image, {"format": 1, "statement": statement, "signature": sig})


def load_private(name: str) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(private_key_path(name).read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


# -- signing and the good path ----------------------------------------------------


def test_signed_image_passes(trust: TrustStore, images: ImageStore) -> None:
    img = images.get("minimal")
    made = sign_image(trust, img, "signer", days=30)
    assert made.signed and made.signer == "signer" and made.serial == 1
    assert made.signer_id == trust.by_name("signer").id
    doc = sig_doc(img)
    st_ = doc["statement"]
    assert doc["format"] == 1
    assert st_["name"] == "minimal" and st_["serial"] == 1 and st_["signer"] == made.signer_id
    assert st_["manifest_sha256"] == hashlib.sha256(
        (img.path / "manifest.json").read_bytes()).hexdigest()
    assert st_["files"] == {f: {"sha256": e.sha256, "size": e.size}
                            for f, e in img.manifest.files.items()}
    assert st_["cmdline"] == img.manifest.cmdline and st_["version"] == img.manifest.version
    assert (img.path / SIG_NAME).stat().st_mode & 0o777 == 0o644
    assert not list(img.path.glob(".*.tmp"))

    got = check_image(trust, images.get("minimal"), "minimal", "default")
    assert got.signed and got.signer == "signer" and got.serial == 1
    assert got.statement_sha256 == made.statement_sha256 \
        == hashlib.sha256(canonical(st_)).hexdigest()
    assert got.note == "signed by signer (serial 1)"
    assert got.to_doc()["statement_sha256"] == got.statement_sha256
    # launching the same image again is fine (same serial)
    assert check_image(trust, images.get("minimal"), "minimal", "default").serial == 1


def test_each_signature_gets_a_higher_serial(trust: TrustStore, images: ImageStore) -> None:
    img = images.get("minimal")
    assert [sign_image(trust, img, "signer").serial for _ in range(3)] == [1, 2, 3]
    assert check_image(trust, img, "minimal", "default").serial == 3
    # serials are per image name
    assert sign_image(trust, images.get("other"), "signer").serial == 1


def test_expiry_is_days_from_now(trust: TrustStore, images: ImageStore) -> None:
    img = images.get("minimal")
    sign_image(trust, img, "signer", days=7)
    expires = imagesig.parse_time(sig_doc(img)["statement"]["expires"], "x")
    assert abs(expires - (now() + timedelta(days=7))) <= timedelta(seconds=5)


@pytest.mark.parametrize("days", [0, -3, 3651])
def test_signature_validity_out_of_range(trust: TrustStore, images: ImageStore,
                                         days: int) -> None:
    img = images.get("minimal")
    with pytest.raises(InvalidInput, match="1-3650"):
        sign_image(trust, img, "signer", days=days)
    assert not (img.path / SIG_NAME).exists()


def test_signing_needs_a_trusted_image_key(trust: TrustStore, images: ImageStore) -> None:
    img = images.get("minimal")
    trust.keygen("pol", "policy")
    with pytest.raises(TrustError, match="has role 'policy', not 'image'"):
        sign_image(trust, img, "pol")
    with pytest.raises(NotFound):
        sign_image(trust, img, "nobody")
    assert not (img.path / SIG_NAME).exists()


# -- unsigned images -------------------------------------------------------------


def test_unsigned_is_refused_unless_the_project_allows_it(trust: TrustStore,
                                                          images: ImageStore) -> None:
    img = images.get("minimal")
    with pytest.raises(TrustError, match=r"not signed.*project 'default' requires signed"):
        check_image(trust, img, "minimal", "default")
    assert not allow_unsigned(trust, "lab")
    set_allow_unsigned(trust, "lab", True, actor="admin")
    assert allow_unsigned(trust, "lab")
    got = check_image(trust, img, "minimal", "lab")
    assert not got.signed and got.signer == "" and got.serial == 0
    assert got.statement_sha256 == hashlib.sha256(
        (img.path / "manifest.json").read_bytes()).hexdigest()
    assert "'lab'" in got.note
    # only that project
    with pytest.raises(TrustError, match="not signed"):
        check_image(trust, img, "minimal", "default")
    set_allow_unsigned(trust, "lab", False, actor="admin")
    with pytest.raises(TrustError, match="not signed"):
        check_image(trust, img, "minimal", "lab")


def test_allow_unsigned_does_not_excuse_a_bad_signature(trust: TrustStore,
                                                        images: ImageStore) -> None:
    set_allow_unsigned(trust, "default", True, actor="admin")
    img = images.get("minimal")
    sign_image(trust, img, "signer")
    (img.path / "manifest.json").write_text(make_manifest(cmdline="init=/bin/sh").to_json())
    with pytest.raises(TrustError, match="not the one that was signed"):
        check_image(trust, images.get("minimal"), "minimal", "default")


# -- the key ------------------------------------------------------------------------


def test_untrusted_key_is_refused(trust: TrustStore, images: ImageStore, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # signed on another host, whose key this host never trusted
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "elsewhere"))
    other = TrustStore(SQLiteStore(tmp_path / "elsewhere.db"))
    other.keygen("theirs", "image")
    img = images.get("minimal")
    sign_image(other, img, "theirs")
    assert check_image(other, img, "minimal", "default").signer == "theirs"
    with pytest.raises(TrustError, match="not trusted on this host"):
        check_image(trust, img, "minimal", "default")


def test_removed_key_is_refused(trust: TrustStore, images: ImageStore) -> None:
    img = images.get("minimal")
    sign_image(trust, img, "signer")
    trust.remove("signer")
    with pytest.raises(TrustError, match="not trusted"):
        check_image(trust, img, "minimal", "default")


def test_revoked_key_is_refused(trust: TrustStore, images: ImageStore) -> None:
    img = images.get("minimal")
    sign_image(trust, img, "signer")
    trust.revoke("signer", reason="leaked")
    with pytest.raises(TrustError, match="revoked.*leaked"):
        check_image(trust, img, "minimal", "default")


def test_wrong_role_key_is_refused(trust: TrustStore, images: ImageStore) -> None:
    img = images.get("minimal")
    sign_image(trust, img, "signer")
    statement = sig_doc(img)["statement"]
    for role in ("policy", "audit", "attestation"):
        rec = trust.keygen(f"k-{role}", role)
        # a perfectly valid Ed25519 signature over the image purpose, by a non-image key
        forge(img, {**statement, "signer": rec.id}, load_private(rec.name))
        with pytest.raises(TrustError, match=f"has role '{role}', not 'image'"):
            check_image(trust, img, "minimal", "default")


def test_signature_under_another_purpose_is_refused(trust: TrustStore,
                                                    images: ImageStore) -> None:
    img = images.get("minimal")
    sign_image(trust, img, "signer")
    statement = sig_doc(img)["statement"]
    forge(img, statement, load_private("signer"), purpose=PURPOSES["policy"])
    with pytest.raises(TrustError, match="does not match"):
        check_image(trust, img, "minimal", "default")
    forge(img, statement, load_private("signer"), purpose=b"")
    with pytest.raises(TrustError, match="does not match"):
        check_image(trust, img, "minimal", "default")
    forge(img, statement, load_private("signer"))  # the control: the right purpose passes
    assert check_image(trust, img, "minimal", "default").signed


# -- what the signature says ------------------------------------------------------------


def test_expired_signature_is_refused(trust: TrustStore, images: ImageStore,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    img = images.get("minimal")
    sign_image(trust, img, "signer", days=1)
    expires = sig_doc(img)["statement"]["expires"]
    later = now() + timedelta(days=1, minutes=5)
    monkeypatch.setattr(imagesig, "now", lambda: later)
    with pytest.raises(TrustError, match=f"expired on {expires}"):
        check_image(trust, img, "minimal", "default")


def test_signature_for_another_name_is_refused(trust: TrustStore, images: ImageStore) -> None:
    sign_image(trust, images.get("minimal"), "signer")
    with pytest.raises(TrustError, match="signature is for 'minimal', not for 'other'"):
        check_image(trust, images.get("minimal"), "other", "default")
    # copied next to another image (whose manifest is byte-identical apart from its name)
    other = images.get("other")
    (other.path / SIG_NAME).write_bytes((images.get("minimal").path / SIG_NAME).read_bytes())
    with pytest.raises(TrustError, match="not for 'other'"):
        check_image(trust, other, "other", "default")


def test_serial_rollback_is_refused(trust: TrustStore, images: ImageStore) -> None:
    img = images.get("minimal")
    sign_image(trust, img, "signer")
    assert check_image(trust, img, "minimal", "default").serial == 1
    old_manifest = (img.path / "manifest.json").read_bytes()
    old_sig = (img.path / SIG_NAME).read_bytes()
    # a newer build of the image, signed and launched
    (img.path / "manifest.json").write_text(make_manifest(version="20261201.1").to_json())
    new = images.get("minimal")
    assert sign_image(trust, new, "signer").serial == 2
    assert check_image(trust, new, "minimal", "default").serial == 2
    # someone puts the old (validly signed) image back
    (img.path / "manifest.json").write_bytes(old_manifest)
    (img.path / SIG_NAME).write_bytes(old_sig)
    with pytest.raises(TrustError, match="serial 1, lower than serial 2.*rollback"):
        check_image(trust, images.get("minimal"), "minimal", "default")


def test_rollback_is_refused_even_in_another_project(trust: TrustStore,
                                                     images: ImageStore) -> None:
    img = images.get("minimal")
    sign_image(trust, img, "signer")
    old_sig = (img.path / SIG_NAME).read_bytes()
    sign_image(trust, img, "signer")
    check_image(trust, img, "minimal", "a")
    (img.path / SIG_NAME).write_bytes(old_sig)
    with pytest.raises(TrustError, match="rollback"):
        check_image(trust, img, "minimal", "b")


@pytest.mark.parametrize("serial", [0, -1, True, "2", 1.0])
def test_signed_serial_must_be_a_positive_integer(trust: TrustStore, images: ImageStore,
                                                  serial: object) -> None:
    img = images.get("minimal")
    sign_image(trust, img, "signer")
    forge(img, {**sig_doc(img)["statement"], "serial": serial}, load_private("signer"))
    with pytest.raises(TrustError, match="not a positive integer"):
        check_image(trust, img, "minimal", "default")


# -- the manifest and the signature file ---------------------------------------------


def test_edited_manifest_is_refused(trust: TrustStore, images: ImageStore) -> None:
    img = images.get("minimal")
    sign_image(trust, img, "signer")
    (img.path / "manifest.json").write_text(make_manifest(cmdline="init=/bin/sh").to_json())
    with pytest.raises(TrustError, match="manifest.json is not the one that was signed"):
        check_image(trust, images.get("minimal"), "minimal", "default")


def test_reformatted_manifest_is_refused(trust: TrustStore, images: ImageStore) -> None:
    img = images.get("minimal")
    sign_image(trust, img, "signer")
    text = (img.path / "manifest.json").read_text()
    (img.path / "manifest.json").write_text(text + "\n")  # same meaning, other bytes
    with pytest.raises(TrustError, match="not the one that was signed"):
        check_image(trust, images.get("minimal"), "minimal", "default")


def test_manifest_changed_after_it_was_read_is_refused(trust: TrustStore,
                                                       images: ImageStore) -> None:
    img = images.get("minimal")  # read now, with the old manifest
    (img.path / "manifest.json").write_text(make_manifest(version="20270101.1").to_json())
    sign_image(trust, images.get("minimal"), "signer")  # the new one is signed
    with pytest.raises(TrustError, match="changed after it was read"):
        check_image(trust, img, "minimal", "default")


def test_statement_file_list_must_match_the_manifest(trust: TrustStore,
                                                     images: ImageStore) -> None:
    img = images.get("minimal")
    sign_image(trust, img, "signer")
    st_ = sig_doc(img)["statement"]
    files = {**st_["files"], "vmlinuz": {"sha256": "0" * 64, "size": 1}}
    for changed in ({"files": files}, {"cmdline": "init=/bin/sh"}, {"version": "1"}):
        forge(img, {**st_, **changed}, load_private("signer"))
        with pytest.raises(TrustError, match="files, version or cmdline differ"):
            check_image(trust, img, "minimal", "default")


@pytest.mark.parametrize("content", [
    b"", b"not json", b"[]", b'{"format": 2, "statement": {}, "signature": ""}',
    b'{"format": 1, "statement": [], "signature": ""}',
    b'{"format": 1, "statement": {}, "signature": 5}',
    b'{"format": 1, "statement": {"name": "minimal"}, "signature": ""}',
    b"\xff\xfe\x00garbage",
])
def test_broken_signature_file_is_refused(trust: TrustStore, images: ImageStore,
                                          content: bytes) -> None:
    img = images.get("minimal")
    (img.path / SIG_NAME).write_bytes(content)
    with pytest.raises(TrustError, match="not a valid signature file"):
        read_signature(img)
    with pytest.raises(TrustError, match="not a valid signature file"):
        check_image(trust, img, "minimal", "default")


def test_extra_statement_field_is_refused(trust: TrustStore, images: ImageStore) -> None:
    img = images.get("minimal")
    sign_image(trust, img, "signer")
    forge(img, {**sig_doc(img)["statement"], "note": "x"}, load_private("signer"))
    with pytest.raises(TrustError, match="fields are not the expected ones"):
        check_image(trust, img, "minimal", "default")


def _statement_span(text: str) -> tuple[int, int]:
    start = text.index('"statement": {') + len('"statement": ')
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return start, i + 1
    raise AssertionError("unbalanced")


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.floats(min_value=0, max_value=1, exclude_max=True),
       mask=st.integers(min_value=1, max_value=255))
def test_any_flipped_byte_in_the_statement_is_refused(
        trust: TrustStore, images: ImageStore, where: float, mask: int) -> None:
    img = images.get("minimal")
    sig = img.path / SIG_NAME
    if not sig.exists():
        sign_image(trust, img, "signer")
        (img.path / "good.sig").write_bytes(sig.read_bytes())
    good = (img.path / "good.sig").read_bytes()
    start, end = _statement_span(good.decode())
    # a flip of layout whitespace keeps the JSON (and the statement) the same: skip those
    offsets = [i for i in range(start, end) if good[i] not in b" \n\t\r"]
    pos = offsets[int(where * len(offsets))]
    bad = bytearray(good)
    bad[pos] ^= mask
    sig.write_bytes(bytes(bad))
    try:
        with pytest.raises(TrustError):
            check_image(trust, img, "minimal", "default")
    finally:
        sig.write_bytes(good)
    assert check_image(trust, img, "minimal", "default").signed  # the control


def test_flipped_signature_byte_is_refused(trust: TrustStore, images: ImageStore) -> None:
    img = images.get("minimal")
    sign_image(trust, img, "signer")
    doc = sig_doc(img)
    raw = bytearray(base64.b64decode(doc["signature"]))
    raw[10] ^= 0x40
    write_sig(img, {**doc, "signature": base64.b64encode(bytes(raw)).decode()})
    with pytest.raises(TrustError, match="does not match"):
        check_image(trust, img, "minimal", "default")


def test_a_refused_check_does_not_advance_the_serial(trust: TrustStore,
                                                     images: ImageStore) -> None:
    img = images.get("minimal")
    sign_image(trust, img, "signer")
    good = (img.path / SIG_NAME).read_bytes()
    # validly signed with a high serial, but for another name: refused, and not "seen"
    forge(img, {**sig_doc(img)["statement"], "name": "other", "serial": 9},
          load_private("signer"))
    with pytest.raises(TrustError, match="not for 'minimal'"):
        check_image(trust, img, "minimal", "default")
    (img.path / SIG_NAME).write_bytes(good)
    assert check_image(trust, img, "minimal", "default").serial == 1
