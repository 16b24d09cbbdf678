"""Talking to a remote's REST API (``popek serve``): pinned TLS, the token, errors, operations.

Imported only when a command names a remote (``lab:web``, ``popek list lab:``).
Over https the server's certificate must have the SHA-256 fingerprint pinned by
``popek remote add``: it is checked right after the handshake, before a byte of
the request (the token) is sent, and no certificate authority is asked.  Over a
``unix://`` socket the server's socket permissions are the check (root's admin).
A remote added with a client certificate (``auth`` ``certificate``) presents
this user's (:mod:`popek.cli.clientcert`) in the handshake and sends no token.

An API error (``{"error": {code, message, field}}``) becomes :class:`RemoteError`
with popek's exit code of that ``code``, so a remote command fails with the
same one line and exit code as the local one.  Long work answers with an
operation, waited on here with its progress shown as locally.
"""

from __future__ import annotations

import contextlib
import hashlib
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx

from popek import errors
from popek.cli.remotes import CERTIFICATE, Remote
from popek.errors import PopekError

#: seconds to wait for a connection or an answer that is not an operation's end
TIMEOUT = 30.0
#: exit codes of the API's error codes that are not popek's own names
HTTP_CODE_EXITS = {"unauthenticated": errors.DENIED, "method_not_allowed": errors.BAD_INPUT}


class RemoteError(PopekError):
    """An error a remote answered, or a failure to reach it; ``exit_code`` as locally."""

    def __init__(self, message: str, exit_code: int = errors.FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def exit_code_of(code: str) -> int:
    """popek's exit code for an API error ``code`` (``not_found``: 8...); else failure."""
    if code in HTTP_CODE_EXITS:
        return HTTP_CODE_EXITS[code]
    value = getattr(errors, code.upper(), None) if code.isidentifier() else None
    return value if isinstance(value, int) else errors.FAILURE


def fingerprint_of(der: bytes) -> str:
    """The SHA-256 fingerprint of a DER certificate, as ``popek serve`` prints it (hex)."""
    return hashlib.sha256(der).hexdigest()


def host_port(url: str) -> tuple[str, int]:
    """The host and port of an ``https://`` URL (443 when none is given)."""
    try:
        parts = urlsplit(url)
        port = parts.port or 443
    except ValueError as exc:
        raise RemoteError(f"invalid remote URL {url!r}: {exc}", errors.BAD_INPUT) from exc
    if not parts.hostname:
        raise RemoteError(f"invalid remote URL {url!r}: no host", errors.BAD_INPUT)
    return parts.hostname, port


def server_fingerprint(url: str, timeout: float = 10.0) -> str:
    """The fingerprint of the certificate the server at ``url`` presents (trusting nothing)."""
    host, port = host_port(url)
    try:
        pem = ssl.get_server_certificate((host, port), timeout=timeout)
    except (OSError, ssl.SSLError) as exc:
        raise RemoteError(f"cannot reach {url} to read its certificate: "
                          f"{getattr(exc, 'strerror', None) or exc}") from exc
    return fingerprint_of(ssl.PEM_cert_to_DER_cert(pem))


class PinnedContext(ssl.SSLContext):
    """A TLS client context that accepts exactly one certificate: the pinned fingerprint's."""

    remote: str = ""
    pin: str = ""

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        """The TLS socket, once its peer's certificate is the pinned one; else RemoteError."""
        sock = super().wrap_socket(*args, **kwargs)
        der = sock.getpeercert(binary_form=True) or b""
        got = fingerprint_of(der)
        if got != self.pin:
            sock.close()
            raise RemoteError(
                f"the certificate of remote {self.remote} has changed: pinned {self.pin}, "
                f"the server presents {got}; nothing was sent. If the server's certificate "
                f"was renewed on purpose: popek remote remove {self.remote}, then add it again",
                errors.TAMPERED)
        return sock


def pinned_context(remote: Remote) -> ssl.SSLContext:
    """The TLS context for ``remote``: its pinned fingerprint, no certificate authority;
    this user's client certificate when the remote authenticates with it."""
    ctx = PinnedContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the fingerprint is the check (wrap_socket)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.remote, ctx.pin = remote.name, remote.fingerprint
    if remote.auth == CERTIFICATE:
        from popek.cli import clientcert

        cert, key = clientcert.paths()
        try:
            ctx.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as exc:
            raise RemoteError(
                f"remote {remote.name} authenticates with the client certificate {cert}, "
                f"which cannot be read ({getattr(exc, 'strerror', None) or exc}): popek remote "
                f"remove {remote.name}, then add it again (a new certificate, to be trusted "
                "again on the server)", errors.BAD_INPUT) from exc
    return ctx


class Client:
    """One remote's API: requests with its token, errors as popek's, operations waited on."""

    def __init__(self, remote: Remote) -> None:
        """Over ``remote``'s URL (https with its pin and token, or a unix socket)."""
        self.remote = remote
        headers = {"Authorization": f"Bearer {remote.token}"} if remote.token else {}
        if remote.url.startswith("unix://"):
            transport = httpx.HTTPTransport(uds=remote.url[len("unix://"):])
            self.http = httpx.Client(transport=transport, base_url="http://popek",
                                     headers=headers, timeout=TIMEOUT)
        else:
            if not remote.fingerprint:
                raise RemoteError(f"remote {remote.name} has no pinned certificate: popek "
                                  f"remote remove {remote.name}, then add it again",
                                  errors.BAD_INPUT)
            self.http = httpx.Client(base_url=remote.url, headers=headers, timeout=TIMEOUT,
                                     verify=pinned_context(remote))

    def call(self, method: str, path: str, *, json: Any = None,
             params: dict[str, Any] | None = None, timeout: float = TIMEOUT,
             content: Any = None) -> Any:
        """The JSON answer of ``METHOD path`` (sent: ``json``, or ``content``: bytes or a
        binary file, streamed); RemoteError for an error answer."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        with self._reaching(timeout):
            answer = self.http.request(method, path, json=json, params=query,
                                       timeout=timeout, content=content)
        try:
            data = answer.json()
        except ValueError:
            data = None
        if answer.status_code >= 400:
            raise self._error(answer.status_code, data)
        return data

    @contextlib.contextmanager
    def _reaching(self, timeout: float) -> Iterator[None]:
        """Turn httpx's failure to reach the remote (or to hear it within ``timeout``) into
        a RemoteError naming the remote."""
        try:
            yield
        except httpx.TimeoutException as exc:
            raise RemoteError(f"remote {self.remote.name} ({self.remote.url}) did not answer "
                              f"within {timeout:g} s") from exc
        except httpx.HTTPError as exc:
            raise RemoteError(f"cannot reach remote {self.remote.name} at {self.remote.url}: "
                              f"{exc}") from exc

    def _error(self, status: int, data: Any) -> RemoteError:
        err = data.get("error") if isinstance(data, dict) else None
        if not isinstance(err, dict):
            return RemoteError(f"remote {self.remote.name} answered HTTP {status} without "
                               "an error body")
        code, message = str(err.get("code", "failure")), str(err.get("message", ""))
        if code == "unauthenticated" and self.remote.auth == CERTIFICATE:
            message = (f"remote {self.remote.name} refused the client certificate ({message}); "
                       "its host admin trusts it with popek certificate add client.crt "
                       "--project P --role R")
        elif code == "unauthenticated" and not self.remote.token:
            message = (f"remote {self.remote.name} needs a token ({message}): popek remote "
                       f"remove {self.remote.name}, then add it again with --token")
        elif code == "unauthenticated":
            message = (f"remote {self.remote.name} refused the token ({message}): popek "
                       f"remote remove {self.remote.name}, then add it again with --token "
                       "and a valid one")
        return RemoteError(message, exit_code_of(code))

    def wait(self, op: dict[str, Any], step: Callable[[str], None]) -> Any:
        """Wait for operation ``op`` to finish, showing its progress; its result."""
        shown = 0
        while True:
            progress = op.get("progress") or []
            for message in progress[shown:]:
                step(str(message))
            shown = max(shown, len(progress))
            if op.get("status") == "success":
                return op.get("result")
            if op.get("status") not in (None, "running"):
                err = op.get("error") or {}
                raise RemoteError(str(err.get("message", "the operation failed")),
                                  exit_code_of(str(err.get("code", "failure"))))
            started = time.monotonic()
            op = self.call("GET", f"/1.0/operations/{op['id']}/wait",
                           params={"timeout": 2}, timeout=TIMEOUT)
            if time.monotonic() - started < 0.5 and op.get("status") == "running":
                time.sleep(0.5)  # a server answering at once: poll, do not spin

    def content(self, path: str, params: dict[str, Any] | None = None, *,
                method: str = "GET", timeout: float = TIMEOUT) -> bytes:
        """The raw body of ``METHOD path`` (a console log, a PEM, a backup); RemoteError for
        an error answer."""
        return self.response(method, path, params, timeout).content

    def download(self, path: str, params: dict[str, Any] | None, out: Any,
                 timeout: float = 3600.0) -> int:
        """Stream the body of ``GET path`` into the binary file ``out``; the bytes written.
        RemoteError for an error answer (nothing written)."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        written = 0
        with self._reaching(timeout), self.http.stream("GET", path, params=query,
                                                       timeout=timeout) as answer:
            if answer.status_code >= 400:
                answer.read()
                try:
                    data = answer.json()
                except ValueError:
                    data = None
                raise self._error(answer.status_code, data)
            for chunk in answer.iter_bytes(1 << 20):
                out.write(chunk)
                written += len(chunk)
        return written

    def response(self, method: str, path: str, params: dict[str, Any] | None = None,
                 timeout: float = TIMEOUT) -> httpx.Response:
        """The whole answer of ``METHOD path`` (body and headers), not read as JSON;
        RemoteError for an error answer."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        with self._reaching(timeout):
            answer = self.http.request(method, path, params=query, timeout=timeout)
        if answer.status_code >= 400:
            try:
                data = answer.json()
            except ValueError:
                data = None
            raise self._error(answer.status_code, data)
        return answer
