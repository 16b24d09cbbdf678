"""Measured launch and attestation quotes (fake engine binaries, no root)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popek import __version__
from popek.errors import InvalidInput
from popek.state.store import SQLiteStore
from popek.trust import measure as measure_mod
from popek.trust.keys import TrustError, TrustStore, canonical, now
from popek.trust.measure import (
    BINHASH,
    Measurement,
    binary_sha256,
    check_nonce,
    expected_of,
    fold,
    measure,
    quote,
    read,
    verify_quote,
    write,
)

NONCE = "ab" * 32
POLICY = 'version = 1\nlabels = ["default"]\n'


@pytest.fixture
def engine(tmp_path: Path) -> Path:
    path = tmp_path / "bin" / "qemu-system-x86_64"
    path.parent.mkdir()
    path.write_bytes(b"\x7fELF fake qemu " * 100)
    return path


def launch(trust: TrustStore, engine: Path, **changes: Any) -> Measurement:
    args: dict[str, Any] = {"engine_binary": str(engine), "config": b'["qemu", "-nodefaults"]',
                            "image_statement": "1" * 64, "policy_text": POLICY,
                            "policy_version": 1}
    args.update(changes)
    return measure(trust, **args)


# -- the fold ---------------------------------------------------------------------------


def test_fold_of_nothing_is_zero() -> None:
    assert fold([]) == "00" * 32


def test_fold_follows_the_documented_formula() -> None:
    events: list[dict[str, Any]] = [{"kind": "a", "x": 1}, {"kind": "b", "y": [1, 2]}]
    m = bytes(32)
    for ev in events:
        evh = hashlib.sha256(json.dumps(ev, sort_keys=True, separators=(",", ":")).encode())
        m = hashlib.sha256(m + evh.digest()).digest()
    assert fold(events) == m.hex()
    assert fold(events[:1]) == hashlib.sha256(
        bytes(32) + hashlib.sha256(b'{"kind":"a","x":1}').digest()).hexdigest()


def test_fold_ignores_key_order_but_not_event_order() -> None:
    a, b = {"kind": "a", "v": 1}, {"kind": "b", "v": 2}
    assert fold([{"v": 1, "kind": "a"}, b]) == fold([a, b])
    assert fold([a, b]) != fold([b, a])
    assert fold([a]) != fold([a, a])


events_st = st.lists(st.dictionaries(st.sampled_from(["kind", "sha256", "version", "path"]),
                                     st.one_of(st.text(max_size=6), st.integers(0, 9)),
                                     min_size=1), max_size=5)


@settings(max_examples=40, deadline=None)
@given(a=events_st, b=events_st)
def test_fold_is_a_commitment_to_the_whole_log(a: list[dict[str, Any]],
                                               b: list[dict[str, Any]]) -> None:
    assert (fold(a) == fold(b)) == ([canonical(e) for e in a] == [canonical(e) for e in b])


# -- measure ----------------------------------------------------------------------------


def test_measure_records_the_documented_events_in_order(trust: TrustStore,
                                                        engine: Path) -> None:
    m = launch(trust, engine)
    assert [e["kind"] for e in m.events] == ["engine", "popek", "image", "config", "policy"]
    assert m.events[0] == {"kind": "engine", "path": str(engine),
                           "sha256": hashlib.sha256(engine.read_bytes()).hexdigest()}
    assert m.events[1] == {"kind": "popek", "version": __version__}
    assert m.events[2] == {"kind": "image", "statement_sha256": "1" * 64}
    assert m.events[3]["sha256"] == hashlib.sha256(b'["qemu", "-nodefaults"]').hexdigest()
    assert m.events[4] == {"kind": "policy", "version": 1,
                           "sha256": hashlib.sha256(POLICY.encode()).hexdigest()}
    assert m.value == fold(m.events)
    assert launch(trust, engine) == m  # deterministic


def test_engine_is_measured_by_its_real_path(trust: TrustStore, engine: Path) -> None:
    link = engine.parent / "qemu"
    link.symlink_to(engine)
    assert launch(trust, link).events[0]["path"] == str(engine)
    assert launch(trust, link).value == launch(trust, engine).value


@pytest.mark.parametrize(("change", "kinds"), [
    ({"config": b'["qemu", "-nodefaults", "-device", "x"]'}, ["config"]),
    ({"image_statement": "2" * 64}, ["image"]),
    ({"policy_text": POLICY + "# edited\n"}, ["policy"]),
    ({"policy_version": 2}, ["policy"]),
])
def test_measurement_changes_when_any_input_changes(
        trust: TrustStore, engine: Path, change: dict[str, Any], kinds: list[str]) -> None:
    base = launch(trust, engine)
    other = launch(trust, engine, **change)
    assert other.value != base.value
    assert [e["kind"] for e, f in zip(other.events, base.events, strict=True) if e != f] == kinds


def test_measurement_changes_with_the_engine_binary(trust: TrustStore, engine: Path) -> None:
    base = launch(trust, engine)
    data = bytearray(engine.read_bytes())
    data[100] ^= 1  # same size
    engine.write_bytes(bytes(data))
    st_ = engine.stat()
    os.utime(engine, ns=(st_.st_atime_ns, st_.st_mtime_ns + 1_000_000))
    other = launch(trust, engine)
    assert other.value != base.value
    assert other.events[0]["sha256"] == hashlib.sha256(bytes(data)).hexdigest()


def test_measurement_changes_with_the_engine_path(trust: TrustStore, engine: Path) -> None:
    copy_ = engine.parent / "crun"
    copy_.write_bytes(engine.read_bytes())
    assert launch(trust, copy_).value != launch(trust, engine).value


def test_measurement_changes_with_popek_version(trust: TrustStore, engine: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    base = launch(trust, engine)
    monkeypatch.setattr(measure_mod, "__version__", "99.0")
    other = launch(trust, engine)
    assert other.value != base.value and other.events[1]["version"] == "99.0"


def test_binary_hash_is_cached_by_inode_size_and_times(trust: TrustStore,
                                                       engine: Path) -> None:
    real = hashlib.sha256(engine.read_bytes()).hexdigest()
    assert binary_sha256(trust, str(engine)) == real
    kv = trust.store.get(BINHASH + str(engine))
    assert kv is not None and json.loads(kv.value)["sha256"] == real
    # the cache is used while the stamp holds ...
    cached = json.loads(kv.value)
    trust.store.put(BINHASH + str(engine), canonical({**cached, "sha256": "c" * 64}))
    assert binary_sha256(trust, str(engine)) == "c" * 64
    # ... and not once the file changed
    engine.write_bytes(engine.read_bytes() + b"!")
    assert binary_sha256(trust, str(engine)) == hashlib.sha256(engine.read_bytes()).hexdigest()


def test_write_and_read(tmp_path: Path, trust: TrustStore, engine: Path) -> None:
    m = launch(trust, engine)
    write(tmp_path, m)
    assert read(tmp_path) == m
    assert not list(tmp_path.glob("*.tmp"))
    assert json.loads((tmp_path / "measurement.json").read_text()) == m.to_doc()


def test_read_without_a_measurement(tmp_path: Path) -> None:
    with pytest.raises(TrustError, match="no launch measurement"):
        read(tmp_path)
    (tmp_path / "measurement.json").write_text("{broken")
    with pytest.raises(TrustError, match="no launch measurement"):
        read(tmp_path)


# -- nonces -------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(raw=st.binary(min_size=16, max_size=64), upper=st.booleans())
def test_good_nonces_are_lowercased(raw: bytes, upper: bool) -> None:
    text = raw.hex().upper() if upper else raw.hex()
    assert check_nonce(text) == raw.hex()


@settings(max_examples=30, deadline=None)
@given(raw=st.binary(max_size=100).filter(lambda b: not 16 <= len(b) <= 64))
def test_nonces_of_the_wrong_length_are_refused(raw: bytes) -> None:
    with pytest.raises(InvalidInput, match="16-64 bytes"):
        check_nonce(raw.hex())


@pytest.mark.parametrize("nonce", ["", "zz" * 16, "a" * 33, "0x" + "ab" * 16, "ab" * 65])
def test_bad_nonces(nonce: str) -> None:
    with pytest.raises(InvalidInput, match="openssl rand -hex 32"):
        check_nonce(nonce)


# -- quotes ----------------------------------------------------------------------------------


@pytest.fixture
def m(trust: TrustStore, engine: Path) -> Measurement:
    return launch(trust, engine)


def test_good_quote_verifies(trust: TrustStore, m: Measurement) -> None:
    doc = quote(trust, "vm1", m, NONCE.upper())
    body = doc["quote"]
    assert body["instance"] == "vm1" and body["nonce"] == NONCE
    assert body["events"] == m.events and body["measurement"] == m.value
    key = trust.by_name("host-attestation")
    assert key.role == "attestation" and doc["signer"] == key.id
    assert verify_quote(trust, doc, NONCE, m.to_doc()) == body
    # the expected value may come from a measurement or from an earlier quote
    assert verify_quote(trust, doc, NONCE.upper(), doc) == body
    assert verify_quote(trust, doc, NONCE, {"value": m.value}) == body


def test_quote_survives_a_json_round_trip(trust: TrustStore, m: Measurement) -> None:
    doc = json.loads(json.dumps(quote(trust, "vm1", m, NONCE), indent=2))
    assert verify_quote(trust, doc, NONCE, m.to_doc())["instance"] == "vm1"


def test_wrong_nonce_is_rejected(trust: TrustStore, m: Measurement) -> None:
    doc = quote(trust, "vm1", m, NONCE)
    with pytest.raises(TrustError, match="another nonce"):
        verify_quote(trust, doc, "cd" * 32, m.to_doc())
    with pytest.raises(InvalidInput):
        verify_quote(trust, doc, "short", m.to_doc())


def test_quote_with_the_nonce_swapped_is_rejected(trust: TrustStore, m: Measurement) -> None:
    doc = quote(trust, "vm1", m, NONCE)
    doc["quote"]["nonce"] = "cd" * 32
    with pytest.raises(TrustError, match="does not match"):
        verify_quote(trust, doc, "cd" * 32, m.to_doc())


def _at(monkeypatch: pytest.MonkeyPatch, t: datetime) -> None:
    monkeypatch.setattr(measure_mod, "now", lambda: t)


@pytest.mark.parametrize(("made", "ok"), [
    (timedelta(seconds=-301), False),
    (timedelta(hours=-1), False),
    (timedelta(seconds=-299), True),
    (timedelta(seconds=59), True),     # a little clock skew is accepted
    (timedelta(seconds=61), False),    # a quote from the future is not
])
def test_old_quote_is_rejected(trust: TrustStore, m: Measurement,
                               monkeypatch: pytest.MonkeyPatch, made: timedelta,
                               ok: bool) -> None:
    t0 = now()
    _at(monkeypatch, t0 + made)
    doc = quote(trust, "vm1", m, NONCE)
    _at(monkeypatch, t0)
    if ok:
        assert verify_quote(trust, doc, NONCE, m.to_doc())["instance"] == "vm1"
    else:
        with pytest.raises(TrustError, match=r"s old; accepted: up to 300 s"):
            verify_quote(trust, doc, NONCE, m.to_doc())


def test_quote_time_is_signed(trust: TrustStore, m: Measurement) -> None:
    doc = quote(trust, "vm1", m, NONCE)
    stale = copy.deepcopy(doc)
    stale["quote"]["time"] = "2000-01-01T00:00:00Z"
    with pytest.raises(TrustError, match="does not match"):
        verify_quote(trust, stale, NONCE, m.to_doc())


def _events_changes() -> list[Any]:
    return [
        lambda body: body["events"][3].update(sha256="0" * 64),
        lambda body: body["events"].pop(),
        lambda body: body["events"].reverse(),
        lambda body: body["events"].append({"kind": "extra"}),
        lambda body: body.update(measurement="0" * 64),
        lambda body: body.update(instance="vm2"),
        lambda body: body.update(host="elsewhere"),
    ]


@pytest.mark.parametrize("change", _events_changes())
def test_tampered_quote_is_rejected(trust: TrustStore, m: Measurement, change: Any) -> None:
    doc = quote(trust, "vm1", m, NONCE)
    change(doc["quote"])
    with pytest.raises(TrustError, match="does not match"):
        verify_quote(trust, doc, NONCE, m.to_doc())


def test_events_that_do_not_fold_are_rejected_even_when_signed(
        trust: TrustStore, m: Measurement) -> None:
    # a quote whose events were edited and then signed again with the host key
    doc = quote(trust, "vm1", m, NONCE)
    body = doc["quote"]
    body["events"][2]["statement_sha256"] = "f" * 64
    kid, sig = trust.sign("host-attestation", "attestation", canonical(body))
    forged = {"quote": body, "signer": kid, "signature": sig}
    with pytest.raises(TrustError, match="does not fold to its measurement"):
        verify_quote(trust, forged, NONCE, m.to_doc())


def test_other_measurement_is_rejected_naming_what_changed(
        trust: TrustStore, engine: Path) -> None:
    expected = launch(trust, engine)
    actual = launch(trust, engine, config=b'["qemu", "-s"]', policy_version=2)
    doc = quote(trust, "vm1", actual, NONCE)
    with pytest.raises(TrustError) as err:
        verify_quote(trust, doc, NONCE, expected.to_doc())
    msg = str(err.value)
    assert msg.startswith(f"measurement {actual.value[:16]} is not the expected "
                          f"{expected.value[:16]}")
    assert msg.endswith("changed: config, policy")
    # against an expected quote too
    expected_quote = quote(trust, "vm1", expected, NONCE)
    with pytest.raises(TrustError, match="changed: config, policy$"):
        verify_quote(trust, doc, NONCE, expected_quote)
    # a bare value cannot say what changed
    with pytest.raises(TrustError, match="the launch differs from the expected one"):
        verify_quote(trust, doc, NONCE, {"value": expected.value})


def test_other_measurement_with_another_number_of_events(trust: TrustStore,
                                                         m: Measurement) -> None:
    expect = {"events": [*m.events, {"kind": "extra"}], "value": fold([*m.events,
                                                                       {"kind": "extra"}])}
    doc = quote(trust, "vm1", m, NONCE)
    with pytest.raises(TrustError, match="changed: number of events"):
        verify_quote(trust, doc, NONCE, expect)


def test_verification_with_an_explicit_public_key(trust: TrustStore, m: Measurement,
                                                  tmp_path: Path) -> None:
    doc = quote(trust, "vm1", m, NONCE)
    host_key = trust.by_name("host-attestation").raw()
    verifier = TrustStore(SQLiteStore(tmp_path / "verifier.db"))  # trusts nothing
    with pytest.raises(TrustError, match="not trusted"):
        verify_quote(verifier, doc, NONCE, m.to_doc())
    assert verify_quote(verifier, doc, NONCE, m.to_doc(), public_raw=host_key)["nonce"] == NONCE
    # the checks still apply
    with pytest.raises(TrustError, match="another nonce"):
        verify_quote(verifier, doc, "cd" * 32, m.to_doc(), public_raw=host_key)
    tampered = copy.deepcopy(doc)
    tampered["quote"]["instance"] = "vm2"
    with pytest.raises(TrustError, match="signature does not match"):
        verify_quote(verifier, tampered, NONCE, m.to_doc(), public_raw=host_key)
    # another public key
    other = trust.keygen("other-att", "attestation").raw()
    with pytest.raises(TrustError, match="signed by another key than the one given"):
        verify_quote(verifier, doc, NONCE, m.to_doc(), public_raw=other)


def test_quote_signed_by_a_non_attestation_key_is_rejected(trust: TrustStore,
                                                           m: Measurement) -> None:
    doc = quote(trust, "vm1", m, NONCE)
    kid, sig = trust.sign(trust.host_key("audit"), "audit", canonical(doc["quote"]))
    with pytest.raises(TrustError, match="has role 'audit', not 'attestation'"):
        verify_quote(trust, {**doc, "signer": kid, "signature": sig}, NONCE, m.to_doc())


def test_quote_by_a_revoked_host_key_is_rejected(trust: TrustStore, m: Measurement) -> None:
    doc = quote(trust, "vm1", m, NONCE)
    trust.revoke("host-attestation")
    with pytest.raises(TrustError, match="revoked"):
        verify_quote(trust, doc, NONCE, m.to_doc())


@pytest.mark.parametrize("doc", [{}, {"quote": {}}, {"quote": 5, "signer": "x",
                                                      "signature": "y"},
                                 {"quote": {"events": []}, "signer": "x", "signature": "y"}])
def test_not_a_quote(trust: TrustStore, doc: dict[str, Any]) -> None:
    with pytest.raises(TrustError, match="not a popek quote"):
        verify_quote(trust, doc, NONCE, {"value": "0" * 64})


def test_expected_of() -> None:
    v = "a" * 64
    assert expected_of({"value": v}) == v
    assert expected_of({"measurement": v}) == v
    assert expected_of({"quote": {"measurement": v}, "signer": "x"}) == v
    for bad in ({}, {"value": "short"}, {"quote": "x"}, {"value": 5}):
        with pytest.raises(InvalidInput, match="no measurement"):
            expected_of(bad)
