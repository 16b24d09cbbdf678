"""The trust store: key making, trusting, revoking, roles, purposes and validity (no root)."""

from __future__ import annotations

import base64
import stat
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popek.errors import AlreadyExists, InvalidInput, NotFound
from popek.trust import keys
from popek.trust.keys import (
    PURPOSES,
    ROLES,
    TrustedKey,
    TrustError,
    TrustStore,
    key_id,
    now,
    private_key_path,
    public_pem,
    public_raw_from_text,
)


def raw_of(priv: Ed25519PrivateKey) -> bytes:
    return priv.public_key().public_bytes(serialization.Encoding.Raw,
                                          serialization.PublicFormat.Raw)


def private(name: str) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(private_key_path(name).read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


# -- keygen and the private key files -----------------------------------------


def test_keygen_trusts_the_public_key_and_keeps_the_private_one_0600(
        trust: TrustStore, tmp_path: Path) -> None:
    rec = trust.keygen("signer", "image", days=10)
    assert (rec.name, rec.role, rec.revoked) == ("signer", "image", "")
    assert len(rec.id) == 64 and rec.id == key_id(rec.raw())
    assert trust.by_id(rec.id) == rec
    assert trust.by_name("signer") == rec
    path = private_key_path("signer")
    assert path == tmp_path / "home" / "trust" / "private" / "signer.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
    assert raw_of(private("signer")) == rec.raw()  # the pair matches
    assert keys.parse_time(rec.not_after, "x") - keys.parse_time(rec.not_before, "x") \
        == timedelta(days=10)


def test_keygen_refuses_an_existing_name(trust: TrustStore) -> None:
    trust.keygen("k", "image")
    before = private_key_path("k").read_bytes()
    with pytest.raises(AlreadyExists, match="'k'"):
        trust.keygen("k", "policy")
    assert private_key_path("k").read_bytes() == before
    assert [k.role for k in trust.all()] == ["image"]


@pytest.mark.parametrize("name", ["", "A", "-k", ".k", "k/../x", "k k", "é", "x" * 64])
def test_invalid_key_names_are_refused_with_the_rule(trust: TrustStore, name: str) -> None:
    with pytest.raises(InvalidInput, match="1-63 characters"):
        trust.keygen(name, "image")
    with pytest.raises(InvalidInput, match="1-63 characters"):
        trust.add(name, "image", raw_of(Ed25519PrivateKey.generate()))
    assert trust.all() == []
    private_dir = keys.paths.home() / "trust" / "private"
    assert not private_dir.exists() or list(private_dir.iterdir()) == []


@pytest.mark.parametrize("name", ["a", "0", "host-image", "k.1_2-x", "x" * 63])
def test_valid_key_names(trust: TrustStore, name: str) -> None:
    assert trust.keygen(name, "audit").name == name


@pytest.mark.parametrize("role", ["", "Image", "admin", "images"])
def test_unknown_roles_are_refused_naming_the_allowed_ones(trust: TrustStore, role: str) -> None:
    with pytest.raises(InvalidInput, match="image, policy, audit, attestation"):
        trust.keygen("k", role)
    with pytest.raises(InvalidInput, match="unknown key role"):
        trust.add("k", role, raw_of(Ed25519PrivateKey.generate()))
    assert trust.all() == []
    assert not private_key_path("k").exists()


@pytest.mark.parametrize("days", [0, -1, 36501])
def test_validity_out_of_range(trust: TrustStore, days: int) -> None:
    with pytest.raises(InvalidInput, match="1-36500"):
        trust.add("k", "image", raw_of(Ed25519PrivateKey.generate()), days=days)
    with pytest.raises(InvalidInput, match="1-36500"):
        trust.keygen("k", "image", days=days)
    assert trust.all() == []


# -- add, remove, revoke -----------------------------------------------------


def test_add_refuses_the_same_key_twice_and_the_same_name_twice(trust: TrustStore) -> None:
    raw = raw_of(Ed25519PrivateKey.generate())
    rec = trust.add("one", "image", raw)
    with pytest.raises(AlreadyExists, match="already trusted as 'one'"):
        trust.add("two", "image", raw)
    with pytest.raises(AlreadyExists, match="named 'one'"):
        trust.add("one", "image", raw_of(Ed25519PrivateKey.generate()))
    assert trust.all() == [rec]


def test_all_is_sorted_by_name(trust: TrustStore) -> None:
    for name in ["zeta", "alpha", "mid"]:
        trust.add(name, "policy", raw_of(Ed25519PrivateKey.generate()))
    assert [k.name for k in trust.all()] == ["alpha", "mid", "zeta"]


def test_by_name_unknown_lists_the_known_names(trust: TrustStore) -> None:
    with pytest.raises(NotFound, match=r"keys: none"):
        trust.by_name("nope")
    trust.add("b", "image", raw_of(Ed25519PrivateKey.generate()))
    trust.add("a", "image", raw_of(Ed25519PrivateKey.generate()))
    with pytest.raises(NotFound, match=r"'nope'.*keys: a, b"):
        trust.by_name("nope")
    assert trust.by_id("0" * 64) is None


def test_remove_stops_trusting_but_allows_adding_back(trust: TrustStore) -> None:
    rec = trust.keygen("k", "image")
    _, sig = trust.sign("k", "image", b"data")
    assert trust.remove("k") == rec
    assert trust.all() == []
    with pytest.raises(TrustError, match="not trusted"):
        trust.verify(rec.id, "image", b"data", sig)
    with pytest.raises(NotFound):
        trust.remove("k")
    again = trust.add("k2", "image", rec.raw())  # removed, not revoked: may come back
    assert trust.verify(again.id, "image", b"data", sig) == again


def test_revoked_key_is_refused_and_cannot_be_added_again(trust: TrustStore) -> None:
    rec = trust.keygen("k", "image")
    kid, sig = trust.sign("k", "image", b"data")
    assert trust.verify(kid, "image", b"data", sig).name == "k"
    revoked = trust.revoke("k", reason="laptop stolen")
    assert revoked.revoked and revoked.revoke_reason == "laptop stolen"
    assert trust.by_id(rec.id) == revoked
    with pytest.raises(TrustError, match=r"revoked on .*: laptop stolen"):
        trust.verify(kid, "image", b"data", sig)
    with pytest.raises(TrustError, match="revoked"):
        trust.check_key(kid, "image")
    with pytest.raises(TrustError, match="revoked"):
        trust.sign("k", "image", b"more")
    with pytest.raises(TrustError, match="already revoked"):
        trust.revoke("k")
    for name in ("k", "other"):
        with pytest.raises(TrustError, match="cannot be trusted again"):
            trust.add(name, "image", rec.raw())
    assert trust.by_id(rec.id) == revoked  # unchanged by the refused attempts


def test_revocation_without_reason_has_no_trailing_colon(trust: TrustStore) -> None:
    rec = trust.keygen("k", "audit")
    revoked = trust.revoke("k").revoked
    with pytest.raises(TrustError) as err:
        trust.check_key(rec.id, "audit")
    assert str(err.value).endswith(f"was revoked on {revoked}")


def test_revocation_survives_remove(trust: TrustStore) -> None:
    rec = trust.keygen("k", "image")
    trust.revoke("k")
    with pytest.raises(TrustError, match="revoked"):
        trust.remove("k")  # the record holding the revocation stays ...
    with pytest.raises(TrustError, match="cannot be trusted again"):
        trust.add("k2", "image", rec.raw())  # ... so the key can never come back


def test_a_revoked_name_may_be_reused_by_a_new_key(trust: TrustStore) -> None:
    old = trust.add("k", "image", raw_of(Ed25519PrivateKey.generate()))
    trust.revoke("k")
    new = trust.add("k", "image", raw_of(Ed25519PrivateKey.generate()))
    assert new.id != old.id
    assert trust.by_name("k") == new  # the live key comes first
    assert len(trust.all()) == 2
    assert trust.revoke("k").id == new.id


# -- roles, purposes, validity ------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_sign_and_verify_each_role(trust: TrustStore, role: str) -> None:
    rec = trust.keygen("k", role)
    kid, sig = trust.sign("k", role, b"payload")
    assert kid == rec.id
    assert trust.verify(kid, role, b"payload", sig) == rec
    for other in ROLES:
        if other != role:
            with pytest.raises(TrustError, match=f"has role '{role}', not '{other}'"):
                trust.verify(kid, other, b"payload", sig)
            with pytest.raises(TrustError, match=f"not '{other}'"):
                trust.sign("k", other, b"payload")


def test_signature_covers_the_purpose_prefix(trust: TrustStore) -> None:
    rec = trust.keygen("k", "image")
    _, sig = trust.sign("k", "image", b"payload")
    pub = Ed25519PublicKey.from_public_bytes(rec.raw())
    raw_sig = base64.b64decode(sig)
    pub.verify(raw_sig, PURPOSES["image"] + b"payload")
    with pytest.raises(InvalidSignature):
        pub.verify(raw_sig, b"payload")  # not a bare signature of the payload
    # the same private key signing under another purpose does not pass as an image signature
    other = base64.b64encode(private("k").sign(PURPOSES["policy"] + b"payload")).decode()
    with pytest.raises(TrustError, match="does not match"):
        trust.verify(rec.id, "image", b"payload", other)
    bare = base64.b64encode(private("k").sign(b"payload")).decode()
    with pytest.raises(TrustError, match="does not match"):
        trust.verify(rec.id, "image", b"payload", bare)


def test_purposes_are_distinct_and_none_is_a_prefix_of_another() -> None:
    assert set(PURPOSES) == set(ROLES)
    values = list(PURPOSES.values())
    for a in values:
        for b in values:
            if a is not b:
                assert not b.startswith(a)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=200), other=st.binary(max_size=200))
def test_signature_does_not_verify_another_payload(trust: TrustStore, payload: bytes,
                                                   other: bytes) -> None:
    if not private_key_path("p").exists():
        trust.keygen("p", "policy")
    kid, sig = trust.sign("p", "policy", payload)
    assert trust.verify(kid, "policy", payload, sig).name == "p"
    if other != payload:
        with pytest.raises(TrustError, match="does not match"):
            trust.verify(kid, "policy", other, sig)


@pytest.mark.parametrize("bad", ["", "not base64!", "AAAA", base64.b64encode(b"x" * 64).decode()])
def test_malformed_signatures_are_refused(trust: TrustStore, bad: str) -> None:
    rec = trust.keygen("k", "image")
    with pytest.raises(TrustError, match="does not match"):
        trust.verify(rec.id, "image", b"payload", bad)


def test_flipped_signature_bit_is_refused(trust: TrustStore) -> None:
    kid, sig = trust.sign(trust.host_key("audit"), "audit", b"head")
    raw = bytearray(base64.b64decode(sig))
    for i in (0, 31, 63):
        flipped = raw.copy()
        flipped[i] ^= 0x01
        with pytest.raises(TrustError):
            trust.verify(kid, "audit", b"head", base64.b64encode(bytes(flipped)).decode())


def test_unknown_key_is_not_trusted(trust: TrustStore) -> None:
    with pytest.raises(TrustError, match="is not trusted on this host"):
        trust.check_key("ab" * 32, "image")


def test_sign_without_the_private_key(trust: TrustStore) -> None:
    trust.add("pub-only", "image", raw_of(Ed25519PrivateKey.generate()))
    with pytest.raises(NotFound, match="popek trust keygen pub-only --role image"):
        trust.sign("pub-only", "image", b"x")


def test_sign_with_a_private_key_whose_public_key_is_not_trusted(trust: TrustStore) -> None:
    trust.keygen("k", "image")
    trust.remove("k")
    with pytest.raises(TrustError, match="not trusted"):
        trust.sign("k", "image", b"x")


def test_validity_window(trust: TrustStore) -> None:
    start = now() + timedelta(days=2)
    rec = trust.add("future", "image", raw_of(Ed25519PrivateKey.generate()), days=5,
                    not_before=start)
    with pytest.raises(TrustError, match="not valid before"):
        trust.check_key(rec.id, "image")
    assert trust.check_key(rec.id, "image", at=start) == rec
    assert trust.check_key(rec.id, "image", at=start + timedelta(days=5)) == rec
    with pytest.raises(TrustError, match="expired on"):
        trust.check_key(rec.id, "image", at=start + timedelta(days=5, seconds=1))
    with pytest.raises(TrustError, match="not valid before"):
        trust.check_key(rec.id, "image", at=start - timedelta(seconds=1))


def test_expired_key_signatures_are_refused(trust: TrustStore,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    rec = trust.keygen("k", "policy", days=1)
    kid, sig = trust.sign("k", "policy", b"p")
    later = now() + timedelta(days=2)
    monkeypatch.setattr(keys, "now", lambda: later)
    with pytest.raises(TrustError, match="expired"):
        trust.verify(kid, "policy", b"p", sig)
    with pytest.raises(TrustError, match="expired"):
        trust.sign("k", "policy", b"p")
    assert trust.by_id(rec.id) == rec


def test_host_key_is_made_once_per_role(trust: TrustStore) -> None:
    name = trust.host_key("attestation")
    assert name == "host-attestation"
    first = trust.by_name(name)
    assert first.role == "attestation"
    assert trust.host_key("attestation") == name
    assert trust.all() == [first]
    assert trust.host_key("audit") == "host-audit"
    assert {k.role for k in trust.all()} == {"attestation", "audit"}


def test_record_round_trip(trust: TrustStore) -> None:
    rec = trust.keygen("k", "image")
    assert TrustedKey.from_json(rec.to_json()) == rec


# -- reading public keys -------------------------------------------------------


def test_public_raw_from_pem_and_base64() -> None:
    raw = raw_of(Ed25519PrivateKey.generate())
    pem = public_pem(raw)
    assert pem.startswith("-----BEGIN PUBLIC KEY-----")
    assert public_raw_from_text(pem) == raw
    assert public_raw_from_text("\n  " + pem + "\n\n") == raw
    assert public_raw_from_text(base64.b64encode(raw).decode()) == raw
    assert public_raw_from_text(" " + base64.b64encode(raw).decode() + "\n") == raw


@settings(max_examples=20, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32))
def test_public_key_text_round_trip(seed: bytes) -> None:
    raw = raw_of(Ed25519PrivateKey.from_private_bytes(seed))
    assert public_raw_from_text(public_pem(raw)) == raw
    assert public_raw_from_text(base64.b64encode(raw).decode()) == raw


@settings(max_examples=30, deadline=None)
@given(data=st.binary(max_size=80).filter(lambda b: len(b) != 32))
def test_base64_of_the_wrong_length_is_refused(data: bytes) -> None:
    with pytest.raises(InvalidInput, match=f"{len(data)} bytes, not 32"):
        public_raw_from_text(base64.b64encode(data).decode())


def test_other_public_keys_are_refused_with_the_accepted_forms() -> None:
    ec_pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    for text in [ec_pem, "-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----",
                 "not base64 at all!", "", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI"]:
        with pytest.raises(InvalidInput, match="give a PEM public key or the base64"):
            public_raw_from_text(text)


def test_a_checked_signature_is_remembered_but_the_key_is_checked_every_time(
        trust: TrustStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from popek.trust.keys import VERIFIED_PREFIX

    trust.keygen("k", "image")
    kid, sig = trust.sign("k", "image", b"statement")
    trust.verify(kid, "image", b"statement", sig)
    assert len(trust.store.range(VERIFIED_PREFIX)) == 1

    def no_crypto(raw: bytes) -> None:
        raise AssertionError("the Ed25519 check ran again")

    monkeypatch.setattr(ed25519.Ed25519PublicKey, "from_public_bytes", no_crypto)
    assert trust.verify(kid, "image", b"statement", sig).name == "k"  # remembered
    with pytest.raises(AssertionError, match="ran again"):  # another payload: checked afresh
        trust.verify(kid, "image", b"statement2", sig)
    monkeypatch.undo()
    with pytest.raises(TrustError, match="does not match"):
        trust.verify(kid, "image", b"statement2", sig)
    with pytest.raises(TrustError, match="not 'policy'"):  # the role is still checked
        trust.verify(kid, "policy", b"statement", sig)
    trust.revoke("k")
    with pytest.raises(TrustError, match="revoked"):  # so is revocation
        trust.verify(kid, "image", b"statement", sig)
