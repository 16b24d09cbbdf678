"""Who is asking: the local socket's peer is root (admin); TCP clients show a bearer token.

The local Unix socket is root's only (mode 0600 in a 0700 directory), so a
request on it is the host's administrator.  On TCP (with TLS) every request
carries ``Authorization: Bearer SECRET``, checked by
:class:`popek.core.auth.Tokens` where this popek has it; without one, or with
a token that does not verify, the answer is ``401`` and nothing runs.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException
from fastapi.security.utils import get_authorization_scheme_param
from starlette.requests import HTTPConnection

from popek.errors import PopekError


@dataclass(frozen=True)
class LocalAdmin:
    """Root on the local socket: every action in every project."""

    name: str = "root"
    project: str = "default"
    role: str = "admin"
    console: bool = True


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


def tokens_available() -> bool:
    """Whether this popek has tokens (:mod:`popek.core.auth`)."""
    return importlib.util.find_spec("popek.core.auth") is not None


def verify_token(secret: str) -> Any:
    """The identity of the bearer token ``secret``; 401 when it does not verify."""
    if not tokens_available():
        raise _unauthorized("this server has no tokens yet: use the local socket")
    from popek.core.service import Core

    core = Core()
    try:
        auth = importlib.import_module("popek.core.auth")
        return auth.Tokens(core.store).verify(secret)
    except PopekError as exc:
        raise _unauthorized(f"token refused: {exc}") from exc
    finally:
        _close(core)


def _close(core: Any) -> None:
    close = getattr(core.store, "close", None)
    if close is not None:
        close()


def identify(request: HTTPConnection) -> Any:
    """The identity of ``request`` (kept on ``request.state.identity``); 401 on TCP without one.

    ``request`` is a request or a websocket: both carry the same header.
    """
    if request.app.state.local:
        who: Any = LocalAdmin()
    else:
        scheme, secret = get_authorization_scheme_param(request.headers.get("authorization"))
        if scheme.lower() != "bearer" or not secret:
            raise _unauthorized("authentication required: Authorization: Bearer TOKEN")
        who = verify_token(secret)
    request.state.identity = who
    return who
