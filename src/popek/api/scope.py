"""Who asks and in which project: what every handler of the API starts from.

:func:`identity` is what :func:`popek.api.auth.identify` found for the
request (the host admin on the local socket, a token's holder on TCP);
:func:`seen` the project whose records a listing of operations, audit
records or events may show (``None``: every one, for the host admin).
"""

from __future__ import annotations

from starlette.requests import HTTPConnection

from popek.core.auth import Identity, host_admin


def identity(request: HTTPConnection) -> Identity:
    """The identity of ``request`` (the host admin when none was set)."""
    who = getattr(request.state, "identity", None)
    return who if isinstance(who, Identity) else host_admin()


def seen(who: Identity) -> str | None:
    """The project whose operations, audit records and events ``who`` sees (``None``: all)."""
    return None if who.host_admin else who.project
