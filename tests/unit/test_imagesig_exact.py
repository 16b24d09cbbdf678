"""Signed images: exact verdicts, records and messages (popek.trust.imagesig).

Written against the survivors of ``make mutants`` (bench/mutants.py): where
the serial of a new signature comes from, the verdict's fields, the file and
store records written, the expiry boundary and the refusals' wording.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from popek.images import Image, ImageStore
from popek.images.image import SIG_NAME
from popek.trust import imagesig
from popek.trust.imagesig import (
    PROJECTS,
    SERIALS,
    Verdict,
    check_image,
    read_signature,
    set_allow_unsigned,
    sign_image,
)
from popek.trust.keys import TrustError, TrustStore, canonical, parse_time, private_key_path
from unit.test_images_manifest import make_image_dir
from unit.test_trust_imagesig import forge, load_private, sig_doc, trust, write_sig

__all__ = ["trust"]  # the fixture: the shared trust store with an image key ``signer``


@pytest.fixture
def img(tmp_path: Path) -> Image:
    make_image_dir(tmp_path / "images", "minimal")
    return ImageStore(root=tmp_path / "images", cache=tmp_path / "cache").get("minimal")


def _serials(trust: TrustStore) -> dict[str, int]:
    kv = trust.store.get(SERIALS + "minimal")
    assert kv is not None
    return dict(json.loads(kv.value))


def test_sign_verdict_file_and_serial_record(trust: TrustStore, img: Image) -> None:
    made = sign_image(trust, img, "signer", days=3650)  # the longest validity allowed
    payload_digest = hashlib.sha256(
        canonical(sig_doc(img)["statement"])).hexdigest()
    kid = trust.by_name("signer").id
    assert made == Verdict(True, "signer", kid, 1, payload_digest, "signed")
    doc = sig_doc(img)
    assert (img.path / SIG_NAME).read_text() == json.dumps(doc, indent=2, sort_keys=True) + "\n"
    assert _serials(trust) == {"signed": 1, "seen": 0}
    got = check_image(trust, img, "minimal", "default")
    assert got == Verdict(True, "signer", kid, 1, payload_digest, "signed by signer (serial 1)")
    assert got.to_doc() == {"signed": True, "signer": "signer", "signer_id": kid, "serial": 1,
                            "statement_sha256": payload_digest,
                            "note": "signed by signer (serial 1)"}
    assert _serials(trust) == {"signed": 1, "seen": 1}


@pytest.mark.parametrize(("record", "old_serial", "expected"), [
    ({"signed": 9, "seen": 0}, None, 10),   # signed here before
    ({"signed": 0, "seen": 7}, None, 8),    # seen here before
    ({"signed": 0, "seen": 0}, 5, 6),       # only the image's own manifest.sig knows
])
def test_new_serial_is_above_every_serial_known(trust: TrustStore, img: Image,
                                                record: dict[str, int], old_serial: int | None,
                                                expected: int) -> None:
    if old_serial is not None:
        for _ in range(old_serial):
            sign_image(trust, img, "signer")
    trust.store.put(SERIALS + "minimal", json.dumps(record).encode())
    assert sign_image(trust, img, "signer").serial == expected


def test_a_private_key_that_is_not_the_named_trusted_key_is_refused(
        trust: TrustStore, img: Image) -> None:
    trust.keygen("other", "image")
    shutil.copy(private_key_path("other"), private_key_path("signer"))
    with pytest.raises(TrustError) as exc:
        sign_image(trust, img, "signer")
    assert str(exc.value) == ("private key 'signer' does not match the trusted key of that "
                              "name")
    assert not (img.path / SIG_NAME).exists()


def test_unsigned_allowed_verdict(trust: TrustStore, img: Image) -> None:
    set_allow_unsigned(trust, "lab", True, "alice")
    kv = trust.store.get(PROJECTS + "lab")
    assert kv is not None
    rec = json.loads(kv.value)
    assert set(rec) == {"allow_unsigned", "changed", "by"}
    assert rec["allow_unsigned"] is True and rec["by"] == "alice"
    parse_time(rec["changed"], "changed")
    digest = hashlib.sha256((img.path / "manifest.json").read_bytes()).hexdigest()
    assert check_image(trust, img, "minimal", "lab") == Verdict(
        False, "", "", 0, digest, "unsigned, allowed by the policy of project 'lab'")


def test_a_signature_is_good_up_to_its_expiry_instant(trust: TrustStore, img: Image,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    sign_image(trust, img, "signer", days=1)
    expires = parse_time(sig_doc(img)["statement"]["expires"], "x")
    monkeypatch.setattr(imagesig, "now", lambda: expires)
    assert check_image(trust, img, "minimal", "default").signed


def test_an_unreadable_expiry_is_named(trust: TrustStore, img: Image) -> None:
    sign_image(trust, img, "signer")
    st = dict(sig_doc(img)["statement"], expires="soon")
    forge(img, st, load_private("signer"))
    with pytest.raises(TrustError) as exc:
        check_image(trust, img, "minimal", "default")
    assert str(exc.value) == "signature expiry 'soon' is not an ISO 8601 time"


def test_a_changed_cmdline_is_refused_with_the_reason(trust: TrustStore, img: Image) -> None:
    sign_image(trust, img, "signer")
    st = dict(sig_doc(img)["statement"], cmdline="console=ttyS0 init=/bin/sh")
    forge(img, st, load_private("signer"))
    with pytest.raises(TrustError) as exc:
        check_image(trust, img, "minimal", "default")
    assert str(exc.value) == ("image 'minimal': the manifest's files, version or cmdline "
                              "differ from the signed ones")


def _good_doc(trust: TrustStore, img: Image) -> dict[str, Any]:
    sign_image(trust, img, "signer")
    return sig_doc(img)


@pytest.mark.parametrize("change", [
    {"signature": 5},        # statement fine, signature not a string
    {"format": 2},           # statement and signature fine, another format
    {"statement": []},
])
def test_signature_file_shape_is_checked_field_by_field(
        trust: TrustStore, img: Image, change: dict[str, Any]) -> None:
    write_sig(img, {**_good_doc(trust, img), **change})
    with pytest.raises(TrustError) as exc:
        read_signature(img)
    assert str(exc.value) == (f"image 'minimal': {SIG_NAME} is not a valid signature file: "
                              "needs format 1, a statement object and a signature string")


def test_statement_fields_message(trust: TrustStore, img: Image) -> None:
    doc = _good_doc(trust, img)
    del doc["statement"]["cmdline"]
    write_sig(img, doc)
    with pytest.raises(TrustError) as exc:
        read_signature(img)
    assert str(exc.value) == (f"image 'minimal': {SIG_NAME} is not a valid signature file: "
                              "the statement's fields are not the expected ones")
