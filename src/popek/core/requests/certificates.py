"""Requests on the TLS client certificates the API trusts (see :mod:`popek.core.certificates`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from popek.core.service import Request

if TYPE_CHECKING:
    from popek.core.certificates import ClientCertificate
    from popek.core.service import Core


@dataclass(frozen=True)
class CertificateAdd(Request["ClientCertificate"]):
    """Trust the client certificate ``pem`` for ``project`` with ``role`` (``console``: the
    console/exec grant); ``cert_name`` names it (default ``cert-`` and its fingerprint)."""

    op = "certificate.add"
    shown = ("project", "role", "console", "cert_name")
    pem: str
    project: str
    role: str
    console: bool = False
    cert_name: str | None = None

    def target(self) -> str:
        """The certificate's SHA-256 fingerprint (empty when it is not a certificate)."""
        from popek.core.certificates import fingerprint, parse
        from popek.errors import InvalidInput

        try:
            return fingerprint(parse(self.pem.encode(errors="replace"))[1])
        except InvalidInput:
            return ""

    def run(self, core: Core) -> ClientCertificate:
        """Trust it, for a project that exists."""
        from popek.core.certificates import Certificates
        from popek.core.projects import Projects

        Projects(core.store).require(self.project)
        return Certificates(core.store).add(self.pem.encode(errors="replace"), self.project,
                                            self.role, self.console, self.cert_name)


@dataclass(frozen=True)
class CertificateRevoke(Request["ClientCertificate"]):
    """Revoke the trusted certificate ``ref`` (its name or fingerprint) at once."""

    op = "certificate.revoke"
    ref: str

    def target(self) -> str:
        """The name or fingerprint given."""
        return self.ref

    def run(self, core: Core) -> ClientCertificate:
        """Revoke it (a certificate of another project is not found for a project admin)."""
        from popek.core.certificates import Certificates

        mine = None if core.identity.host_admin else core.identity.project
        return Certificates(core.store).revoke(self.ref, mine)
