"""Signed images: what a signature covers and how it is checked before a start.

``popek image sign`` writes ``manifest.sig`` next to ``manifest.json``: a
*statement* and an Ed25519 signature over the image purpose prefix plus the
canonical JSON of the statement.  The statement names the image, its
version, creation and expiry times, an ever-increasing serial, the signer's
key id, the default kernel command line, the size and SHA-256 of every file
and the SHA-256 of the exact bytes of ``manifest.json``.

Before any instance starts, :func:`check_image` verifies, in order: the key
(trusted, role ``image``, not revoked, valid now), the signature, that the
signed name is the name asked for, that the manifest is not expired, that the
serial is not lower than the last one seen for that name (no rollback), and
that ``manifest.json`` and its file list are the ones signed.  The engines
then hash the files on the very bytes they hand to QEMU or extract for the
runtime, against these signed hashes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from popek.errors import InvalidInput
from popek.images.image import SIG_NAME
from popek.state.schema import PROJECTS_PREFIX, SERIALS_PREFIX
from popek.trust.keys import TrustError, TrustStore, canonical, iso, now, parse_time

if TYPE_CHECKING:
    from popek.images.image import Image


SIG_FORMAT = 1
SERIALS = SERIALS_PREFIX
PROJECTS = PROJECTS_PREFIX
DEFAULT_DAYS = 365
_STATEMENT_KEYS = frozenset({"name", "version", "created", "expires", "serial", "signer",
                             "cmdline", "files", "manifest_sha256"})


@dataclass(frozen=True)
class Verdict:
    """What the check found: who signed (or why unsigned was allowed) and the digest."""

    signed: bool
    signer: str  # key name, or "" when unsigned
    signer_id: str
    serial: int
    statement_sha256: str  # what the launch measurement records
    note: str

    def to_doc(self) -> dict[str, Any]:
        """A JSON-able record for instance info and the audit log."""
        return {"signed": self.signed, "signer": self.signer, "signer_id": self.signer_id,
                "serial": self.serial, "statement_sha256": self.statement_sha256,
                "note": self.note}


def _serials(trust: TrustStore, name: str) -> dict[str, int]:
    kv = trust.store.get(SERIALS + name)
    return json.loads(kv.value) if kv else {"signed": 0, "seen": 0}


def read_signature(image: Image) -> dict[str, Any] | None:
    """The parsed ``manifest.sig`` of ``image``, or ``None`` when it has none.

    Raises :class:`TrustError` when the file exists but is not a signature.
    """
    path = image.path / SIG_NAME
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_bytes())
        if (not isinstance(doc, dict) or doc.get("format") != SIG_FORMAT
                or not isinstance(doc.get("statement"), dict)
                or not isinstance(doc.get("signature"), str)):
            raise ValueError("needs format 1, a statement object and a signature string")
        if set(doc["statement"]) != _STATEMENT_KEYS:
            raise ValueError("the statement's fields are not the expected ones")
    except (ValueError, UnicodeDecodeError) as exc:
        raise TrustError(f"image '{image.name}': {SIG_NAME} is not a valid signature "
                         f"file: {exc}") from None
    return doc


def sign_image(trust: TrustStore, image: Image, key: str, days: int = DEFAULT_DAYS) -> Verdict:
    """Sign ``image`` with private key ``key``; write ``manifest.sig``; return the verdict.

    The serial is one more than any serial signed or seen for this name here.
    Raises :class:`InvalidInput` for a bad duration, plus what
    :meth:`TrustStore.sign` raises.
    """
    if not 1 <= days <= 3650:
        raise InvalidInput(f"signature validity {days} days is out of range; allowed: 1-3650")
    m = image.manifest
    old = read_signature(image) if (image.path / SIG_NAME).exists() else None
    seen = _serials(trust, image.name)
    serial = max(seen["signed"], seen["seen"], old["statement"]["serial"] if old else 0) + 1
    manifest_bytes = (image.path / "manifest.json").read_bytes()
    kid_probe = trust.by_name(key)
    statement = {
        "name": image.name, "version": m.version, "created": m.created,
        "expires": iso(now() + timedelta(days=days)), "serial": serial, "signer": kid_probe.id,
        "cmdline": m.cmdline,
        "files": {f: {"sha256": e.sha256, "size": e.size} for f, e in sorted(m.files.items())},
        "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
    }
    payload = canonical(statement)
    kid, sig = trust.sign(key, "image", payload)
    if kid != kid_probe.id:
        raise TrustError(f"private key {key!r} does not match the trusted key of that name")
    doc = {"format": SIG_FORMAT, "statement": statement, "signature": sig}
    tmp = image.path / f".{SIG_NAME}.tmp"
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    tmp.chmod(0o644)
    tmp.replace(image.path / SIG_NAME)
    trust.store.put(SERIALS + image.name,
                    json.dumps({**seen, "signed": serial}).encode())
    return Verdict(True, key, kid, serial, hashlib.sha256(payload).hexdigest(), "signed")


def allow_unsigned(trust: TrustStore, project: str) -> bool:
    """Whether an administrator relaxed the signature requirement for ``project``."""
    kv = trust.store.get(PROJECTS + project)
    return bool(kv and json.loads(kv.value).get("allow_unsigned"))


def set_allow_unsigned(trust: TrustStore, project: str, allow: bool, actor: str) -> None:
    """Relax (or restore) the signature requirement for ``project``; the caller audits it."""
    trust.store.put(PROJECTS + project, json.dumps(
        {"allow_unsigned": allow, "changed": iso(now()), "by": actor}).encode())


def check_image(trust: TrustStore, image: Image, asked: str, project: str) -> Verdict:
    """Check the signature of ``image`` as launched under the name ``asked``.

    Returns the :class:`Verdict`; raises :class:`TrustError` naming the
    check that failed.  The files themselves are hashed by the engine, on
    the bytes it uses, against the signed manifest (see module docstring).
    """
    doc = read_signature(image)
    if doc is None:
        if allow_unsigned(trust, project):
            digest = hashlib.sha256((image.path / "manifest.json").read_bytes()).hexdigest()
            return Verdict(False, "", "", 0, digest,
                           f"unsigned, allowed by the policy of project {project!r}")
        raise TrustError(f"image '{image.name}' is not signed, and project {project!r} "
                         "requires signed images (sign it: popek image sign "
                         f"{image.name} --key NAME; or relax: popek trust allow-unsigned "
                         f"--project {project})")
    st = doc["statement"]
    payload = canonical(st)
    key = trust.verify(str(st["signer"]), "image", payload, doc["signature"])
    if st["name"] != asked:
        raise TrustError(f"image signature is for {st['name']!r}, not for {asked!r}")
    if now() > parse_time(str(st["expires"]), "signature expiry"):
        raise TrustError(f"the signature of image '{asked}' expired on {st['expires']}")
    serial = st["serial"]
    if type(serial) is not int or serial < 1:
        raise TrustError(f"image '{asked}': signed serial {serial!r} is not a positive integer")
    seen = _serials(trust, asked)
    if serial < seen["seen"]:
        raise TrustError(f"image '{asked}' has serial {serial}, lower than serial "
                         f"{seen['seen']} already seen: refusing a rollback to an older image")
    manifest_bytes = (image.path / "manifest.json").read_bytes()
    if hashlib.sha256(manifest_bytes).hexdigest() != st["manifest_sha256"]:
        raise TrustError(f"image '{asked}': manifest.json is not the one that was signed")
    m = image.manifest
    from popek.images.manifest import Manifest

    if Manifest.from_json(manifest_bytes.decode()) != m:  # the manifest in use is the signed one
        raise TrustError(f"image '{asked}': manifest.json changed after it was read")
    files = {f: {"sha256": e.sha256, "size": e.size} for f, e in sorted(m.files.items())}
    if files != st["files"] or m.cmdline != st["cmdline"] or m.version != st["version"]:
        raise TrustError(f"image '{asked}': the manifest's files, version or cmdline differ "
                         "from the signed ones")
    if serial > seen["seen"]:
        trust.store.put(SERIALS + asked, json.dumps({**seen, "seen": serial}).encode())
    return Verdict(True, key.name, key.id, serial, hashlib.sha256(payload).hexdigest(),
                   f"signed by {key.name} (serial {serial})")
