"""Self-signed TLS client certificates for tests of the API's certificate authentication."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class Cert:
    """A client's certificate and key, as files, and the certificate as PEM and DER."""

    crt: Path
    key: Path
    pem: bytes
    der: bytes

    @property
    def fingerprint(self) -> str:
        """Its SHA-256 fingerprint, hex (as popek names it)."""
        return hashlib.sha256(self.der).hexdigest()


def make_cert(directory: Path, name: str, start: timedelta = timedelta(minutes=-5),
              end: timedelta = timedelta(days=30)) -> Cert:
    """A self-signed certificate (EC P-256, subject CN ``name``) valid from now+``start`` to
    now+``end``, written with its key as ``directory/name.crt`` and ``name.key``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now + start).not_valid_after(now + end)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    crt, keyfile = directory / f"{name}.crt", directory / f"{name}.key"
    pem = cert.public_bytes(serialization.Encoding.PEM)
    crt.write_bytes(pem)
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return Cert(crt, keyfile, pem, cert.public_bytes(serialization.Encoding.DER))
