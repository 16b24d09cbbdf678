"""Measured launch and attestation: a changed launch or a replayed quote is caught.

The threat (survey, section V): a modified VMM configuration or policy, or an
old answer replayed to a verifier.  The launch measurement chains the QEMU
binary, popek's version, the signed image, QEMU's full argv and the policy;
a quote signs it with the verifier's nonce.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import Home

VM = "attested"


@pytest.fixture(scope="module")
def home(popek_home: Path, minimal_image: str) -> Iterator[Home]:
    h = Home(popek_home)
    h.popek("image", "sign", "minimal")
    h.popek("launch", "minimal", VM, "--memory", "256MiB")
    yield h
    h.close()


@pytest.fixture(scope="module")
def golden(home: Home) -> Path:
    """A quote of the known-good launch, kept as the expected measurement."""
    nonce = secrets.token_hex(16)
    path = home.path / "golden.json"
    path.write_text(home.popek("attest", VM, "--nonce", nonce).stdout)
    return path


def _quote(home: Home, nonce: str) -> Path:
    path = home.path / f"quote-{nonce[:8]}.json"
    path.write_text(home.popek("attest", VM, "--nonce", nonce).stdout)
    return path


def _verify(home: Home, quote: Path, nonce: str, expect: Path,
            *extra: str) -> tuple[int, str]:
    proc = home.popek("attest", "verify", str(quote), "--nonce", nonce, "--expect", str(expect),
                      *extra, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def test_fresh_quote_verifies(home: Home, golden: Path) -> None:
    nonce = secrets.token_hex(32)
    rc, out = _verify(home, _quote(home, nonce), nonce, golden)
    assert rc == 0 and "Quote verified" in out, out


def test_replayed_quote_rejected(home: Home, golden: Path) -> None:
    old_nonce = secrets.token_hex(16)
    old = _quote(home, old_nonce)
    rc, out = _verify(home, old, secrets.token_hex(16), golden)  # the verifier's new nonce
    assert rc != 0 and "another nonce" in out


def test_forged_quote_rejected(home: Home, golden: Path) -> None:
    nonce = secrets.token_hex(16)
    q = _quote(home, nonce)
    doc = json.loads(q.read_text())
    doc["quote"]["events"][3]["sha256"] = "0" * 64  # hide a changed argv
    q.write_text(json.dumps(doc))
    rc, out = _verify(home, q, nonce, golden)
    assert rc != 0 and "does not match" in out


def test_remote_verifier_with_exported_key(home: Home, golden: Path, popek_home: Path) -> None:
    """A verifier on another host trusts only the exported attestation public key."""
    key = home.path / "attestation.pem"
    key.write_text(home.popek("trust", "export", "host-attestation").stdout)
    other = Home(popek_home, images=())
    try:
        nonce = secrets.token_hex(16)
        q = _quote(home, nonce)
        proc = other.popek("attest", "verify", str(q), "--nonce", nonce, "--expect", str(golden),
                           check=False)
        assert proc.returncode != 0 and "not trusted" in proc.stderr
        proc = other.popek("attest", "verify", str(q), "--nonce", nonce, "--expect", str(golden),
                           "--key-file", str(key))
        assert "Quote verified" in proc.stdout
    finally:
        other.close()


def _guest_check(home: Home, quote_from: str | None = None, expected: str | None = None,
                 pubkey: str | None = None, reuse: Path | None = None) -> tuple[int, str]:
    """The guest makes a nonce, the host quotes it, the guest checks the quote itself."""
    nonce = home.popek("exec", VM, "--", "popek-verify", "nonce").stdout.strip()
    quote = reuse or _quote(home, nonce)
    keys = json.loads(home.popek("trust", "list", "--format", "json").stdout)
    pub = pubkey or next(k["public"] for k in keys if k["role"] == "attestation")
    want = expected or json.loads(quote.read_text())["quote"]["measurement"]
    proc = home.popek("exec", VM, "--", "popek-verify", "check", pub, want,
                      stdin=quote.read_bytes(), check=False)
    return proc.returncode, proc.stdout + proc.stderr


def test_guest_verifies_its_host(home: Home, golden: Path) -> None:
    expected = json.loads(golden.read_text())["quote"]["measurement"]
    rc, out = _guest_check(home, expected=expected)
    assert rc == 0 and "quote verified" in out, out


def test_guest_rejects_a_replayed_quote(home: Home, golden: Path) -> None:
    rc, out = _guest_check(home)
    assert rc == 0, out
    old = sorted(home.path.glob("quote-*.json"), key=lambda p: p.stat().st_mtime)[-1]
    rc, out = _guest_check(home, reuse=old)  # answers the guest's previous nonce
    assert rc != 0 and "another nonce" in out, out


def test_guest_rejects_a_quote_by_another_key(home: Home) -> None:
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    rc, out = _guest_check(home, pubkey=base64.b64encode(other).decode())
    assert rc != 0 and "signature does not match" in out, out


def test_guest_has_its_launch_in_the_vtpm(home: Home) -> None:
    """PCR 15 of the guest's virtual TPM holds the launch measurement, extended once."""
    import hashlib

    pcr = home.popek("exec", VM, "--", "cat", "/sys/class/tpm/tpm0/pcr-sha256/15").stdout
    measurement = json.loads(home.popek("info", VM, "--format", "json").stdout)["measurement"]
    want = hashlib.sha256(bytes(32) + bytes.fromhex(measurement)).hexdigest()
    assert pcr.strip().lower() == want


def test_guest_rejects_a_quote_about_another_launch(home: Home) -> None:
    """A host that answers the guest's nonce with another instance's (signed) quote is caught."""
    home.popek("launch", "minimal", "decoy", "--memory", "256MiB")
    try:
        nonce = home.popek("exec", VM, "--", "popek-verify", "nonce").stdout.strip()
        quote = home.path / "decoy-quote.json"
        quote.write_text(home.popek("attest", "decoy", "--nonce", nonce).stdout)
        keys = json.loads(home.popek("trust", "list", "--format", "json").stdout)
        pub = next(k["public"] for k in keys if k["role"] == "attestation")
        claimed = json.loads(quote.read_text())["quote"]["measurement"]
        proc = home.popek("exec", VM, "--", "popek-verify", "check", pub, claimed,
                          stdin=quote.read_bytes(), check=False)
        assert proc.returncode != 0 and "PCR 15 does not hold" in proc.stderr + proc.stdout
    finally:
        home.popek("delete", "--force", "decoy")


def test_restart_measures_the_same(home: Home, golden: Path) -> None:
    home.popek("restart", VM)
    nonce = secrets.token_hex(16)
    rc, out = _verify(home, _quote(home, nonce), nonce, golden)
    assert rc == 0, out


def test_changed_qemu_argv_changes_measurement(home: Home, golden: Path) -> None:
    home.popek("stop", VM)
    home.popek("config", "set", VM, "limits.memory", "320MiB")
    home.popek("start", VM)
    try:
        nonce = secrets.token_hex(16)
        rc, out = _verify(home, _quote(home, nonce), nonce, golden)
        assert rc != 0 and "changed: config" in out, out
        # and the guest's own verifier, expecting the known-good launch, refuses it
        expected = json.loads(golden.read_text())["quote"]["measurement"]
        rc, out = _guest_check(home, expected=expected)
        assert rc != 0 and "not the expected one" in out, out
    finally:
        home.popek("stop", VM)
        home.popek("config", "set", VM, "limits.memory", "256MiB")
        home.popek("start", VM)


def test_changed_policy_changes_measurement(home: Home, golden: Path) -> None:
    home.popek("policy", "apply", "-", stdin=b'version = 7\nlabels = ["default"]\n'
                                             b'[[share]]\nkind = "network"\n'
                                             b'labels = ["default"]\n')
    home.popek("restart", VM)
    nonce = secrets.token_hex(16)
    rc, out = _verify(home, _quote(home, nonce), nonce, golden)
    assert rc != 0 and "changed: policy" in out, out


def test_bad_nonce_is_bad_input(home: Home) -> None:
    proc = home.popek("attest", VM, "--nonce", "xyz", check=False)
    assert proc.returncode == 2 and "hex" in proc.stderr
