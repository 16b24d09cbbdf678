"""Signing keys and the trust store.

A key is an Ed25519 key pair with one *role*: ``image`` (image manifests),
``policy`` (access control policies), ``audit`` (audit checkpoints) or
``attestation`` (launch quotes).  A signature is only accepted from a key of
the role it is checked for, so a key that signs audit checkpoints can never
vouch for an image.  Every signature covers a fixed purpose prefix naming
what is signed, so bytes signed for one purpose cannot be replayed as
another.

The key id is the SHA-256 (hex) of the raw 32-byte public key.  The trust
store keeps public keys in the state store under ``/popek/trust/keys/<id>``
with a name, role, validity window and revocation; private keys made on this
host live in ``$POPEK_HOME/trust/private`` (directory 0700, files 0600).
Revocation is permanent: a revoked key id cannot be added again.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from popek import paths
from popek.errors import TAMPERED, AlreadyExists, InvalidInput, NotFound, PopekError
from popek.state.schema import TRUST_KEYS_PREFIX, VERIFIED_PREFIX

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from popek.state.store import StateStore


ROLES = ("image", "policy", "audit", "attestation")
PURPOSES = {
    "image": b"popek/image-manifest/v1\n",
    "policy": b"popek/policy/v1\n",
    "audit": b"popek/audit-checkpoint/v1\n",
    "attestation": b"popek/attestation-quote/v1\n",
}
KEY_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
KEY_NAME_RULE = "1-63 characters from a-z, 0-9, '.', '_', '-', starting with a letter or digit"
PREFIX = TRUST_KEYS_PREFIX
#: signatures already checked: sha256 of (purpose, key, signature, payload) -> "1"
DEFAULT_DAYS = 3650
# Keys popek makes for itself on first use, one per role.
HOST_KEYS = {role: f"host-{role}" for role in ROLES}


class TrustError(PopekError):
    """A signature or key did not pass a check; the message names the check."""

    exit_code = TAMPERED


def now() -> datetime:
    """The current time in UTC (one place, so tests and records agree)."""
    return datetime.now(UTC).replace(microsecond=0)


def iso(t: datetime) -> str:
    """``t`` as ISO 8601 UTC with a 'Z'."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str, what: str) -> datetime:
    """Parse an ISO 8601 UTC time; raise :class:`TrustError` naming ``what``."""
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, AttributeError) as exc:
        raise TrustError(f"{what} {text!r} is not an ISO 8601 time") from exc
    if t.utcoffset() is None:
        raise TrustError(f"{what} {text!r} has no time zone")
    return t


def key_id(public_raw: bytes) -> str:
    """The id of a public key: SHA-256 of its 32 raw bytes, in hex."""
    return hashlib.sha256(public_raw).hexdigest()


def check_role(role: str) -> None:
    """Raise :class:`InvalidInput` unless ``role`` is a known key role."""
    if role not in ROLES:
        raise InvalidInput(f"unknown key role {role!r}; allowed: {', '.join(ROLES)}")


def check_key_name(name: str) -> None:
    """Raise :class:`InvalidInput` unless ``name`` is a valid key name."""
    if not KEY_NAME_RE.fullmatch(name):
        raise InvalidInput(f"invalid key name {name!r}: {KEY_NAME_RULE}")


@dataclass(frozen=True)
class TrustedKey:
    """A public key in the trust store."""

    id: str
    name: str
    role: str
    public: str  # base64 of the 32 raw bytes
    added: str
    not_before: str
    not_after: str
    revoked: str = ""
    revoke_reason: str = ""

    def raw(self) -> bytes:
        """The 32 raw bytes of the public key."""
        return base64.b64decode(self.public)

    def to_json(self) -> bytes:
        """The store record."""
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> TrustedKey:
        """Parse a store record."""
        return cls(**json.loads(data))


def _private_dir() -> Path:
    d = paths.home() / "trust" / "private"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d.parent, 0o700)
    os.chmod(d, 0o700)
    return d


def private_key_path(name: str) -> Path:
    """Where the private key ``name`` made on this host is kept."""
    check_key_name(name)
    return _private_dir() / f"{name}.key"


def public_raw_from_text(text: str) -> bytes:
    """Read a public key from PEM (SubjectPublicKeyInfo) or base64 of its 32 raw bytes.

    Raises :class:`InvalidInput` saying which forms are accepted.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError("not an Ed25519 key")
            return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        raw = base64.b64decode(text, validate=True)
        if len(raw) != 32:
            raise ValueError(f"{len(raw)} bytes, not 32")
        Ed25519PublicKey.from_public_bytes(raw)
        return raw
    except ValueError as exc:
        raise InvalidInput(f"not an Ed25519 public key ({exc}); give a PEM public key or "
                           "the base64 of its 32 raw bytes") from exc


def public_pem(raw: bytes) -> str:
    """The PEM form of a raw Ed25519 public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key = Ed25519PublicKey.from_public_bytes(raw)
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


class TrustStore:
    """Public keys this host trusts, and the private keys it holds."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    # -- reading -----------------------------------------------------------
    def all(self) -> list[TrustedKey]:
        """Every key in the store (revoked ones included), by name."""
        keys = [TrustedKey.from_json(kv.value) for kv in self.store.range(PREFIX)]
        return sorted(keys, key=lambda k: (k.name, k.id))

    def by_id(self, kid: str) -> TrustedKey | None:
        """The key with id ``kid``, or ``None``."""
        kv = self.store.get(PREFIX + kid)
        return TrustedKey.from_json(kv.value) if kv else None

    def by_name(self, name: str) -> TrustedKey:
        """The (non-revoked first) key named ``name``; raise :class:`NotFound`."""
        found = [k for k in self.all() if k.name == name]
        if not found:
            names = ", ".join(sorted({k.name for k in self.all()})) or "none"
            raise NotFound(f"no key named {name!r} in the trust store (keys: {names})")
        found.sort(key=lambda k: bool(k.revoked))
        return found[0]

    # -- changing ------------------------------------------------------------
    def add(self, name: str, role: str, raw: bytes, days: int = DEFAULT_DAYS,
            not_before: datetime | None = None) -> TrustedKey:
        """Trust public key ``raw`` under ``name`` for ``role`` for ``days`` days.

        Raises :class:`InvalidInput` for a bad name, role or duration,
        :class:`AlreadyExists` if the name or key is already there, and
        :class:`TrustError` if the key was revoked (revocation is permanent).
        """
        check_key_name(name)
        check_role(role)
        if not 1 <= days <= 36500:
            raise InvalidInput(f"key validity {days} days is out of range; allowed: 1-36500")
        kid = key_id(raw)
        old = self.by_id(kid)
        if old is not None and old.revoked:
            raise TrustError(f"key {kid[:16]} ({old.name}) was revoked on {old.revoked}; "
                             "a revoked key cannot be trusted again")
        if old is not None:
            raise AlreadyExists(f"key {kid[:16]} is already trusted as {old.name!r}")
        if any(k.name == name and not k.revoked for k in self.all()):
            raise AlreadyExists(f"a key named {name!r} is already in the trust store")
        start = not_before or now()
        rec = TrustedKey(id=kid, name=name, role=role, public=base64.b64encode(raw).decode(),
                         added=iso(now()), not_before=iso(start),
                         not_after=iso(start + timedelta(days=days)))
        self.store.put(PREFIX + kid, rec.to_json())
        return rec

    def remove(self, name: str) -> TrustedKey:
        """Stop trusting the key ``name`` (its signatures become untrusted).

        A revoked key stays in the store as the record of its revocation
        (so it can never be added again): removing it is refused.
        """
        key = self.by_name(name)
        if key.revoked:
            raise TrustError(f"key {name!r} is revoked; its record stays so that it can never "
                             "be trusted again (it is already refused everywhere)")
        self.store.delete(PREFIX + key.id)
        return key

    def revoke(self, name: str, reason: str = "") -> TrustedKey:
        """Revoke the key ``name`` for good; its signatures are refused from now on."""
        key = self.by_name(name)
        if key.revoked:
            raise TrustError(f"key {name!r} is already revoked (on {key.revoked})")
        rec = TrustedKey(**{**asdict(key), "revoked": iso(now()), "revoke_reason": reason})
        self.store.put(PREFIX + key.id, rec.to_json())
        return rec

    def keygen(self, name: str, role: str, days: int = DEFAULT_DAYS) -> TrustedKey:
        """Make an Ed25519 key pair: the private key stays here (0600), the public is trusted."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        check_key_name(name)
        check_role(role)
        path = private_key_path(name)
        if path.exists():
            raise AlreadyExists(f"a private key named {name!r} already exists ({path})")
        priv = Ed25519PrivateKey.generate()
        raw = priv.public_key().public_bytes(serialization.Encoding.Raw,
                                             serialization.PublicFormat.Raw)
        pem = priv.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
        # all or nothing (a full disk): the whole private key is on disk beside its
        # place before the public one is trusted, and only then linked into place
        tmp = path.with_name(f".{path.name}.new-{os.getpid()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            rec = self.add(name, role, raw, days)
            try:
                os.link(tmp, path)
            except OSError:
                self.store.delete(PREFIX + rec.id)
                raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return rec

    def host_key(self, role: str) -> str:
        """The name of this host's own key for ``role``, made on first use.

        When that key was revoked or removed, a new one is made under the next
        free name (``host-image-2``, ...).
        """
        base = HOST_KEYS[role]
        for n in range(1, 1000):
            name = base if n == 1 else f"{base}-{n}"
            if not private_key_path(name).exists():
                self.keygen(name, role)
                return name
            usable = [k for k in self.all() if k.name == name and k.role == role
                      and not k.revoked]
            if usable:
                return name
        raise TrustError(f"no usable host key for role {role!r}")

    # -- signing and checking ------------------------------------------------
    def sign(self, name: str, role: str, payload: bytes) -> tuple[str, str]:
        """Sign ``payload`` for ``role`` with private key ``name``; return (key id, b64 sig).

        Raises :class:`NotFound` without the private key, :class:`TrustError`
        when the key is not trusted for ``role`` (a signature nobody accepts).
        """
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        path = private_key_path(name)
        if not path.exists():
            raise NotFound(f"no private key named {name!r} on this host "
                           f"(make one with: popek trust keygen {name} --role {role})")
        priv = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(priv, Ed25519PrivateKey):
            raise TrustError(f"private key {name!r} is not an Ed25519 key")
        kid = key_id(_raw_public(priv))
        self.check_key(kid, role)
        sig = priv.sign(PURPOSES[role] + payload)
        return kid, base64.b64encode(sig).decode()

    def check_key(self, kid: str, role: str, at: datetime | None = None) -> TrustedKey:
        """Return the trusted key ``kid`` if it may sign for ``role`` at time ``at``.

        Raises :class:`TrustError` naming the check that failed: unknown
        (untrusted) key, revoked, wrong role, not yet or no longer valid.
        """
        key = self.by_id(kid)
        if key is None:
            raise TrustError(f"signing key {kid[:16]} is not trusted on this host "
                             "(see popek trust list)")
        if key.revoked:
            raise TrustError(f"signing key {key.name!r} ({kid[:16]}) was revoked on "
                             f"{key.revoked}" + (f": {key.revoke_reason}" if key.revoke_reason
                                                 else ""))
        if key.role != role:
            raise TrustError(f"signing key {key.name!r} has role {key.role!r}, not {role!r}")
        t = at or now()
        if t < parse_time(key.not_before, "key not_before"):
            raise TrustError(f"signing key {key.name!r} is not valid before {key.not_before}")
        if t > parse_time(key.not_after, "key not_after"):
            raise TrustError(f"signing key {key.name!r} expired on {key.not_after}")
        return key

    def verify(self, kid: str, role: str, payload: bytes, sig_b64: str) -> TrustedKey:
        """Check the key (see :meth:`check_key`) and its signature over ``payload``.

        The key is checked every time (trusted, role, revocation, validity).
        The Ed25519 check itself is remembered: a signature that verified
        once is recorded in the state store under the SHA-256 of what it
        binds (purpose, key, signature, payload), so the next start with the
        same image or policy needs no cryptography (importing the library
        alone costs tens of ms).  The record is as trusted as the trust store
        beside it: whoever can write one can also add a key.
        """
        key = self.check_key(kid, role)
        try:
            sig = base64.b64decode(sig_b64, validate=True)
        except ValueError:
            sig = b""
        memo = VERIFIED_PREFIX + hashlib.sha256(b"\0".join(
            (PURPOSES[role], key.raw(), sig)) + b"\0" + payload).hexdigest()
        if sig and self.store.get(memo) is not None:
            return key
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(key.raw()).verify(sig, PURPOSES[role] + payload)
        except (InvalidSignature, ValueError):
            raise TrustError(f"the {role} signature by key {key.name!r} ({kid[:16]}) does not "
                             "match what it signs") from None
        self.store.put(memo, b"1")
        return key


def _raw_public(priv: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return priv.public_key().public_bytes(serialization.Encoding.Raw,
                                          serialization.PublicFormat.Raw)


def canonical(doc: object) -> bytes:
    """The canonical JSON bytes of ``doc`` (sorted keys, no spaces, ASCII)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
