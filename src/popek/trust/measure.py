"""Measured launch and attestation quotes.

Just before an engine runs an instance, popek measures the launch: an event
log of what will run, folded into one hash chain value

    m0 = 32 zero bytes;  m(i) = SHA-256(m(i-1) || SHA-256(canonical(event i)))

over, in order: the engine binary (QEMU or the OCI runtime, by content),
popek's version, the signed image statement, the engine's effective
configuration (QEMU's full argv, the OCI runtime's config.json) and the
access control policy in force.  The log and value are written to the
instance directory as ``measurement.json``.

``popek attest NAME --nonce HEX`` returns a *quote*: the log, the value, the
verifier's nonce, the time and the instance, signed by the host's
``attestation`` key.  :func:`verify_quote` checks the signature (trusted
attestation key, or a given public key), that the nonce is the verifier's
fresh one, that the log folds to the quoted value, and that the value is
the one expected.

What this proves, and what it does not, is in docs/TRUST.md: a host whose
root is compromised can lie; only a hardware root (host TPM, SEV-SNP or TDX
reports) would anchor the chain below popek.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popek import __version__
from popek.errors import InvalidInput
from popek.state.schema import BINHASH_PREFIX
from popek.trust.keys import TrustError, TrustStore, canonical, iso, now, parse_time

MEASUREMENT_FILE = "measurement.json"
BINHASH = BINHASH_PREFIX
QUOTE_MAX_AGE = 300  # seconds a quote is accepted after it was made
NONCE_BYTES = (16, 64)


def fold(events: list[dict[str, Any]]) -> str:
    """The hash chain value of an event log (hex)."""
    m = bytes(32)
    for ev in events:
        m = hashlib.sha256(m + hashlib.sha256(canonical(ev)).digest()).digest()
    return m.hex()


def binary_sha256(trust: TrustStore, path: str) -> str:
    """SHA-256 of the file at ``path``, cached while its inode, size and times are unchanged."""
    real = os.path.realpath(path)
    st = os.stat(real)
    stamp = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
    kv = trust.store.get(BINHASH + real)
    if kv is not None:
        cached = json.loads(kv.value)
        if cached["stamp"] == stamp:
            return str(cached["sha256"])
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    digest = h.hexdigest()
    trust.store.put(BINHASH + real, canonical({"stamp": stamp, "sha256": digest}))
    return digest


@dataclass(frozen=True)
class Measurement:
    """The event log of one launch and its chain value."""

    events: list[dict[str, Any]]
    value: str

    def to_doc(self) -> dict[str, Any]:
        """The JSON document kept in the instance directory."""
        return {"events": self.events, "value": self.value}


def measure(trust: TrustStore, engine_binary: str, config: bytes, image_statement: str,
            policy_text: str, policy_version: int) -> Measurement:
    """Measure one launch (see the module docstring for the order of events)."""
    events: list[dict[str, Any]] = [
        {"kind": "engine", "path": os.path.realpath(engine_binary),
         "sha256": binary_sha256(trust, engine_binary)},
        {"kind": "popek", "version": __version__},
        {"kind": "image", "statement_sha256": image_statement},
        {"kind": "config", "sha256": hashlib.sha256(config).hexdigest()},
        {"kind": "policy", "version": policy_version,
         "sha256": hashlib.sha256(policy_text.encode()).hexdigest()},
    ]
    return Measurement(events, fold(events))


def write(workdir: Path, m: Measurement) -> None:
    """Keep the measurement in the instance directory (root-owned, world-readable)."""
    path = workdir / MEASUREMENT_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(m.to_doc(), indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def read(workdir: Path) -> Measurement:
    """The measurement of the instance's current run; :class:`TrustError` without one."""
    try:
        doc = json.loads((workdir / MEASUREMENT_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise TrustError(f"no launch measurement in {workdir}: the instance has not been "
                         "started by this version of popek") from exc
    return Measurement(doc["events"], doc["value"])


def check_nonce(nonce: str) -> str:
    """Return ``nonce`` (lowercase) if it is 16 to 64 bytes of hex; else :class:`InvalidInput`."""
    try:
        raw = bytes.fromhex(nonce)
    except ValueError:
        raw = b""
    if not NONCE_BYTES[0] <= len(raw) <= NONCE_BYTES[1]:
        raise InvalidInput(f"nonce {nonce!r} must be {NONCE_BYTES[0]}-{NONCE_BYTES[1]} bytes "
                           "written as hex (e.g. from: openssl rand -hex 32)")
    return raw.hex()


def quote(trust: TrustStore, instance: str, m: Measurement, nonce: str) -> dict[str, Any]:
    """A signed quote over ``nonce`` and the measurement of ``instance``."""
    body = {"instance": instance, "host": os.uname().nodename, "time": iso(now()),
            "nonce": check_nonce(nonce), "events": m.events, "measurement": m.value}
    payload = canonical(body)
    kid, sig = trust.sign(trust.host_key("attestation"), "attestation", payload)
    # the signed bytes themselves too, for verifiers without a JSON canonicaliser
    # (the guest's popek-verify)
    return {"quote": body, "payload": base64.b64encode(payload).decode(), "signer": kid,
            "signature": sig}


def verify_quote(trust: TrustStore, doc: dict[str, Any], nonce: str,
                 expect: dict[str, Any], public_raw: bytes | None = None) -> dict[str, Any]:
    """Check a quote; return its body.  :class:`TrustError` names the check that failed.

    ``public_raw`` is the host's attestation public key when the verifier
    does not have it in its own trust store.
    """
    try:
        body, kid, sig = doc["quote"], str(doc["signer"]), str(doc["signature"])
        events, value = body["events"], str(body["measurement"])
    except (KeyError, TypeError) as exc:
        raise TrustError(f"not a popek quote: missing {exc}") from None
    if public_raw is not None:
        _verify_raw(public_raw, kid, canonical(body), sig)
    else:
        trust.verify(kid, "attestation", canonical(body), sig)
    if "payload" in doc and base64.b64decode(str(doc["payload"])) != canonical(body):
        raise TrustError("the quote's payload is not the signed body: altered quote")
    if body.get("nonce") != check_nonce(nonce):
        raise TrustError("the quote answers another nonce: a replayed or stale quote")
    age = (now() - parse_time(str(body["time"]), "quote time")).total_seconds()
    if not -60 <= age <= QUOTE_MAX_AGE:
        raise TrustError(f"the quote is {age:.0f} s old; accepted: up to {QUOTE_MAX_AGE} s")
    if fold(events) != value:
        raise TrustError("the quote's event log does not fold to its measurement")
    expected = expected_of(expect)
    if value != expected:
        raise TrustError(f"measurement {value[:16]} is not the expected {expected[:16]}: "
                         f"{_diff(events, expect)}")
    return dict(body)


def _diff(events: list[dict[str, Any]], expect: dict[str, Any]) -> str:
    """Which measured events differ from the expected log (when the expect file has one)."""
    want = expect.get("events") or (expect.get("quote") or {}).get("events")
    if not isinstance(want, list):
        return "the launch differs from the expected one"
    changed = [str(e.get("kind")) for e, w in zip(events, want, strict=False) if e != w]
    if len(events) != len(want):
        changed.append("number of events")
    return "changed: " + (", ".join(changed) or "nothing?")


def _verify_raw(raw: bytes, kid: str, payload: bytes, sig: str) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from popek.trust.keys import PURPOSES, key_id

    if key_id(raw) != kid:
        raise TrustError("the quote was signed by another key than the one given")
    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(base64.b64decode(sig),
                                                       PURPOSES["attestation"] + payload)
    except (InvalidSignature, ValueError):
        raise TrustError("the quote's signature does not match") from None


def expected_of(doc: dict[str, Any]) -> str:
    """The expected measurement from an --expect file: a measurement or a quote document."""
    for path in (("value",), ("measurement",), ("quote", "measurement")):
        cur: Any = doc
        for k in path:
            cur = cur.get(k) if isinstance(cur, dict) else None
        if isinstance(cur, str) and len(cur) == 64:
            return cur
    raise InvalidInput("the expect file has no measurement: give a measurement.json "
                       "(popek attest NAME --log) or a quote")
