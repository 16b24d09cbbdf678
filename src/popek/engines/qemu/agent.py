"""The host side of the guest agent protocol (virtio-serial port ``org.popek.agent.0``).

One ASCII line per message; binary payloads are base64 without wraps, ``-``
stands for empty::

    host  -> guest   PING <id>
    guest -> host    PONG <id>
    host  -> guest   EXEC <id> <b64 command> <b64 stdin>
    guest -> host    OUT <id> <b64 chunk>      stdout, any number of them
    guest -> host    ERR <id> <b64 chunk>      stderr, any number of them
    guest -> host    EXIT <id> <exit code>     the last answer
    guest -> host    ERROR <id> <reason>
    host  -> guest   PTY <id> <b64 command> <rows> <cols>   on a new terminal
    guest -> host    STARTED <id>               then OUT lines and EXIT, as EXEC
    host  -> guest   IN <id> <b64 keys>         (after STARTED, any number)
    host  -> guest   WINCH <id> <rows> <cols>

(An agent of an image built before output was streamed answers one
``RESULT <id> <exit code> <b64 stdout> <b64 stderr>`` line instead; it is
accepted while it fits in :data:`MAX_LINE`.)

Everything the guest sends is hostile input.  Replies are parsed as a
stream: a line longer than :data:`MAX_LINE` bytes is refused as soon as that
many bytes came without a newline (the buffer never holds more), each search
for the newline looks only at the bytes that arrived since the last one, a
request has a deadline that covers the whole reply, and the output collected
for :meth:`AgentClient.exec` is capped at :data:`MAX_OUTPUT`;
:meth:`AgentClient.exec_stream` writes the output to the caller's
descriptors as it arrives and keeps none of it.

The guest serves one request at a time; an exclusive lock file serialises
host clients.  Lines with another id (an answer to a request whose client
went away, the newline an idle agent sends when a client connects) are
skipped.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import os
import secrets
import shlex
import socket
import time
from collections.abc import Callable
from pathlib import Path

from popek.engines.base import ExecResult
from popek.errors import AgentError, EngineError, InvalidInput

#: the longest line accepted from the guest: an OUT/ERR chunk is 64 KiB of base64
MAX_LINE = 1 << 20
#: stdout plus stderr kept in memory by :meth:`AgentClient.exec` (a streamed exec keeps none)
MAX_OUTPUT = 16 << 20
#: stdin sent with a command (it travels in the request line; the guest takes 8 MiB lines)
MAX_STDIN = 4 << 20
#: how long a streamed exec may wait for the lock and the first answer of the agent
STREAM_START_TIMEOUT = 60.0
_RECV = 1 << 16
#: keys sent in one IN line of a terminal session
PTY_CHUNK = 48 << 10


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data) if data else b"-"


def _unb64(field: bytes) -> bytes:
    try:
        return b"" if field == b"-" else base64.b64decode(field, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AgentError(f"malformed agent answer: bad base64 ({exc})") from exc


class Late(AgentError):
    """The guest agent did not answer before the deadline."""


class LineReader:
    """Lines from a socket, each at most ``max_line`` bytes, all before a deadline.

    ``deadline`` is a :func:`time.monotonic` time, or ``None`` for no limit.
    """

    def __init__(self, sock: socket.socket, max_line: int = MAX_LINE,
                 deadline: float | None = None) -> None:
        """Read from the connected ``sock``."""
        self.sock = sock
        self.max_line = max_line
        self.deadline = deadline
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already known to hold no newline

    def readline(self) -> bytes:
        """Return the next line without its newline.

        Raises :class:`AgentError` when the line grows past ``max_line``,
        the deadline passes or the channel closes; :class:`TimeoutError` is
        never raised.
        """
        while True:
            nl = self._buf.find(b"\n", self._scanned)
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[:nl + 1]
                self._scanned = 0
                return line
            self._scanned = len(self._buf)
            if len(self._buf) > self.max_line:
                raise AgentError(f"the guest agent sent a line longer than {self.max_line} "
                                 "bytes; the answer was refused")
            if self.deadline is None:
                self.sock.settimeout(None)
            else:
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    raise Late("the guest agent did not answer in time")
                self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(min(_RECV, self.max_line + 1 - len(self._buf)))
            except TimeoutError as exc:
                raise Late("the guest agent did not answer in time") from exc
            if not chunk:
                raise AgentError("the guest agent closed the channel")
            self._buf += chunk


class AgentClient:
    """A short session with the guest agent listening behind ``sock``."""

    def __init__(self, sock: Path, timeout: float) -> None:
        """Prepare a session; nothing is connected until a request is made."""
        self.sock = sock
        self.timeout = timeout

    def _session(self, request: bytes, rid: bytes, deadline: float,
                 answer: Callable[[list[bytes]], bool], reply_deadline: float | None) -> None:
        """Send ``request`` and give each answer line for ``rid`` to ``answer`` until it is done.

        The lock and the connection must be had before ``deadline``; the
        answers must all come before ``reply_deadline`` (``None``: no limit).
        """
        with open(self.sock.with_suffix(".lock"), "a") as lock:
            self._lock(lock.fileno(), deadline)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.settimeout(max(deadline - time.monotonic(), 0.001))
                    s.connect(str(self.sock))
                    s.sendall(request)
                except TimeoutError as exc:
                    raise Late("the guest agent did not answer in time") from exc
                except OSError as exc:
                    raise AgentError(f"cannot reach the guest agent at {self.sock}: "
                                     f"{exc.strerror or exc}") from exc
                reader = LineReader(s, MAX_LINE, reply_deadline)
                while True:
                    try:
                        line = reader.readline()
                    except OSError as exc:
                        raise AgentError(f"the guest agent channel failed: "
                                         f"{exc.strerror or exc}") from exc
                    fields = line.strip().split(b" ")
                    if len(fields) >= 2 and fields[1] == rid and answer(fields):
                        return

    def _lock(self, fd: int, deadline: float) -> None:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise AgentError("another exec session is using the guest agent; "
                                     "try again when it is done") from None
                time.sleep(0.05)

    def ping(self) -> None:
        """Check that the agent answers; raise :class:`AgentError` otherwise."""
        rid = secrets.token_hex(8).encode()
        deadline = time.monotonic() + self.timeout

        def pong(fields: list[bytes]) -> bool:
            if fields[0] != b"PONG":
                raise AgentError(f"unexpected agent answer {fields[0][:40]!r} to PING")
            return True

        self._session(b"PING " + rid + b"\n", rid, deadline, pong, deadline)

    @staticmethod
    def _exec_request(rid: bytes, argv: list[str], stdin: bytes) -> bytes:
        if len(stdin) > MAX_STDIN:
            raise InvalidInput(f"the input of a command run in a VM is at most {MAX_STDIN >> 20} "
                               f"MiB; {len(stdin)} bytes were given")
        command = shlex.join(argv).encode()
        return b" ".join([b"EXEC", rid, _b64(command), _b64(stdin)]) + b"\n"

    def _run(self, argv: list[str], stdin: bytes, out: Callable[[int, bytes], None],
             deadline: float, reply_deadline: float | None) -> int:
        """Run ``argv``; give each output chunk to ``out(fd, data)``; return the exit code."""
        rid = secrets.token_hex(8).encode()
        request = self._exec_request(rid, argv, stdin)
        code: list[int] = []

        def answer(fields: list[bytes]) -> bool:
            verb = fields[0]
            if verb in (b"OUT", b"ERR") and len(fields) == 3:
                out(1 if verb == b"OUT" else 2, _unb64(fields[2]))
                return False
            if verb == b"EXIT" and len(fields) == 3 and fields[2].isdigit() \
                    and len(fields[2]) <= 3:
                code.append(int(fields[2]))
                return True
            if verb == b"RESULT" and len(fields) == 5 and fields[2].isdigit() \
                    and len(fields[2]) <= 3:
                out(1, _unb64(fields[3]))
                out(2, _unb64(fields[4]))
                code.append(int(fields[2]))
                return True
            if verb == b"ERROR":
                reason = b" ".join(fields[2:])[:80].decode("ascii", "replace")
                raise AgentError(f"the guest agent refused the command: {reason}")
            raise AgentError(f"malformed agent answer: {b' '.join(fields)[:80]!r}")

        try:
            self._session(request, rid, deadline, answer, reply_deadline)
        except Late as exc:
            raise AgentError(f"the command did not finish within {self.timeout:.0f}s "
                             "(the guest agent ends it)") from exc
        return code[0]

    def exec(self, argv: list[str], stdin: bytes = b"") -> ExecResult:
        """Run ``argv`` in the guest (through ``sh -c``) and return its whole result.

        At most :data:`MAX_OUTPUT` bytes of output are kept; more is an
        :class:`AgentError` (use :meth:`exec_stream`).  The whole exchange
        must end within the client's timeout.
        """
        deadline = time.monotonic() + self.timeout
        parts: dict[int, list[bytes]] = {1: [], 2: []}
        total = 0

        def keep(fd: int, data: bytes) -> None:
            nonlocal total
            total += len(data)
            if total > MAX_OUTPUT:
                raise AgentError(f"the command's output exceeds the {MAX_OUTPUT >> 20} MiB an "
                                 "exec keeps in memory; a streamed exec has no such limit")
            parts[fd].append(data)

        code = self._run(argv, stdin, keep, deadline, deadline)
        return ExecResult(code, b"".join(parts[1]), b"".join(parts[2]))

    def exec_stream(self, argv: list[str], stdin: bytes, stdout: int, stderr: int) -> int:
        """Run ``argv`` in the guest, writing its output to ``stdout``/``stderr`` as it comes.

        Nothing is kept in memory and the command may run as long as it
        needs; the lock and the connection must be had within
        :data:`STREAM_START_TIMEOUT` seconds.  Returns the exit code.
        """
        fds = {1: stdout, 2: stderr}

        def write(fd: int, data: bytes) -> None:
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(fds[fd], view):]
            except OSError as exc:
                raise EngineError(f"cannot write the command's output: {exc.strerror}") from exc

        deadline = time.monotonic() + STREAM_START_TIMEOUT
        return self._run(argv, stdin, write, deadline, None)


class NoTerminal(AgentError):
    """The image's guest agent predates terminals (it answered PTY ``unknown-verb``)."""


class PtySession:
    """A command on a new terminal in the guest (:meth:`AgentClient.open_pty`).

    :meth:`send` passes keys on, :meth:`resize` the window size, and
    :meth:`receive` returns what the terminal shows, then ``None`` once the
    command exited (:attr:`exit_code`).  Sending is safe from several threads
    at once (one line at a time); receiving belongs to one thread.  Closing
    the session while the command runs ends it (the agent kills its session).
    """

    def __init__(self, sock: socket.socket, lock: object, rid: bytes, reader: LineReader) -> None:
        """Wrap the connected ``sock`` (the agent's lock file ``lock`` held) of request
        ``rid``, its answers read by ``reader`` (which may hold some already)."""
        import threading

        self.sock = sock
        self._lock = lock
        self.rid = rid
        self._reader = reader
        self._send_lock = threading.Lock()
        self.exit_code: int | None = None

    def _send(self, line: bytes) -> None:
        with self._send_lock:
            try:
                self.sock.sendall(line)
            except OSError as exc:
                raise AgentError(f"the guest agent channel failed: {exc.strerror or exc}") from exc

    def send(self, data: bytes) -> None:
        """Type ``data`` on the guest's terminal."""
        for start in range(0, len(data), PTY_CHUNK):
            self._send(b"IN " + self.rid + b" " + _b64(data[start:start + PTY_CHUNK]) + b"\n")

    def resize(self, rows: int, cols: int) -> None:
        """Give the guest's terminal this window size (its foreground group gets SIGWINCH)."""
        rows, cols = (min(max(v, 1), 9999) for v in (rows, cols))
        self._send(b"WINCH %s %d %d\n" % (self.rid, rows, cols))

    def receive(self) -> bytes | None:
        """The next output of the terminal; ``None`` once the command exited."""
        while self.exit_code is None:
            try:
                fields = self._reader.readline().strip().split(b" ")
            except OSError as exc:
                raise AgentError(f"the guest agent channel failed: {exc.strerror or exc}") from exc
            if len(fields) < 2 or fields[1] != self.rid:
                continue
            verb = fields[0]
            if verb == b"OUT" and len(fields) == 3:
                return _unb64(fields[2])
            if verb == b"EXIT" and len(fields) == 3 and fields[2].isdigit() \
                    and len(fields[2]) <= 3:
                self.exit_code = int(fields[2])
                break
            if verb == b"ERROR":
                reason = b" ".join(fields[2:])[:80].decode("ascii", "replace")
                raise AgentError(f"the guest agent ended the terminal session: {reason}")
            raise AgentError(f"malformed agent answer: {b' '.join(fields)[:80]!r}")
        return None

    def close(self) -> None:
        """Hang up (the command ends if it still runs) and let the next client in."""
        with contextlib.suppress(OSError):
            self.sock.close()
        close = getattr(self._lock, "close", None)
        if close is not None:
            close()


def open_pty(client: AgentClient, argv: list[str], size: tuple[int, int]) -> PtySession:
    """Start ``argv`` in the guest on a new terminal of ``size`` (rows, columns).

    Raises :class:`NoTerminal` when the image's agent predates terminals,
    :class:`AgentError` when the agent cannot be reached or refuses.
    """
    rid = secrets.token_hex(8).encode()
    rows, cols = (min(max(v, 1), 9999) for v in size)
    request = b"PTY %s %s %d %d\n" % (rid, _b64(shlex.join(argv).encode()), rows, cols)
    deadline = time.monotonic() + client.timeout
    lock = open(client.sock.with_suffix(".lock"), "a")  # noqa: SIM115 - the session keeps it
    try:
        client._lock(lock.fileno(), deadline)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.connect(str(client.sock))
            sock.sendall(request)
            reader = LineReader(sock, MAX_LINE, deadline)
            while True:
                fields = reader.readline().strip().split(b" ")
                if len(fields) < 2 or fields[1] != rid:
                    continue
                if fields[0] == b"STARTED":
                    break
                reason = b" ".join(fields[2:])[:80].decode("ascii", "replace")
                if fields[0] == b"ERROR" and reason == "unknown-verb":
                    raise NoTerminal("this image's guest agent has no terminals (it was built "
                                     "before them): rebuild the image for one")
                raise AgentError(f"the guest agent refused the terminal: {reason or fields[0]!r}")
            sock.settimeout(None)
        except TimeoutError as exc:
            sock.close()
            raise Late("the guest agent did not answer in time") from exc
        except OSError as exc:
            sock.close()
            raise AgentError(f"cannot reach the guest agent at {client.sock}: "
                             f"{exc.strerror or exc}") from exc
        except BaseException:
            sock.close()
            raise
        reader.deadline = None
        return PtySession(sock, lock, rid, reader)
    except BaseException:
        lock.close()
        raise
