"""Sessions a front end relays itself: a console or a command, as file descriptors.

The CLI's console and exec use the caller's own terminal (stdio).  A server
(the API's websockets) has none: it asks the engine for a :class:`Channel`
instead, reads the output descriptors, writes the input one, passes a window
size on and, at the end, closes it and gets the exit code.

- :func:`pty_process`: a command with a new host pseudo-terminal as its
  stdio (``runc exec --tty`` relays that to the container's own terminal and
  resizes it on ``SIGWINCH``);
- :func:`pipe_process`: a command with pipes (stdout and stderr apart);
- :func:`socket_channel`: a connected socket (a VM's serial console).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import struct
import subprocess
import termios
import tty
from collections.abc import Callable

#: how long a closed session's command has to end after SIGHUP, then SIGKILL
CLOSE_GRACE_S = 5.0
#: the window size when none is given
DEFAULT_SIZE = (24, 80)


class Channel:
    """One session's descriptors: ``input`` (``None``: none taken) and ``outputs``.

    ``outputs`` maps the stream (1: stdout, 2: stderr) to a readable
    descriptor; a terminal has one, stream 1, the same descriptor as ``input``.
    """

    def __init__(self, input_fd: int | None, outputs: dict[int, int], *,
                 tty: bool = False, proc: subprocess.Popen[bytes] | None = None,
                 on_close: Callable[[], int | None] | None = None,
                 on_resize: Callable[[int, int], None] | None = None,
                 keep: object = None) -> None:
        """A session over these descriptors; ``proc`` the command, ``on_close`` the rest.

        ``on_resize``: how a terminal that is not a local pseudo-terminal (a
        VM's, behind its guest agent) takes a new window size.
        """
        self.input = input_fd
        self.outputs = outputs
        self.tty = tty
        self.proc = proc
        self._on_close = on_close
        self._on_resize = on_resize
        self._keep = keep  # a socket or lock file that must live as long as the session
        self._closed = False
        self.exit_code: int | None = None

    def resize(self, rows: int, cols: int) -> None:
        """Set the terminal's window size (a session without a terminal ignores it)."""
        if not self.tty or self.input is None or self._closed:
            return
        if self._on_resize is not None:
            self._on_resize(rows, cols)
            return
        set_size(self.input, rows, cols)
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGWINCH)

    def close_input(self) -> None:
        """End the input: ``^D`` on a terminal, the pipe closed otherwise."""
        if self.input is None or self._closed:
            return
        if self.tty:
            with contextlib.suppress(OSError):
                os.write(self.input, b"\x04")
        elif self.input not in self.outputs.values():
            with contextlib.suppress(OSError):
                os.close(self.input)
            self.input = None

    def close(self) -> int | None:
        """End the session (its command hung up when still running); the exit code."""
        if self._closed:
            return self.exit_code
        self._closed = True
        if self.proc is not None:
            self.exit_code = _end(self.proc)
        if self._on_close is not None:
            code = self._on_close()
            self.exit_code = code if self.exit_code is None else self.exit_code
        fds = {*self.outputs.values(), *(() if self.input is None else (self.input,))}
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        close = getattr(self._keep, "close", None)
        if close is not None:
            with contextlib.suppress(OSError):
                close()
        return self.exit_code


def _end(proc: subprocess.Popen[bytes]) -> int:
    """Reap ``proc``: SIGHUP when it runs (an OCI runtime passes it on), SIGKILL if it stays."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGHUP)
        try:
            proc.wait(CLOSE_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def set_size(fd: int, rows: int, cols: int) -> None:
    """Set the window size of the terminal ``fd``."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def pty_process(argv: list[str], size: tuple[int, int] = DEFAULT_SIZE) -> Channel:
    """Run ``argv`` on a new pseudo-terminal of ``size`` (rows, columns)."""
    master, slave = os.openpty()
    try:
        set_size(slave, *size)
        tty.setraw(slave)  # the bytes go through as they are: the guest's terminal cooks them
        proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                start_new_session=True, close_fds=True)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    os.set_blocking(master, False)
    return Channel(master, {1: master}, tty=True, proc=proc)


def pipe_process(argv: list[str]) -> Channel:
    """Run ``argv`` with pipes: its stdin, stdout and stderr apart."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    fds = [os.dup(f.fileno()) for f in (proc.stdin, proc.stdout, proc.stderr)]
    for f in (proc.stdin, proc.stdout, proc.stderr):
        f.close()
    for fd in fds:
        os.set_blocking(fd, False)
    return Channel(fds[0], {1: fds[1], 2: fds[2]}, proc=proc)


def socket_channel(sock: socket.socket, keep: object = None) -> Channel:
    """A connected stream socket as a session (a console: no exit code)."""
    sock.setblocking(False)
    fd = sock.fileno()
    return Channel(fd, {1: fd}, keep=_SocketKeeper(sock, keep))


class _SocketKeeper:
    """Closes the socket (its descriptor is the channel's) and what else was kept."""

    def __init__(self, sock: socket.socket, other: object) -> None:
        self.sock, self.other = sock, other

    def close(self) -> None:
        self.sock.detach()  # the channel closed the descriptor itself
        close = getattr(self.other, "close", None)
        if close is not None:
            close()
