"""The host side of the guest agent protocol (virtio-serial port ``org.popek.agent.0``).

One ASCII line per message; binary payloads are base64 without wraps, ``-``
stands for empty::

    host  -> guest   PING <id>
    guest -> host    PONG <id>
    host  -> guest   EXEC <id> <b64 command> <b64 stdin>
    guest -> host    RESULT <id> <exit code> <b64 stdout> <b64 stderr>
    guest -> host    ERROR <id> <reason>

The guest serves one request at a time; an exclusive lock file serialises
host clients.  Lines with another id (an answer to a request whose client
went away) are skipped.
"""

from __future__ import annotations

import base64
import fcntl
import secrets
import shlex
import socket
import time
from pathlib import Path

from popek.engines.base import ExecResult
from popek.errors import AgentError


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data) if data else b"-"


def _unb64(field: bytes) -> bytes:
    return b"" if field == b"-" else base64.b64decode(field, validate=True)


class AgentClient:
    """A short session with the guest agent listening behind ``sock``."""

    def __init__(self, sock: Path, timeout: float) -> None:
        """Prepare a session; nothing is connected until a request is made."""
        self.sock = sock
        self.timeout = timeout

    def _request(self, verb: bytes, rid: bytes, payload: list[bytes]) -> list[bytes]:
        deadline = time.monotonic() + self.timeout
        with open(self.sock.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.settimeout(self.timeout)
                    s.connect(str(self.sock))
                    s.sendall(b" ".join([verb, rid, *payload]) + b"\n")
                    buf = b""
                    while True:
                        while b"\n" in buf:
                            line, buf = buf.split(b"\n", 1)
                            fields = line.strip().split(b" ")
                            if len(fields) >= 2 and fields[1] == rid:
                                return fields
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise TimeoutError
                        s.settimeout(remaining)
                        chunk = s.recv(1 << 16)
                        if not chunk:
                            raise AgentError("the guest agent closed the channel")
                        buf += chunk
                except TimeoutError as exc:
                    raise AgentError(f"the guest agent did not answer within {self.timeout:.0f}s"
                                     ) from exc
                except OSError as exc:
                    raise AgentError(f"cannot reach the guest agent at {self.sock}: {exc}") from exc

    def ping(self) -> None:
        """Check that the agent answers; raise :class:`AgentError` otherwise."""
        rid = secrets.token_hex(8).encode()
        fields = self._request(b"PING", rid, [])
        if fields[0] != b"PONG":
            raise AgentError(f"unexpected agent answer {fields[0]!r} to PING")

    def exec(self, argv: list[str], stdin: bytes = b"") -> ExecResult:
        """Run ``argv`` in the guest (through ``sh -c``) and return its result."""
        rid = secrets.token_hex(8).encode()
        command = shlex.join(argv).encode()
        fields = self._request(b"EXEC", rid, [_b64(command), _b64(stdin)])
        if fields[0] == b"ERROR":
            raise AgentError(f"the guest agent refused the command: {b' '.join(fields[2:])!r}")
        if fields[0] != b"RESULT" or len(fields) != 5:
            raise AgentError(f"malformed agent answer: {b' '.join(fields)[:200]!r}")
        try:
            return ExecResult(int(fields[2]), _unb64(fields[3]), _unb64(fields[4]))
        except ValueError as exc:
            raise AgentError(f"malformed agent answer: {exc}") from exc
