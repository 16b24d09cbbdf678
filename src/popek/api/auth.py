"""Who is asking: the local socket's peer is root (the host admin); TCP needs a credential.

The local Unix socket is root's only (mode 0600), so a request on it is the
host admin (:func:`popek.core.auth.host_admin`).  On TCP (with TLS) a request
carries either ``Authorization: Bearer SECRET`` (a token) or comes on a
connection whose TLS handshake presented a client certificate the host admin
trusts (:mod:`popek.api.tls` puts it in the scope); both at once are refused as
ambiguous.  :func:`popek.core.authn.authenticate` decides and audits every
refused credential; without one, or with one unknown, revoked or expired, the
answer is ``401`` with the error body and nothing runs.
"""

from __future__ import annotations

from fastapi import HTTPException
from fastapi.concurrency import run_in_threadpool
from fastapi.security.utils import get_authorization_scheme_param
from starlette.requests import HTTPConnection

from popek.api.runner import session
from popek.api.tls import PEER_CERTIFICATE
from popek.core.auth import AuthError, Identity, host_admin


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


def verify(token: str | None, certificate: bytes | None, request: str = "",
           client: str = "") -> Identity:
    """The identity of a client that presented ``token`` and/or ``certificate`` (DER);
    401 when that is not one trusted credential (the refusal audited)."""
    from popek.core.authn import authenticate

    with session() as core:
        try:
            return authenticate(core, token, certificate, request, client)
        except AuthError as exc:
            raise _unauthorized(str(exc)) from exc


def peer_certificate(request: HTTPConnection) -> bytes | None:
    """The DER certificate the client presented in its TLS handshake (``None``: none)."""
    state = request.scope.get("state")
    der = state.get(PEER_CERTIFICATE) if isinstance(state, dict) else None
    return der if isinstance(der, bytes) and der else None


async def identified(request: HTTPConnection) -> Identity:
    """:func:`identify` as the application's dependency: on the local socket at once, in
    the event loop; a token is checked in a worker thread (it reads the store)."""
    if request.app.state.local:
        return identify(request)
    return await run_in_threadpool(identify, request)


def identify(request: HTTPConnection) -> Identity:
    """The identity of ``request`` (kept on ``request.state.identity``); 401 on TCP without one.

    ``request`` is a request or a websocket: both carry the same header and scope.
    """
    if request.app.state.local:
        who = host_admin()
    else:
        scheme, secret = get_authorization_scheme_param(request.headers.get("authorization"))
        token = secret if scheme.lower() == "bearer" and secret else None
        if scheme and token is None:
            raise _unauthorized("authentication required: Authorization: Bearer TOKEN "
                                "(popek token create) or a trusted TLS client certificate "
                                "(popek certificate add)")
        method = request.scope.get("method", "WEBSOCKET")
        client = f"{request.client.host}:{request.client.port}" if request.client else ""
        who = verify(token, peer_certificate(request), f"{method} {request.url.path}", client)
    request.state.identity = who
    return who
