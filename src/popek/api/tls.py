"""The server's TLS identity: a key and a self-signed certificate made on first start.

Kept under ``$POPEK_HOME/api/`` (``server.key`` 0600, ``server.crt``); clients
pin the certificate by its SHA-256 fingerprint (:func:`fingerprint`), as
incus's ``remote add`` does, rather than trusting a certificate authority.

Client certificates, as incus takes them: the TCP listener asks every client
for one (:func:`server_context`), optional so that token clients still
connect, and accepts whatever certificate the client presents at the TLS
layer: a client's certificate is self-signed, which OpenSSL's chain check
would refuse, and Python's ``ssl`` has no way to say "ask, but do not check
the chain".  :func:`accept_any_client_certificate` sets OpenSSL's verify
callback to one that accepts (through ``ctypes``, on the very ``SSL_CTX`` of
the context, checked to be it before anything is changed).  The handshake
still proves that the client holds the certificate's private key
(CertificateVerify); whether the certificate is trusted, revoked or valid now
is the application's decision, by its SHA-256 fingerprint
(:mod:`popek.core.certificates`), so that a refusal is an HTTP ``401`` with
the error body and an audit record rather than a TLS alert.

The certificate reaches the application in the ASGI scope: uvicorn builds each
request's ``scope["state"]`` from its connection protocol's ``app_state``, so
:func:`peer_certificate_protocol` makes subclasses of uvicorn's HTTP and
websocket protocols that put the DER certificate of the connection's TLS
handshake there (:data:`PEER_CERTIFICATE`) when the connection is made; a
websocket upgrade inherits the HTTP connection's state.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import socket
import ssl
from pathlib import Path
from typing import Any

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
    from popek.core.certificates import self_signed

    host = socket.gethostname()
    pem_cert, pem_key = self_signed(f"popek@{host}", VALID_DAYS, (host, "localhost"))
    _write(key_path, pem_key, 0o600)
    _write(cert_path, pem_cert, 0o644)
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


#: the key of ``scope["state"]`` holding the DER certificate a TLS client presented (or None)
PEER_CERTIFICATE = "popek.peer_certificate"
#: OpenSSL's SSL_VERIFY_PEER (ask for a certificate; no FAIL_IF_NO_PEER_CERT: optional)
_SSL_VERIFY_PEER = 1
_VERIFY_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


def _accept(preverify_ok: int, store_ctx: int | None) -> int:
    return 1


#: kept for the life of the process: OpenSSL calls it during every handshake
_ACCEPT = _VERIFY_CALLBACK(_accept)


class ClientCertificatesUnavailable(RuntimeError):
    """This Python's ``ssl`` module cannot be told to accept self-signed client certificates."""


def _libssl() -> ctypes.CDLL:
    """The libssl that Python's ``_ssl`` module is linked with (its symbols, through it)."""
    import importlib

    lib = ctypes.CDLL(importlib.import_module("_ssl").__file__)
    lib.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_verify_mode.restype = ctypes.c_int
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_set_verify.argtypes = [ctypes.c_void_p, ctypes.c_int, _VERIFY_CALLBACK]
    lib.SSL_CTX_set_verify.restype = None
    return lib


def _ssl_ctx_pointer(ctx: ssl.SSLContext, lib: ctypes.CDLL) -> int:
    """The ``SSL_CTX *`` of ``ctx``: CPython's ``PySSLContext`` holds it right after the
    object header.  Checked against what OpenSSL says of it (its verify mode and options,
    set to values this function chooses) before it is trusted."""
    pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not pointer:
        raise ClientCertificatesUnavailable("no SSL_CTX found in the SSL context")
    for mode in (ssl.CERT_NONE, ssl.CERT_OPTIONAL):
        ctx.verify_mode = mode
        if lib.SSL_CTX_get_verify_mode(pointer) != int(mode):
            raise ClientCertificatesUnavailable("the SSL context's layout is not CPython's")
    if lib.SSL_CTX_get_options(pointer) != int(ctx.options):
        raise ClientCertificatesUnavailable("the SSL context's layout is not CPython's")
    return int(pointer)


def accept_any_client_certificate(ctx: ssl.SSLContext) -> None:
    """Make the server context ``ctx`` ask each client for a certificate (optional) and
    accept any one at the TLS layer (see this module's docstring); the application checks
    it.  :class:`ClientCertificatesUnavailable` when this Python's ``ssl`` is not CPython's
    over OpenSSL (``ctx`` then asks for none)."""
    try:
        lib = _libssl()
        pointer = _ssl_ctx_pointer(ctx, lib)
    except (OSError, AttributeError) as exc:
        ctx.verify_mode = ssl.CERT_NONE
        raise ClientCertificatesUnavailable(f"libssl not reachable: {exc}") from exc
    except ClientCertificatesUnavailable:
        ctx.verify_mode = ssl.CERT_NONE
        raise
    # last: setting ctx.verify_mode again would reset the callback
    lib.SSL_CTX_set_verify(pointer, _SSL_VERIFY_PEER, _ACCEPT)


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The TLS context of the TCP listener: the server's certificate, TLS 1.2 or later, a
    client certificate asked for and taken as presented (see
    :func:`accept_any_client_certificate`, whose error it raises)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    accept_any_client_certificate(ctx)
    return ctx


def peer_der(transport: Any) -> bytes | None:
    """The DER certificate the client of ``transport`` presented in its TLS handshake."""
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    try:
        der = ssl_object.getpeercert(binary_form=True)
    except (ValueError, ssl.SSLError):  # the handshake is not over: none yet
        return None
    return bytes(der) if der else None


def peer_certificate_protocol(base: type[Any]) -> type[Any]:
    """A subclass of uvicorn's protocol ``base`` whose requests carry the client's
    certificate in ``scope["state"][PEER_CERTIFICATE]`` (``None`` when it sent none)."""

    class PeerCertificateProtocol(base):  # type: ignore[misc]
        def connection_made(self, transport: Any) -> None:
            # a copy per connection: uvicorn's app_state is shared by every connection
            shared: dict[str, Any] = getattr(self, "app_state", {})
            self.app_state = {**shared, PEER_CERTIFICATE: peer_der(transport)}
            super().connection_made(transport)

    PeerCertificateProtocol.__name__ = f"PeerCertificate{base.__name__}"
    PeerCertificateProtocol.__qualname__ = PeerCertificateProtocol.__name__
    return PeerCertificateProtocol


def uvicorn_options(cert: Path, key: Path, ws: str) -> dict[str, Any]:
    """The options of uvicorn's TCP server with client certificates: the SSL context and
    the protocols (uvicorn's own ``http`` default and ``ws``) that hand the certificate to
    the application.  Raises :class:`ClientCertificatesUnavailable`."""
    from uvicorn.config import HTTP_PROTOCOLS, WS_PROTOCOLS
    from uvicorn.importer import import_from_string

    ctx = server_context(cert, key)
    http_cls = import_from_string(HTTP_PROTOCOLS["auto"])
    ws_cls = import_from_string(WS_PROTOCOLS[ws])
    return {"ssl_context_factory": lambda config, default: ctx,
            "http": peer_certificate_protocol(http_cls), "ws": peer_certificate_protocol(ws_cls)}
