"""``popek serve``: the REST API on root's Unix socket and, when asked, on TCP with TLS.

The CLI's ``popek serve`` checks its options and replaces itself with
``python -m popek.api`` (this module's :func:`main`), so that the CLI never
imports FastAPI.  The server:

1. marks failed the operations an earlier server left running
   (:meth:`popek.api.runner.Runner.start`);
2. binds the Unix socket (default :data:`DEFAULT_SOCKET`, mode 0600: root
   only; a socket left by a dead server is replaced, a live one is refused);
3. with ``--listen HOST:PORT``, makes the TLS key and self-signed certificate
   on first start (:mod:`popek.api.tls`) and prints its SHA-256 fingerprint;
   the listener asks clients for a TLS certificate (optional: bearer tokens
   work without one) and hands it to the application;
4. serves both with uvicorn in one event loop, each with its application
   (:func:`popek.api.app.create_app`: the local one needs no token) over one
   runner, until SIGTERM or SIGINT;
5. listens on the CLI's command server socket when ``popek serve`` took it
   over (``--cli-socket``, ``--cli-lock``: :mod:`popek.api.cliserver`), starts
   the command server as its worker when a command comes, and stops it when it
   stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from popek.api.cliserver import CommandServer
from popek.errors import AlreadyExists, InvalidInput, PopekError

DEFAULT_SOCKET = "/run/popek/api.sock"
#: how long a stopping server lets open requests finish (seconds)
GRACE_S = 5
#: uvicorn's websocket protocol
WS = "websockets-sansio"


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8443`` for IPv6) -> ``(host, port)``; InvalidInput otherwise."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InvalidInput(f"invalid --listen {text!r}: use HOST:PORT, e.g. 0.0.0.0:8443, "
                           "with a port from 1 to 65535")
    return host, int(port)


def bind_unix(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600.

    A socket file nobody listens on (a server killed) is replaced; one a server
    answers on is refused (:class:`AlreadyExists`).
    """
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise InvalidInput(f"--socket {path}: a file that is not a socket is there; "
                               "choose another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
        else:
            raise AlreadyExists(f"a server already listens on {path}: stop it first "
                                "(systemctl stop popek-api) or choose another --socket")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


def _uvicorn_server(app: Any, **options: Any) -> Any:
    """A uvicorn server for ``app`` that leaves signals to :func:`serve`."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=GRACE_S, **{"ws": WS, **options})
    return Server(config)


def _tcp_server(app: Any, tcp: tuple[str, int], listen: str) -> Any:
    """The TLS listener on ``tcp``: the server's certificate (made on first start), client
    certificates asked for and handed to the application (:mod:`popek.api.tls`); tokens
    only, with a warning, where this Python cannot take self-signed client certificates."""
    from popek.api.tls import (
        ClientCertificatesUnavailable,
        ensure_certificate,
        fingerprint,
        uvicorn_options,
    )

    cert, key = ensure_certificate()
    try:
        options = uvicorn_options(cert, key, WS)
    except ClientCertificatesUnavailable as exc:
        print(f"popek: warning: client certificates are off on TCP ({exc}): bearer tokens "
              "only", file=sys.stderr, flush=True)
        options = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    server = _uvicorn_server(app, host=tcp[0], port=tcp[1], **options)
    print(f"popek: API listening on https://{listen} (certificate SHA-256 "
          f"{fingerprint(cert)})", flush=True)
    return server


def serve(socket_path: str = DEFAULT_SOCKET, listen: str = "",
          cli: CommandServer | None = None) -> int:
    """Run the API until SIGTERM or SIGINT; return the exit code.

    ``cli``: the CLI's command server, run as this server's child while it serves
    (:mod:`popek.api.cliserver`).
    """
    from popek import proc
    from popek.api.app import create_app
    from popek.api.runner import Runner

    tcp = parse_listen(listen) if listen else None
    proc.keep_pidfds()  # every listing asks about every instance's process: see proc.alive
    runner = Runner()
    orphans = runner.start()
    if orphans:
        print(f"popek: {len(orphans)} operation(s) of an earlier server marked failed",
              file=sys.stderr, flush=True)
    path = Path(socket_path)
    sock = bind_unix(path)
    servers = [_uvicorn_server(create_app(runner, local=True))]
    print(f"popek: API listening on unix:{path}", flush=True)
    if tcp is not None:
        servers.append(_tcp_server(create_app(runner, local=False), tcp, listen))

    def stop(signum: int, frame: object) -> None:
        for s in servers:
            s.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)

    async def run_all() -> None:
        tasks = [servers[0].serve(sockets=[sock])] + [s.serve() for s in servers[1:]]
        await asyncio.gather(*tasks)

    if cli is not None:
        cli.start()
    try:
        asyncio.run(run_all())
    finally:
        if cli is not None:
            cli.stop()
        with contextlib.suppress(OSError):
            if path.is_socket():
                path.unlink()
        with contextlib.suppress(PopekError):
            runner.stop()  # what still runs will not finish: say so now
    return 0 if all(s.started for s in servers) else 1


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m popek.api [--socket PATH] [--listen HOST:PORT]``."""
    parser = argparse.ArgumentParser(prog="popek serve",
                                     description="Run popek's REST API.")
    parser.add_argument("--socket", default=DEFAULT_SOCKET,
                        help=f"the local Unix socket (default {DEFAULT_SOCKET}, root only)")
    parser.add_argument("--listen", default="",
                        help="also listen on HOST:PORT with TLS (bearer tokens or "
                             "client certificates)")
    parser.add_argument("--cli-socket", default="", help=argparse.SUPPRESS)
    parser.add_argument("--cli-lock", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="popek: %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        # popek serve took the CLI's command server over (popek.cli.serve.command_server)
        cli = CommandServer(args.cli_socket, args.cli_lock) if args.cli_lock >= 0 else None
        code = serve(args.socket, args.listen, cli)
    except PopekError as exc:
        print(f"popek: {exc}", file=sys.stderr, flush=True)
        code = exc.exit_code
    except OSError as exc:
        print(f"popek: cannot serve: {exc}", file=sys.stderr, flush=True)
        code = 1
    sys.exit(code)
