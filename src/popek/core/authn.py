"""Who an API client on TCP is: a bearer token or a TLS client certificate, refusals audited.

:func:`authenticate` takes what the client presented (a bearer token, the DER
certificate of its TLS handshake, or both) and gives its
:class:`popek.core.auth.Identity`, or raises an :class:`popek.core.auth.AuthError`
(the API answers ``401``) after writing an audit record of the refusal:

- a certificate alone: :meth:`popek.core.certificates.Certificates.verify`
  (trusted, not revoked, valid now);
- a token alone: :meth:`popek.core.auth.Tokens.verify`;
- both: refused as ambiguous (``denied: ... present one``): the request would
  otherwise act as one of two identities that may differ in project and role,
  and a client sending a token over a certificate connection meant something
  else;
- neither: refused, not audited (nothing names who tried: a scan of the port
  would only fill the log).

One client address gets at most :data:`popek.core.refusals.BURST` such
records a minute; the refusals beyond are summed up in one record
(``auth.refused``) when its minute is over (:mod:`popek.core.refusals`).

The refusal's record: op ``auth.certificate`` (target: the certificate's
SHA-256 fingerprint) or ``auth.token`` (target: the token's id, never its
secret), the result ``denied: WHY``, ``change`` naming the request and the
client's address, and the identity and project of the certificate or token
when the store knows it (``unauthenticated`` otherwise).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from popek.core.auth import SECRET_PREFIX, AuthError, Identity, TokenRejected, Tokens
from popek.core.certificates import CertificateRejected, Certificates, fingerprint
from popek.core.refusals import REFUSALS, SUMMARY_OP, Summary
from popek.core.service import warn_unaudited
from popek.errors import PopekError

if TYPE_CHECKING:
    from popek.core.service import Core

#: the identity of an audit record of a client the store does not know
UNAUTHENTICATED = "unauthenticated"


class Unauthenticated(AuthError):
    """No credential, or two: the API answers 401."""


def authenticate(core: Core, token: str | None, certificate: bytes | None,
                 request: str = "", client: str = "") -> Identity:
    """The identity of a client that presented ``token`` and/or ``certificate`` (DER).

    ``request`` (``GET /1.0/instances``) and ``client`` (its address) go into the
    audit record of a refusal.  Raises :class:`Unauthenticated`,
    :class:`popek.core.auth.TokenRejected` or
    :class:`popek.core.certificates.CertificateRejected`.
    """
    where = " ".join(p for p in (request, f"from {client}" if client else "") if p)
    if token and certificate:
        exc: AuthError = Unauthenticated(
            "denied: both a client certificate and a bearer token were presented: present "
            "one (a remote added with --auth cert sends no token)")
        _refused(core, "auth.certificate", fingerprint(certificate), exc, where, client,
                 *_known_certificate(core, certificate))
        raise exc
    if certificate:
        try:
            return Certificates(core.store).verify(certificate)
        except CertificateRejected as exc:
            _refused(core, "auth.certificate", fingerprint(certificate), exc, where, client,
                     *_known_certificate(core, certificate))
            raise
    if token:
        try:
            return Tokens(core.store).verify(token)
        except TokenRejected as exc:
            _refused(core, "auth.token", _token_id(token), exc, where, client,
                     *_known_token(core, token))
            raise
    raise Unauthenticated("authentication required: a trusted TLS client certificate "
                          "(popek certificate add) or Authorization: Bearer TOKEN "
                          "(popek token create)")


def _token_id(secret: str) -> str:
    """The id a secret names (``pk1.ID.RANDOM``), never the secret; ``?`` for garbage."""
    parts = secret.split(".")
    ok = len(parts) == 3 and parts[0] == SECRET_PREFIX and parts[1].isalnum()
    return parts[1][:32] if ok else "?"


def _known_token(core: Core, secret: str) -> tuple[str, str]:
    """The label and project of the token ``secret`` is (revoked or expired): only when the
    secret is its own, never for a guessed id."""
    import hashlib
    import hmac

    from popek.errors import NotFound

    token_id = _token_id(secret)
    if token_id == "?":
        return UNAUTHENTICATED, ""
    try:
        token = Tokens(core.store).get(token_id)
    except NotFound:
        return UNAUTHENTICATED, ""
    if not hmac.compare_digest(hashlib.sha256(secret.encode()).hexdigest(), token.hash):
        return UNAUTHENTICATED, ""
    return token.identity().label(), token.project


def _known_certificate(core: Core, der: bytes) -> tuple[str, str]:
    record = Certificates(core.store).lookup(der)
    if record is None:
        return UNAUTHENTICATED, ""
    return record.label(), record.project


def _refused(core: Core, op: str, target: str, exc: AuthError, where: str, client: str,
             identity: str, project: str) -> None:
    """Audit a refused authentication (a warning when the log cannot be written): within
    the client's budget (:mod:`popek.core.refusals`), else counted for its summary."""
    own, ended = REFUSALS.admit(client)
    try:
        write_summaries(core, ended)
        if own:
            core.audit.append(op, target, {"request": where}, str(exc)[:500], where,
                              identity=identity, project=project)
    except (OSError, PopekError) as err:
        warn_unaudited(err, exc)


def write_summaries(core: Core, summaries: list[Summary]) -> None:
    """One audit record per summary of refusals not recorded one by one."""
    for s in summaries:
        core.audit.append(SUMMARY_OP, s.source, {"count": s.count, "first": s.first},
                          s.result(), f"from {s.source}", identity=UNAUTHENTICATED)


__all__ = ["REFUSALS", "UNAUTHENTICATED", "Unauthenticated", "authenticate", "write_summaries"]
