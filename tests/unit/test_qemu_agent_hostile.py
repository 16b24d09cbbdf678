"""A hostile guest agent against popek's agent client (engines/qemu/agent.py).

The guest is untrusted: whatever answers on ``agent.sock`` may send garbage,
a line that never ends, a reply too large to keep, or nothing at all.  The
fake here is a real Unix socket server in a thread that reads the client's
request and answers as a hostile agent would; each test checks that the
attack really ran (bytes sent, lines answered) and why the client stopped.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from popek.engines.qemu.agent import MAX_LINE, MAX_OUTPUT, MAX_STDIN, AgentClient
from popek.errors import AgentError, InvalidInput

Script = Callable[[socket.socket, list[bytes]], None]


class FakeAgent:
    """Serves one client per ``script`` on ``path``; records the request and bytes sent."""

    def __init__(self, path: Path, script: Script) -> None:
        self.path = path
        self.script = script
        self.request: list[bytes] = []
        self.sent = 0
        self.stopped = threading.Event()
        self.error: BaseException | None = None
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        self.sent += len(data)

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return  # closed with no client: the test refused before connecting
        with conn:
            buf = b""
            while b"\n" not in buf:
                chunk = conn.recv(1 << 16)
                if not chunk:
                    return
                buf += chunk
            self.request = buf.split(b"\n", 1)[0].split(b" ")
            try:
                self.script(conn, self.request)
            except OSError:
                pass  # the client hung up: that is how a refused answer ends
            except BaseException as exc:  # pragma: no cover - shown by the test
                self.error = exc
            finally:
                self.stopped.set()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes an accept() still waiting
        self.listener.close()
        self.thread.join(timeout=10)


Start = Callable[[Script], "FakeAgent"]


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Start]:
    fakes: list[FakeAgent] = []

    def start(script: Script) -> FakeAgent:
        fake = FakeAgent(tmp_path / "agent.sock", script)
        fakes.append(fake)
        return fake

    yield start
    for fake in fakes:
        fake.close()
        assert fake.error is None


def _client(tmp_path: Path, timeout: float = 10.0) -> AgentClient:
    return AgentClient(tmp_path / "agent.sock", timeout)


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data) if data else b"-"


def test_endless_line_is_refused_at_the_cap(tmp_path: Path, agent: Start) -> None:
    """A guest that never sends a newline: refused after MAX_LINE bytes, not at the deadline."""
    def endless(conn: socket.socket, req: list[bytes]) -> None:
        block = b"A" * (1 << 16)
        while True:
            agent_.send(conn, block)

    agent_ = agent(endless)
    started = time.monotonic()
    with pytest.raises(AgentError, match=f"longer than {MAX_LINE} bytes"):
        _client(tmp_path, timeout=30.0).exec(["true"])
    took = time.monotonic() - started
    assert agent_.stopped.wait(10)
    # the attack ran: the guest sent past the cap; the client read no more than the cap
    # plus what the two socket buffers hold, and stopped long before the deadline
    assert agent_.sent > MAX_LINE
    assert agent_.sent < MAX_LINE + (8 << 20)
    assert took < 10


def test_a_dripping_guest_meets_the_deadline(tmp_path: Path, agent: Start) -> None:
    """One byte at a time, no newline: the whole reply has a deadline, not each read."""
    stop = threading.Event()

    def drip(conn: socket.socket, req: list[bytes]) -> None:
        while not stop.wait(0.01):
            agent_.send(conn, b"x")

    agent_ = agent(drip)
    started = time.monotonic()
    with pytest.raises(AgentError, match="did not finish within 1s"):
        _client(tmp_path, timeout=1.0).exec(["true"])
    took = time.monotonic() - started
    stop.set()
    assert agent_.sent > 10  # bytes kept coming: every read alone was in time
    assert 0.9 < took < 5


def test_garbage_and_stale_lines_are_skipped(tmp_path: Path, agent: Start) -> None:
    """Blank lines, binary junk and answers to other requests never reach the result."""
    def noisy(conn: socket.socket, req: list[bytes]) -> None:
        rid = req[1]
        agent_.send(conn, b"\n\n\xff\xfe\x00junk\n"
                          b"OUT 0000stale " + _b64(b"stale output") + b"\n"
                          b"EXIT 0000stale 9\n"
                          b"OUT " + rid + b" " + _b64(b"hello ") + b"\n"
                          b"ERR " + rid + b" " + _b64(b"warn") + b"\n"
                          b"OUT " + rid + b" " + _b64(b"world") + b"\n"
                          b"EXIT " + rid + b" 3\n")

    agent_ = agent(noisy)
    result = _client(tmp_path).exec(["echo", "hi there"], stdin=b"in")
    assert (result.exit_code, result.stdout, result.stderr) == (3, b"hello world", b"warn")
    assert agent_.request[0] == b"EXEC"
    assert base64.b64decode(agent_.request[2]) == b"echo 'hi there'"
    assert base64.b64decode(agent_.request[3]) == b"in"


@pytest.mark.parametrize("answer", [
    b"OUT {rid} not*base64\n",
    b"EXIT {rid} 99999999999999999999\n",
    b"EXIT {rid} -1\n",
    b"WHAT {rid} 1 2 3\n",
    b"OUT {rid}\n",
])
def test_malformed_answers_are_one_clear_error(tmp_path: Path, agent: Start, answer: bytes) -> None:
    def bad(conn: socket.socket, req: list[bytes]) -> None:
        agent_.send(conn, answer.replace(b"{rid}", req[1]))
        conn.recv(1)  # hold the line open until the client gives up

    agent_ = agent(bad)
    with pytest.raises(AgentError, match="malformed agent answer"):
        _client(tmp_path).exec(["true"])
    assert agent_.stopped.wait(10)  # the fake counts what it sent once sendall returned
    assert agent_.sent > 0


def test_refusal_and_hangup_are_agent_errors(tmp_path: Path, agent: Start) -> None:
    def refuse(conn: socket.socket, req: list[bytes]) -> None:
        agent_.send(conn, b"ERROR " + req[1] + b" bad-request \x1b[31mred\n")
        conn.recv(1)

    agent_ = agent(refuse)
    with pytest.raises(AgentError, match="refused the command: bad-request"):
        _client(tmp_path).exec(["true"])
    agent_.close()
    os.unlink(tmp_path / "agent.sock")

    agent(lambda conn, req: None)  # answers nothing and hangs up
    with pytest.raises(AgentError, match="closed the channel"):
        _client(tmp_path).exec(["true"])


def _huge(total: int) -> Script:
    def script(conn: socket.socket, req: list[bytes]) -> None:
        rid = req[1]
        chunk = b"OUT " + rid + b" " + _b64(b"z" * (48 << 10)) + b"\n"
        sent = 0
        while sent < total:
            conn.sendall(chunk)
            sent += 48 << 10
        conn.sendall(b"ERR " + rid + b" " + _b64(b"done") + b"\nEXIT " + rid + b" 0\n")
        conn.recv(1)

    return script


def test_a_huge_reply_is_not_kept(tmp_path: Path, agent: Start) -> None:
    """More output than an exec keeps: refused once past MAX_OUTPUT, not buffered whole."""
    agent(_huge(4 * MAX_OUTPUT))
    tracemalloc.start()
    try:
        with pytest.raises(AgentError, match="exceeds the 16 MiB"):
            _client(tmp_path, timeout=60).exec(["yes"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * MAX_OUTPUT


def test_a_huge_reply_streams_in_bounded_memory(tmp_path: Path, agent: Start) -> None:
    """The streamed exec writes 4x what an exec keeps through and keeps none of it."""
    total = 4 * MAX_OUTPUT
    agent(_huge(total))
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        tracemalloc.start()
        try:
            code = _client(tmp_path).exec_stream(["yes"], b"", fo.fileno(), fe.fileno())
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert code == 0
    assert out.stat().st_size >= total
    assert err.read_bytes() == b"done"
    assert peak < 4 * MAX_LINE


def test_stdin_is_bounded_before_anything_is_sent(tmp_path: Path, agent: Start) -> None:
    fake = agent(lambda conn, req: None)
    with pytest.raises(InvalidInput, match="at most 4 MiB"):
        _client(tmp_path).exec(["cat"], stdin=b"x" * (MAX_STDIN + 1))
    assert fake.request == []


def test_a_busy_channel_is_an_error_not_a_hang(tmp_path: Path, agent: Start) -> None:
    """Another session holds the agent: the next one gives up at its deadline."""
    import fcntl

    agent(lambda conn, req: None)
    with open(tmp_path / "agent.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        started = time.monotonic()
        with pytest.raises(AgentError, match="another exec session"):
            _client(tmp_path, timeout=0.5).exec(["true"])
    assert time.monotonic() - started < 5
