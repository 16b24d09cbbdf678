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
from typing import IO

from popek.errors import EngineError


def attach(sock: Path, escape: bytes = b"\x1d") -> None:
    """Relay the caller's stdin/stdout to ``sock`` until ``escape`` is typed or it closes.

    Only one console session may be attached at a time.  A stdin that is not
    a terminal (a pipe, a file, ``/dev/null``) is sent whole, and then what the
    console writes keeps coming until it closes (the instance stops) or the
    caller ends the command.
    """
    s, lock = connect(sock)
    with lock, s:
        _relay(s, escape)


def connect(sock: Path) -> tuple[socket.socket, IO[str]]:
    """The console socket, connected, and its lock file, held (one session at a time)."""
    lock = open(sock.with_suffix(".lock"), "a")  # noqa: SIM115 - the caller closes it
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise EngineError("another console session is attached to this instance") from exc
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(sock))
        except OSError as exc:
            s.close()
            raise EngineError(f"cannot reach the console socket {sock}: {exc}") from exc
    except BaseException:
        lock.close()
        raise
    return s, lock


def _relay(s: socket.socket, escape: bytes) -> None:
    stdin = sys.stdin.fileno()
    stdout = sys.stdout.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_READ)
    try:
        try:
            sel.register(stdin, selectors.EVENT_READ)
        except (OSError, ValueError):  # a regular file or /dev/null: epoll refuses it
            if not _send_input(stdin, s, escape):
                return
        if saved is not None:
            tty.setraw(stdin)
        while True:
            for key, _ in sel.select():
                if key.fileobj is s:
                    data = s.recv(4096)
                    if not data:
                        return
                    os.write(stdout, data)
                    continue
                data = os.read(stdin, 4096)
                if not data:
                    if saved is not None:  # the terminal hung up
                        return
                    sel.unregister(stdin)  # the input ended: the output goes on
                    continue
                if escape in data:
                    with contextlib.suppress(OSError):
                        s.sendall(data[: data.index(escape)])
                    return
                s.sendall(data)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        sel.close()


def _send_input(stdin: int, s: socket.socket, escape: bytes) -> bool:
    """Send all of a stdin that cannot be polled; ``False`` when it held the escape byte."""
    while data := os.read(stdin, 65536):
        if escape in data:
            with contextlib.suppress(OSError):
                s.sendall(data[: data.index(escape)])
            return False
        s.sendall(data)
    return True
