"""TLS client certificates the API trusts: each for one project and one role, as incus does.

A client (``popek remote add``) makes its own key and self-signed certificate;
the host admin trusts that certificate for a project and a role
(``popek certificate add FILE --project P --role R``, the request
:class:`popek.core.requests.CertificateAdd`).  The store keeps the record
under ``/popek/certificates/SHA256`` (the SHA-256 fingerprint of the
certificate's DER form, hex): name, project, role, console grant, validity,
revocation and the PEM itself (public: no secret is kept).

On TCP the server asks every client for a certificate without checking it at
the TLS layer (a self-signed one cannot be checked there: see
:mod:`popek.api.tls`); the TLS handshake only proves the client holds the
certificate's private key.  :meth:`Certificates.verify` then decides: the
fingerprint must be trusted, not revoked, and the certificate presented valid
now (not expired, not before its start).  Else :class:`CertificateRejected`
(the API's ``401``).  A request made with a trusted certificate acts as
:meth:`ClientCertificate.identity`, named ``certificate NAME (SHA256 prefix)``
in audit records.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from popek.core.auth import AuthError, Identity, check_role
from popek.errors import AlreadyExists, InvalidInput, NotFound
from popek.names import validate_name
from popek.state.schema import CERTIFICATES_PREFIX, certificate_key
from popek.state.store import Compare, Put, StateStore

if TYPE_CHECKING:
    from cryptography.x509 import Certificate

#: how many hex digits of a fingerprint name a certificate in messages and audit records
SHORT = 12
#: the shortest fingerprint prefix ``certificate revoke`` accepts
MIN_PREFIX = 8
#: the largest certificate file ``certificate add`` reads (bytes)
MAX_BYTES = 64 * 1024


class CertificateRejected(AuthError):
    """A client certificate is unknown, revoked, expired or not yet valid (the API's 401)."""


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="seconds")


def fingerprint(der: bytes) -> str:
    """The SHA-256 fingerprint of a DER certificate, hex (what ``popek remote add`` prints)."""
    return hashlib.sha256(der).hexdigest()


def parse(data: bytes, what: str = "the certificate") -> tuple[Certificate, bytes]:
    """``(certificate, DER)`` of a PEM or DER certificate; InvalidInput when it is not one."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    if len(data) > MAX_BYTES:
        raise InvalidInput(f"{what} is {len(data)} bytes: not a certificate (at most "
                           f"{MAX_BYTES} bytes)")
    try:
        if b"-----BEGIN" in data:
            if b"PRIVATE KEY-----" in data:
                raise InvalidInput(f"{what} holds a private key: give the certificate only "
                                   "(client.crt), never the key")
            cert = x509.load_pem_x509_certificate(data)
        else:
            cert = x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise InvalidInput(f"{what} is not an X.509 certificate (PEM or DER): "
                           f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'}") from exc
    return cert, cert.public_bytes(Encoding.DER)


def common_name(cert: Certificate) -> str:
    """The certificate's subject common name ('' when it has none)."""
    from cryptography.x509.oid import NameOID

    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode(errors="replace")


def _validity(cert: Certificate) -> tuple[datetime, datetime]:
    return cert.not_valid_before_utc, cert.not_valid_after_utc


def self_signed(common: str, days: int, dns_names: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
    """A new EC P-256 key and a certificate it signs itself, valid ``days`` days from five
    minutes ago: ``(certificate PEM, key PEM)``.  The server's certificate
    (:mod:`popek.api.tls`) and a client's (``popek remote add``) are made this way."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])
    now = _now()
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=5))
               .not_valid_after(now + timedelta(days=days)))
    if dns_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(n) for n in dns_names]), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), pem_key


@dataclass(frozen=True)
class ClientCertificate:
    """A trusted client certificate's record, as stored and listed."""

    fingerprint: str
    name: str
    project: str
    role: str
    console: bool
    subject: str
    not_before: str
    not_after: str
    added: str
    revoked: str | None
    pem: str

    def to_json(self) -> bytes:
        """The stored form."""
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ClientCertificate:
        """Read a stored record."""
        return cls(**json.loads(data))

    def public(self) -> dict[str, object]:
        """What ``certificate list`` shows: every field but the PEM."""
        out: dict[str, object] = asdict(self)
        del out["pem"]
        return out

    def label(self) -> str:
        """``certificate NAME (SHA256 prefix)``: how audit records and messages name it."""
        return f"certificate {self.name} ({self.fingerprint[:SHORT]})"

    def identity(self) -> Identity:
        """The identity a request made with this certificate acts under."""
        return Identity(self.label(), self.project, self.role, self.console)


class Certificates:
    """The client certificates this host's API trusts, in the state store."""

    def __init__(self, store: StateStore) -> None:
        """Over ``store``."""
        self.store = store

    def list(self, project: str | None = None) -> list[ClientCertificate]:
        """Every certificate (of ``project``), revoked ones too, by the time it was added."""
        certs = [ClientCertificate.from_json(kv.value)
                 for kv in self.store.range(CERTIFICATES_PREFIX)]
        return sorted((c for c in certs if project is None or c.project == project),
                      key=lambda c: (c.added, c.name))

    def _load(self, fp: str) -> ClientCertificate | None:
        kv = self.store.get(certificate_key(fp))
        return ClientCertificate.from_json(kv.value) if kv is not None else None

    def add(self, data: bytes, project: str, role: str, console: bool = False,
            name: str | None = None) -> ClientCertificate:
        """Trust the certificate ``data`` (PEM or DER) for ``project`` with ``role``.

        InvalidInput when it is not a certificate, has expired, or the name or
        role is not allowed; AlreadyExists when it (or its name) is trusted
        already; a revoked certificate stays revoked (the client makes a new one).
        """
        validate_name(project, "project name")
        check_role(role)
        if name is not None:
            validate_name(name, "certificate name")
        cert, der = parse(data)
        fp = fingerprint(der)
        start, end = _validity(cert)
        if end <= _now():
            raise InvalidInput(f"the certificate (sha256 {fp[:SHORT]}) expired on "
                               f"{_iso(end)}: the client makes a new one")
        old = self._load(fp)
        if old is not None:
            if old.revoked:
                raise AlreadyExists(f"{old.label()} was revoked on {old.revoked} and stays "
                                    "revoked: the client makes a new certificate")
            raise AlreadyExists(f"the certificate is trusted already, as {old.label()} "
                                f"({old.role} in project {old.project})")
        label = name or f"cert-{fp[:SHORT]}"
        if any(c.name == label for c in self.list()):
            raise AlreadyExists(f"a certificate named {label} exists already: choose "
                                "another --name")
        from cryptography.hazmat.primitives.serialization import Encoding

        record = ClientCertificate(
            fingerprint=fp, name=label, project=project, role=role, console=bool(console),
            subject=common_name(cert)[:200], not_before=_iso(start), not_after=_iso(end),
            added=_iso(_now()), revoked=None, pem=cert.public_bytes(Encoding.PEM).decode())
        key = certificate_key(fp)
        res = self.store.txn([Compare(key, "version", "==", 0)], [Put(key, record.to_json())])
        if not res.succeeded:
            raise AlreadyExists(f"the certificate (sha256 {fp[:SHORT]}) was just trusted by "
                                "another request")
        return record

    def get(self, ref: str, project: str | None = None) -> ClientCertificate:
        """The certificate named ``ref``: its name, its fingerprint, or a prefix of at least
        :data:`MIN_PREFIX` hex digits of it (of ``project``, if given).  NotFound names the
        known ones (of ``project``); InvalidInput for a prefix of several."""
        known = self.list(project)
        ref_l = ref.lower().replace(":", "")
        found = [c for c in known if c.name == ref]
        if not found and len(ref_l) >= MIN_PREFIX and all(ch in "0123456789abcdef"
                                                          for ch in ref_l):
            found = [c for c in known if c.fingerprint.startswith(ref_l)]
        if len(found) > 1:
            raise InvalidInput(f"{ref!r} names several certificates "
                               f"({', '.join(c.name for c in found)}): give more of the "
                               "fingerprint, or the name")
        if not found:
            names = ", ".join(c.name for c in known) or "none"
            raise NotFound(f"certificate {ref!r} not found (give its name or at least "
                           f"{MIN_PREFIX} hex digits of its fingerprint); trusted "
                           f"certificates: {names}")
        return found[0]

    def revoke(self, ref: str, project: str | None = None) -> ClientCertificate:
        """Revoke certificate ``ref`` (see :meth:`get`) at once; its record stays, listed
        as revoked.  Return it."""
        cert = self.get(ref, project)
        if cert.revoked:
            return cert
        done = ClientCertificate(**{**asdict(cert), "revoked": _iso(_now())})
        self.store.put(certificate_key(cert.fingerprint), done.to_json())
        return done

    def lookup(self, der: bytes) -> ClientCertificate | None:
        """The record of the certificate ``der`` presented, trusted or revoked; ``None``
        when it was never trusted."""
        return self._load(fingerprint(der))

    def verify(self, der: bytes) -> Identity:
        """The identity of the client that presented certificate ``der`` in its TLS
        handshake; :class:`CertificateRejected` when it is not trusted, revoked, expired
        or not valid yet."""
        fp = fingerprint(der)
        record = self._load(fp)
        if record is None:
            raise CertificateRejected(
                f"denied: the client certificate (sha256 {fp[:SHORT]}) is not trusted: the "
                f"host admin trusts it with popek certificate add FILE --project P --role R")
        if record.revoked:
            raise CertificateRejected(f"denied: {record.label()} was revoked on "
                                      f"{record.revoked}")
        try:
            cert, _ = parse(der)
            start, end = _validity(cert)
        except InvalidInput as exc:  # the handshake took it: cannot happen, but refuse
            raise CertificateRejected(f"denied: {record.label()}: {exc}") from exc
        now = _now()
        if end <= now:
            raise CertificateRejected(f"denied: {record.label()} expired on {_iso(end)}: "
                                      "the client makes a new one")
        if start > now:
            raise CertificateRejected(f"denied: {record.label()} is not valid before "
                                      f"{_iso(start)}")
        return record.identity()


__all__ = ["CertificateRejected", "Certificates", "ClientCertificate", "common_name",
           "fingerprint", "parse", "self_signed"]
