"""``popek serve`` (the REST API) and ``popek monitor`` (its events stream).

``serve`` checks its options, takes the CLI's command server over
(:func:`command_server`: the lock of its socket, a standalone server stopped)
and replaces this process with ``python -m popek.api`` (:mod:`popek.api.server`),
which listens on the command server's socket and starts the command server as
its worker when a command comes: one service, one long-lived process, for both
fronts.  The CLI never imports FastAPI.  ``monitor``
connects to the local socket's ``/1.0/events`` websocket and prints each
event, one line each (``--format json``: one JSON object a line).  Both run
in the ``popek`` process itself, never in the command server
(:data:`popek.cli.client.LOCAL_COMMANDS`).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import typer

from popek.errors import InvalidInput, PopekError

#: where ``popek serve`` listens unless ``--socket`` says otherwise (popek.api.server's)
DEFAULT_SOCKET = "/run/popek/api.sock"
#: the event types of ``monitor --type`` (popek.core.events.TYPES)
EVENT_TYPES = ("lifecycle", "operation", "audit")


def serve(
    socket: str = typer.Option(DEFAULT_SOCKET, "--socket",
                               help="The local Unix socket (root only, mode 0600)."),
    listen: str = typer.Option("", "--listen", metavar="HOST:PORT",
                               help="Also listen on TCP with TLS (bearer tokens); the "
                                    "certificate is made on first start and its SHA-256 "
                                    "fingerprint printed."),
) -> None:
    """Run the REST API (see README: the popek-api.service unit runs it at boot)."""
    if listen:
        host, sep, port = listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise InvalidInput(f"invalid --listen {listen!r}: use HOST:PORT, e.g. "
                               "0.0.0.0:8443, with a port from 1 to 65535")
    if not socket.startswith("/"):
        socket = os.path.abspath(socket)
    sys.stdout.flush()
    sys.stderr.flush()
    args = [sys.executable, "-m", "popek.api", "--socket", socket]
    if listen:
        args += ["--listen", listen]
    args += command_server()
    os.execv(sys.executable, args)


def command_server() -> list[str]:
    """Take the CLI's command server over for the API process; its options for it.

    The lock of the command server's socket is taken here (a standalone server
    that holds it is stopped) and kept across the ``exec``: the API process
    (:mod:`popek.api.cliserver`) runs the server as its child with it, and no
    client starts one of its own meanwhile.  None when the CLI uses no server
    (not root, ``POPEK_CLI_SERVER=off``) or another ``popek serve`` runs it.
    """
    from popek.cli import client, cmdserver

    if os.geteuid() != 0 or os.environ.get(client.ENV_SWITCH, "on") == "off":
        return []
    try:
        got = cmdserver.claim()
    except OSError as exc:
        print(f"popek: no command server for the CLI ({exc}): commands run in-process",
              file=sys.stderr, flush=True)
        return []
    if got.lock < 0:
        whose = f"popek serve pid {got.owner}'s" if got.owner else "another, busy one"
        print(f"popek: the CLI's command server on {got.path} is {whose}: this server runs "
              "none", file=sys.stderr, flush=True)
        return []
    if got.replaced:
        print(f"popek: took over the CLI's command server on {got.path} (stopped pid "
              f"{got.replaced})", file=sys.stderr, flush=True)
    os.set_inheritable(got.lock, True)
    return ["--cli-socket", got.path, "--cli-lock", str(got.lock)]


def describe(event: dict[str, Any]) -> str:
    """One line for a person: ``TIME TYPE what happened``."""
    kind = event.get("type", "?")
    if kind == "lifecycle":
        what = f"{event.get('project')}/{event.get('name')} {event.get('state')}"
    elif kind == "operation":
        op = event.get("operation", {})
        last = (op.get("progress") or [""])[-1]
        error = (op.get("error") or {}).get("message", "")
        what = (f"{op.get('id')} {op.get('op')} {op.get('target')} {op.get('status')}"
                + (f": {error}" if error else f" ({last})" if last else ""))
    elif kind == "audit":
        rec = event.get("record", {})
        what = (f"{rec.get('seq')} {rec.get('actor')} {rec.get('op')} {rec.get('target')} "
                f"{rec.get('result')}")
    else:
        what = json.dumps(event)
    return f"{event.get('time', '')} {kind} {what}"


def monitor(
    remote: str | None = typer.Argument(None, metavar="[REMOTE:]",
                                        help="A remote's events (lab:; its API's websocket); "
                                             "default: the default remote (popek remote "
                                             "switch), else this host's socket."),
    socket: str = typer.Option(DEFAULT_SOCKET, "--socket",
                               help="The local socket of popek serve (given: this host's, "
                                    "whatever the default remote)."),
    types: list[str] = typer.Option([], "--type", "-t",
                                    help="Only these events: lifecycle, operation, audit "
                                         "(repeat; default all)."),
    fmt: str = typer.Option("text", "--format", "-f",
                            help="text (one line an event) or json (one object a line)."),
) -> None:
    """Print popek's events as they happen (instances, operations, audit) until Ctrl-C.

    A token's holder sees its own project's events."""
    if fmt not in ("text", "json"):
        raise InvalidInput(f"invalid --format {fmt!r}; allowed: text, json")
    for t in types:
        if t not in EVENT_TYPES:
            raise InvalidInput(f"invalid --type {t!r}; allowed: {', '.join(EVENT_TYPES)}")
    from websockets.exceptions import ConnectionClosed, InvalidHandshake
    from websockets.sync.client import unix_connect

    from popek.cli import remotes

    # an explicit --socket is this host's server, unless a remote is named too
    on = (remotes.list_target(remote, "popek monitor")
          if remote is not None or socket == DEFAULT_SOCKET else None)
    if on is not None:
        from popek.cli import remoteterm

        conn = remoteterm.open_socket(on, "/1.0/events",
                                      {"types": ",".join(types) if types else None})
        socket = f"remote {on}"
    else:
        query = f"?types={','.join(types)}" if types else ""
        try:
            conn = unix_connect(socket, f"ws://localhost/1.0/events{query}")
        except (OSError, InvalidHandshake) as exc:
            raise PopekError(f"cannot reach popek serve on {socket}: {exc}; start it with "
                             "popek serve (or systemctl start popek-api)") from exc
    with conn:
        try:
            for message in conn:
                event = json.loads(message)
                if event.get("type") == "hello":
                    print(f"popek: watching events on {socket}", file=sys.stderr, flush=True)
                    continue
                print(json.dumps(event) if fmt == "json" else describe(event), flush=True)
        except ConnectionClosed:
            raise PopekError("popek serve closed the events stream (it stopped?)") from None
