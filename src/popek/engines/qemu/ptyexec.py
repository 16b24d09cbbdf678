"""A VM's interactive ``exec``: a terminal in the guest, relayed as a session or on ours.

The guest agent runs the command on a new pseudo-terminal of its own
(:func:`popek.engines.qemu.agent.open_pty`).  :func:`channel` gives a front
end that relays sessions itself (the API's websockets) the same
:class:`~popek.engines.session.Channel` a container's terminal gives: one
end of a socket pair that two threads join to the agent's session (keys in,
the screen out; a resize becomes the agent's WINCH).  :func:`on_terminal`
runs it on the caller's own terminal (``popek exec`` of a VM from a
terminal): raw mode, keys and window changes passed on, until the command
exits.
"""

from __future__ import annotations

import contextlib
import os
import select
import selectors
import signal
import socket
import termios
import threading
import tty
from typing import Any

from popek.engines.qemu.agent import AgentClient, PtySession, open_pty
from popek.engines.session import Channel
from popek.errors import PopekError

_READ = 1 << 16


def channel(client: AgentClient, argv: list[str], size: tuple[int, int]) -> Channel:
    """Start ``argv`` on a terminal in the guest; a channel for a front end to relay."""
    session = open_pty(client, argv, size)
    outer, inner = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    errors: list[BaseException] = []

    def screen() -> None:  # the guest's terminal -> the front end
        try:
            while (data := session.receive()) is not None:
                inner.sendall(data)
        except (PopekError, OSError) as exc:
            errors.append(exc)
        finally:
            with contextlib.suppress(OSError):
                inner.shutdown(socket.SHUT_WR)  # the front end reads the end

    def keys() -> None:  # the front end -> the guest's terminal
        try:
            while data := inner.recv(_READ):
                session.send(data)
        except (PopekError, OSError):
            pass  # the session is over: the screen thread says why

    threads = [threading.Thread(target=screen, name="vm-pty-out", daemon=True),
               threading.Thread(target=keys, name="vm-pty-in", daemon=True)]
    for t in threads:
        t.start()

    def finish() -> int | None:
        session.close()  # the command ends if it still runs; both threads then return
        with contextlib.suppress(OSError):
            inner.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join(5.0)
        inner.close()
        return session.exit_code

    outer.setblocking(False)
    fd = outer.detach()
    return Channel(fd, {1: fd}, tty=True, on_close=finish,
                   on_resize=lambda rows, cols: _resize(session, rows, cols))


def _resize(session: PtySession, rows: int, cols: int) -> None:
    with contextlib.suppress(PopekError):
        session.resize(rows, cols)


def _size(fd: int) -> tuple[int, int]:
    """The window size of the terminal ``fd``; 24x80 when it has none."""
    try:
        rows, cols = termios.tcgetwinsize(fd)
    except (OSError, termios.error):
        return 24, 80
    return (rows or 24), (cols or 80)


def on_terminal(client: AgentClient, argv: list[str], stdin: int = 0, stdout: int = 1) -> int:
    """Run ``argv`` on a terminal in the guest relayed to ours (raw) until it exits.

    Returns its exit code (255 when the session ended without one).
    """
    chan = channel(client, argv, _size(stdin))
    saved = termios.tcgetattr(stdin)
    old_winch: Any = None
    sel = selectors.DefaultSelector()
    try:
        old_winch = signal.signal(signal.SIGWINCH,
                                  lambda *_: chan.resize(*_size(stdin)))
        tty.setraw(stdin)
        out = chan.outputs[1]
        sel.register(out, selectors.EVENT_READ)
        sel.register(stdin, selectors.EVENT_READ)
        while True:
            for key, _ in sel.select():
                if key.fd == out:
                    try:
                        data = os.read(out, _READ)
                    except BlockingIOError:
                        continue
                    if not data:
                        return _code(chan)
                    _write_all(stdout, data)
                    continue
                data = os.read(stdin, _READ)
                if not data:  # our terminal hung up
                    return _code(chan)
                _write_all(out, data)
    finally:
        termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        if old_winch is not None:
            signal.signal(signal.SIGWINCH, old_winch)
        sel.close()
        chan.close()


def _code(chan: Channel) -> int:
    code = chan.close()
    return 255 if code is None else code


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [])
