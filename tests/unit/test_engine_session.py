"""engines.session: the descriptors a server relays (no root: local commands)."""

from __future__ import annotations

import os
import select
import socket
import time

from popek.engines.session import Channel, pipe_process, pty_process, socket_channel

DEADLINE_S = 10.0


def read_all(channel: Channel) -> dict[int, bytes]:
    """Every output stream of ``channel`` to its end, within the deadline."""
    got = {stream: b"" for stream in channel.outputs}
    live = dict(channel.outputs)
    deadline = time.monotonic() + DEADLINE_S
    while live:
        left = deadline - time.monotonic()
        assert left > 0, got
        ready, _, _ = select.select(list(live.values()), [], [], left)
        for stream, fd in list(live.items()):
            if fd not in ready:
                continue
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                continue
            except OSError:  # EIO: the terminal's other side closed
                data = b""
            if not data:
                del live[stream]
            got[stream] += data
    return got


def test_a_terminal_of_the_size_asked_then_the_exit_code() -> None:
    ch = pty_process(["sh", "-c", "tty; stty size; exit 3"], (33, 101))
    assert ch.tty and ch.outputs == {1: ch.input}
    out = read_all(ch)[1]
    assert b"/dev/pts/" in out and b"33 101" in out, out
    assert ch.close() == 3
    assert ch.close() == 3  # closing twice is harmless


def test_a_resize_reaches_the_command() -> None:
    ch = pty_process(["sh", "-c", "read line; stty size"], (24, 80))
    ch.resize(50, 132)
    assert ch.input is not None
    os.write(ch.input, b"go\n")
    assert b"50 132" in read_all(ch)[1]
    assert ch.close() == 0


def test_pipes_keep_the_streams_apart_and_end_the_input() -> None:
    ch = pipe_process(["sh", "-c", "cat; echo err >&2; exit 4"])
    assert ch.input is not None and not ch.tty
    os.write(ch.input, b"in\n")
    ch.close_input()
    assert ch.input is None
    assert read_all(ch) == {1: b"in\n", 2: b"err\n"}
    assert ch.close() == 4


def test_close_hangs_up_a_command_that_runs_on() -> None:
    ch = pty_process(["sleep", "600"])
    started = time.monotonic()
    code = ch.close()
    assert code is not None and code != 0
    assert time.monotonic() - started < DEADLINE_S


def test_a_socket_session_closes_its_socket() -> None:
    ours, theirs = socket.socketpair()
    ch = socket_channel(ours)
    assert ch.input is not None
    os.write(ch.input, b"ping")
    assert theirs.recv(4) == b"ping"
    assert ch.close() is None  # a console has no exit code
    assert theirs.recv(4) == b""  # the other side sees the end
    theirs.close()
