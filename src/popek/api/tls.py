"""The server's TLS identity: a key and a self-signed certificate made on first start.

Kept under ``$POPEK_HOME/api/`` (``server.key`` 0600, ``server.crt``); clients
pin the certificate by its SHA-256 fingerprint (:func:`fingerprint`), as
incus's ``remote add`` does, rather than trusting a certificate authority.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import socket
from pathlib import Path

from popek import paths

#: how long the self-signed certificate is valid
VALID_DAYS = 3650


def api_dir() -> Path:
    """``$POPEK_HOME/api`` (0700): the server's key and certificate."""
    d = paths.home() / "api"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    return d


def ensure_certificate(directory: Path | None = None) -> tuple[Path, Path]:
    """The server's ``(certificate, key)`` paths, made (EC P-256, self-signed) when missing."""
    d = directory or api_dir()
    cert_path, key_path = d / "server.crt", d / "server.key"
    if cert_path.exists() and key_path.exists():
        os.chmod(key_path, 0o600)
        return cert_path, key_path
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    host = socket.gethostname()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"popek@{host}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(host), x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    pem_key = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    _write(key_path, pem_key, 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fingerprint(cert_path: Path) -> str:
    """The SHA-256 fingerprint of the certificate (of its DER form), as hex."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
