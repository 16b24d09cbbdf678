"""Errors as the API answers them: an HTTP status and ``{"error": {code, message, field}}``.

``code`` is the name of popek's exit code (:data:`popek.errors.EXIT_CODES`):
``bad_input``, ``not_found``, ``exists``, ``wrong_state``, ``denied``...  An
error that is not a :class:`PopekError` is a bug: the client gets ``500``
with a generic message, the server's log gets the traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from popek import errors
from popek.core.operations import error_body
from popek.errors import PopekError

log = logging.getLogger("popek.api")

#: the HTTP status of each exit code (anything else: 500)
STATUS = {
    errors.BAD_INPUT: 400,
    errors.TAMPERED: 409,
    errors.DENIED: 403,
    errors.CONFLICT: 409,
    errors.UNAVAILABLE: 503,
    errors.DAMAGED: 503,
    errors.NOT_FOUND: 404,
    errors.EXISTS: 409,
    errors.WRONG_STATE: 409,
}
#: the code names of HTTP errors that are not popek's (routing, authentication)
HTTP_CODES = {400: "bad_input", 401: "unauthenticated", 403: "denied", 404: "not_found",
              405: "method_not_allowed", 409: "conflict", 413: "bad_input", 415: "bad_input"}


def status_of(exc: PopekError) -> int:
    """The HTTP status for ``exc``."""
    return STATUS.get(exc.exit_code, 500)


def body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    """The JSON body of an error answer."""
    return {"error": {"code": code, "message": message, "field": field}}


def install(app: FastAPI) -> None:
    """Answer every error of ``app`` with the JSON body, never a traceback."""

    @app.exception_handler(PopekError)
    async def popek_error(request: Request, exc: PopekError) -> JSONResponse:
        return JSONResponse({"error": error_body(exc)}, status_code=status_of(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        first = problems[0] if problems else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(loc) or None
        message = f"invalid {field or 'request'}: {first.get('msg', 'not acceptable')}"
        return JSONResponse(body("bad_input", errors.bounded(message), field), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, "failure")
        headers = getattr(exc, "headers", None)
        return JSONResponse(body(code, str(exc.detail)), status_code=exc.status_code,
                            headers=headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": error_body(exc)}, status_code=500)
