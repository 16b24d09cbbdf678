"""``popek console REMOTE:NAME`` and ``popek exec -t REMOTE:NAME``: the API's websockets.

Imported only when a command names a remote.  The websocket
(:mod:`popek.api.sessions`) is opened with the remote's token over its pinned
TLS (or its ``unix://`` socket); a refusal before the upgrade (403 without the
console grant, 404, 409) ends the command with the same line and exit code as
every remote command (:class:`popek.cli.remoteclient.RemoteError`).  This
terminal is put in raw mode and relayed: what is typed goes in, the output
comes out, a window resize is sent on, and Ctrl-] detaches from a console
(the instance runs on).  An exec ends with the command's exit code.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import sys
import termios
import threading
import tty
from typing import Any
from urllib.parse import urlencode, urlsplit

from popek import errors
from popek.cli import remotes
from popek.cli.remoteclient import Client, RemoteError, pinned_context

#: the byte that detaches from a console (Ctrl-]), as locally
ESCAPE = b"\x1d"
#: seconds to open the websocket
OPEN_TIMEOUT = 30.0


def _size() -> dict[str, int]:
    """This terminal's rows and columns (none when stdout is not a terminal)."""
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
    except OSError:
        return {}
    return {"rows": size.lines, "cols": size.columns} if size.lines and size.columns else {}


def open_socket(remote_name: str, path: str, query: dict[str, Any]) -> Any:
    """The websocket ``path`` of remote ``remote_name``; RemoteError when refused."""
    from websockets.exceptions import InvalidHandshake, InvalidStatus
    from websockets.sync.client import connect, unix_connect

    from popek.cli import ops

    remote = remotes.get(remote_name)
    ops.REMOTES.append(remote_name)  # the remote audits the session
    q = urlencode({k: v for k, v in query.items() if v is not None}, doseq=True)
    headers = {"Authorization": f"Bearer {remote.token}"} if remote.token else {}
    try:
        if remote.url.startswith("unix://"):
            return unix_connect(remote.url[len("unix://"):], f"ws://popek{path}?{q}",
                                additional_headers=headers, open_timeout=OPEN_TIMEOUT)
        Client(remote)  # the same checks of the remote's record as every other command
        base = urlsplit(remote.url)
        return connect(f"wss://{base.netloc}{path}?{q}", ssl=pinned_context(remote),
                       additional_headers=headers, open_timeout=OPEN_TIMEOUT)
    except InvalidStatus as exc:
        try:
            data = json.loads(exc.response.body or b"null")
        except ValueError:
            data = None
        raise Client(remote)._error(exc.response.status_code, data) from exc
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        raise RemoteError(f"cannot reach remote {remote.name} at {remote.url}: {exc}") from exc


def console(remote_name: str, name: str, project: str | None) -> None:
    """Attach to the console of ``name`` on the remote until Ctrl-] (or it closes)."""
    ws = open_socket(remote_name, f"/1.0/instances/{name}/console",
                     {"project": project, **_size()})
    if sys.stdin.isatty():
        print(f"Attached to {remote_name}:{name}'s console; press Ctrl-] to detach.",
              file=sys.stderr)
    final = relay(ws, prefixed=False, escape=ESCAPE)
    _raise_error(final)
    print("\nDetached.", file=sys.stderr)


def exec_tty(remote_name: str, name: str, command: list[str], tty_wanted: bool,
             project: str | None) -> int:
    """Run ``command`` in ``name`` on the remote, on this terminal; its exit code."""
    ws = open_socket(remote_name, f"/1.0/instances/{name}/exec",
                     {"project": project, "command": command,
                      "tty": "true" if tty_wanted else "false", **_size()})
    final = relay(ws, prefixed=True, escape=None)
    _raise_error(final)
    if final.get("type") != "exit":
        raise RemoteError(f"the session with {remote_name}:{name} ended without an exit code")
    return int(final.get("exit_code", errors.FAILURE))


def _raise_error(final: dict[str, Any]) -> None:
    if final.get("type") == "error":
        from popek.cli.remoteclient import exit_code_of

        err = final.get("error") or {}
        raise RemoteError(str(err.get("message", "the session failed")),
                          exit_code_of(str(err.get("code", "failure"))))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def relay(ws: Any, prefixed: bool, escape: bytes | None) -> dict[str, Any]:
    """Relay this process's stdio and ``ws`` until the session ends; its last control message.

    ``prefixed``: output frames start with their stream (exec); ``escape``: the
    byte that detaches (a console).  The end of a stdin that is not a terminal
    is sent on as end of input (exec).
    """
    from websockets.exceptions import ConnectionClosed

    final: dict[str, Any] = {}
    wake_r, wake_w = os.pipe()

    def output() -> None:
        try:
            for msg in ws:
                if isinstance(msg, str):
                    with contextlib.suppress(ValueError):
                        final.update(json.loads(msg))
                    continue
                stream, data = (msg[0], msg[1:]) if prefixed else (1, msg)
                _write_all(2 if stream == 2 else 1, data)
        except (ConnectionClosed, OSError):
            pass
        finally:
            os.write(wake_w, b"x")

    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    old_winch = None
    sel = selectors.DefaultSelector()
    reader = threading.Thread(target=output, name="output", daemon=True)
    reader.start()
    try:
        sel.register(wake_r, selectors.EVENT_READ)
        try:
            sel.register(stdin, selectors.EVENT_READ)
        except (OSError, ValueError):  # a regular file or /dev/null: epoll refuses it
            if _send_file(ws, stdin, escape, prefixed):
                return _detach(ws, reader, final)
        if saved is not None:
            tty.setraw(stdin)

            def winch(signum: int, frame: object) -> None:
                with contextlib.suppress(Exception):
                    ws.send(json.dumps({"type": "resize", **_size()}))

            old_winch = signal.signal(signal.SIGWINCH, winch)
        while True:
            for key, _ in sel.select():
                if key.fileobj == wake_r:
                    reader.join(5)
                    return final
                data = os.read(stdin, 4096)
                if not data:
                    sel.unregister(stdin)
                    if saved is not None and escape is not None:
                        return _detach(ws, reader, final)  # the terminal hung up
                    if prefixed:
                        ws.send(json.dumps({"type": "eof"}))
                    continue
                if escape is not None and escape in data:
                    if data.index(escape):
                        ws.send(data[: data.index(escape)])
                    return _detach(ws, reader, final)
                ws.send(data)
    except ConnectionClosed:
        reader.join(5)
        return final
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        if old_winch is not None:
            signal.signal(signal.SIGWINCH, old_winch)
        sel.close()
        ws.close()
        os.close(wake_r)
        os.close(wake_w)


def _detach(ws: Any, reader: threading.Thread, final: dict[str, Any]) -> dict[str, Any]:
    with contextlib.suppress(Exception):
        ws.send(json.dumps({"type": "detach"}))
    reader.join(5)
    return final


def _send_file(ws: Any, stdin: int, escape: bytes | None, prefixed: bool) -> bool:
    """Send all of a stdin that cannot be polled; ``True`` when it held the escape byte."""
    while data := os.read(stdin, 65536):
        if escape is not None and escape in data:
            if data.index(escape):
                ws.send(data[: data.index(escape)])
            return True
        ws.send(data)
    if prefixed:
        ws.send(json.dumps({"type": "eof"}))
    return False
