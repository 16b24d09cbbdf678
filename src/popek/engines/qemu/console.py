"""Attaching a terminal to an instance's serial console socket."""

from __future__ import annotations

import contextlib
import fcntl
import os
import selectors
import socket
import sys
import termios
import tty
from pathlib import Path

from popek.errors import EngineError


def attach(sock: Path, escape: bytes = b"\x1d") -> None:
    """Relay the caller's stdin/stdout to ``sock`` until ``escape`` is typed or it closes.

    Only one console session may be attached at a time.
    """
    with open(sock.with_suffix(".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise EngineError("another console session is attached to this instance") from exc
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(sock))
            except OSError as exc:
                raise EngineError(f"cannot reach the console socket {sock}: {exc}") from exc
            _relay(s, escape)


def _relay(s: socket.socket, escape: bytes) -> None:
    stdin = sys.stdin.fileno()
    stdout = sys.stdout.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    sel = selectors.DefaultSelector()
    sel.register(stdin, selectors.EVENT_READ)
    sel.register(s, selectors.EVENT_READ)
    try:
        if saved is not None:
            tty.setraw(stdin)
        while True:
            for key, _ in sel.select():
                if key.fileobj is s:
                    data = s.recv(4096)
                    if not data:
                        return
                    os.write(stdout, data)
                else:
                    data = os.read(stdin, 4096)
                    if not data:
                        return
                    if escape in data:
                        with contextlib.suppress(OSError):
                            s.sendall(data[: data.index(escape)])
                        return
                    s.sendall(data)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        sel.close()
