"""A VM's exec on a terminal, host side (engines/qemu/agent.py open_pty, ptyexec.channel).

The guest agent is faked by a real Unix socket server in a thread
(tests/unit/test_qemu_agent_hostile.py's FakeAgent): it answers the PTY
request as the agent does, echoes the keys it gets and reports the window
sizes it is given, or answers as an agent that predates terminals, or as a
hostile one.  The real agent and a real guest terminal are exercised by
tests/integration/test_api_console.py.
"""

from __future__ import annotations

import base64
import os
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_qemu_agent_hostile import FakeAgent, Script, Start

from popek.engines.qemu.agent import AgentClient, NoTerminal, open_pty
from popek.engines.qemu.ptyexec import channel
from popek.errors import AgentError

B64 = base64.b64encode


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Start]:
    """Start a fake agent on ``tmp_path/agent.sock`` serving one client with a script."""
    fakes: list[FakeAgent] = []

    def start(script: Script) -> FakeAgent:
        fakes.append(FakeAgent(tmp_path / "agent.sock", script))
        return fakes[-1]

    yield start
    for fake in fakes:
        fake.close()
        assert fake.error is None


def _lines(conn: socket.socket) -> Iterator[list[bytes]]:
    buf = b""
    while True:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.split(b" ")
        chunk = conn.recv(1 << 16)
        if not chunk:
            return
        buf += chunk


def _echo_terminal(conn: socket.socket, req: list[bytes]) -> None:
    """STARTED, then every key back as output and every size as a line; 'q' exits 3."""
    rid = req[1]
    conn.sendall(b"STARTED " + rid + b"\n")
    conn.sendall(b"OUT " + rid + b" " + B64(f"size {req[3].decode()}x{req[4].decode()}\n"
                                            .encode()) + b"\n")
    for fields in _lines(conn):
        if fields[0] == b"IN":
            keys = base64.b64decode(fields[2])
            conn.sendall(b"OUT " + rid + b" " + B64(keys) + b"\n")
            if b"q" in keys:
                conn.sendall(b"EXIT " + rid + b" 3\n")
                return
        elif fields[0] == b"WINCH":
            conn.sendall(b"OUT " + rid + b" " + B64(b"size %bx%b\n" % (fields[2], fields[3]))
                         + b"\n")


def _read_until(fd: int, marker: bytes) -> bytes:
    got = b""
    deadline = time.monotonic() + 10
    while marker not in got:
        assert select.select([fd], [], [], deadline - time.monotonic())[0], got
        data = os.read(fd, 4096)
        if not data:
            break
        got += data
    return got


def test_keys_sizes_and_the_exit_code_through_a_channel(tmp_path: Path, agent: Start) -> None:
    fake = agent(_echo_terminal)
    chan = channel(AgentClient(tmp_path / "agent.sock", 10), ["/bin/sh"], (33, 101))
    assert fake.request[0] == b"PTY" and fake.request[3:] == [b"33", b"101"]
    assert base64.b64decode(fake.request[2]) == b"/bin/sh"
    fd = chan.outputs[1]
    assert chan.tty and chan.input == fd
    assert b"size 33x101" in _read_until(fd, b"size 33x101")
    os.write(fd, b"hello")
    assert b"hello" in _read_until(fd, b"hello")
    chan.resize(50, 132)
    assert b"size 50x132" in _read_until(fd, b"size 50x132")
    os.write(fd, b"q")
    _read_until(fd, b"\0never\0")  # the end of the output: the command exited
    assert chan.close() == 3


def test_an_agent_without_terminals_is_told_apart(tmp_path: Path, agent: Start) -> None:
    """An image built before terminals answers unknown-verb: NoTerminal, so exec falls back."""
    def old(conn: socket.socket, req: list[bytes]) -> None:
        conn.sendall(b"ERROR " + req[1] + b" unknown-verb\n")

    agent(old)
    with pytest.raises(NoTerminal, match="rebuild the image"):
        open_pty(AgentClient(tmp_path / "agent.sock", 10), ["sh"], (24, 80))


def test_a_refused_or_broken_session_is_an_error(tmp_path: Path, agent: Start) -> None:
    """ERROR in the middle of a session ends it with the reason."""
    def refuse_mid_way(conn: socket.socket, req: list[bytes]) -> None:
        conn.sendall(b"STARTED " + req[1] + b"\n" + b"ERROR " + req[1] + b" too-long\n")

    agent(refuse_mid_way)
    session = open_pty(AgentClient(tmp_path / "agent.sock", 10), ["sh"], (24, 80))
    with pytest.raises(AgentError, match="too-long"):
        session.receive()
    session.close()


def test_a_guest_that_never_starts_meets_the_deadline(tmp_path: Path, agent: Start) -> None:
    def silent(conn: socket.socket, req: list[bytes]) -> None:
        conn.recv(1)  # until the client hangs up

    agent(silent)
    started = time.monotonic()
    with pytest.raises(AgentError, match="in time"):
        open_pty(AgentClient(tmp_path / "agent.sock", 0.5), ["sh"], (24, 80))
    assert time.monotonic() - started < 5


def test_sizes_are_clamped(tmp_path: Path, agent: Start) -> None:
    agent(_echo_terminal)
    session = open_pty(AgentClient(tmp_path / "agent.sock", 10), ["sh"], (0, 100000))
    assert session.receive() == b"size 1x9999\n"
    session.close()
