"""Who is asking: the local socket's peer is root (the host admin); TCP needs a bearer token.

The local Unix socket is root's only (mode 0600), so a request on it is the
host admin (:func:`popek.core.auth.host_admin`).  On TCP (with TLS) every
request carries ``Authorization: Bearer SECRET``, checked by
:meth:`popek.core.auth.Tokens.verify`; without one, or with a token unknown,
revoked or expired, the answer is ``401`` and nothing runs.
"""

from __future__ import annotations

from fastapi import HTTPException
from fastapi.security.utils import get_authorization_scheme_param
from starlette.requests import HTTPConnection

from popek.api.runner import session
from popek.core.auth import Identity, TokenRejected, Tokens, host_admin


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


def verify_token(secret: str) -> Identity:
    """The identity of the bearer token ``secret``; 401 when it does not verify."""
    with session() as core:
        try:
            return Tokens(core.store).verify(secret)
        except TokenRejected as exc:
            raise _unauthorized(str(exc)) from exc


def identify(request: HTTPConnection) -> Identity:
    """The identity of ``request`` (kept on ``request.state.identity``); 401 on TCP without one.

    ``request`` is a request or a websocket: both carry the same header.
    """
    if request.app.state.local:
        who = host_admin()
    else:
        scheme, secret = get_authorization_scheme_param(request.headers.get("authorization"))
        if scheme.lower() != "bearer" or not secret:
            raise _unauthorized("authentication required: Authorization: Bearer TOKEN "
                                "(popek token create)")
        who = verify_token(secret)
    request.state.identity = who
    return who
