"""A real guest (TCG) against popek's channels: exec output, the idle agent, the console log.

One small VM is shared by the tests of this module.  Each test makes the
guest do what a hostile or careless guest does (print without end, answer
with hundreds of megabytes, sit idle for hours) and checks what the host
pays for it.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import POPEK, popek, popek_json
from popek.engines.qemu import conlog

VM = "h1chan"


@pytest.fixture(scope="module")
def vm(minimal_image: str) -> Iterator[str]:
    popek("launch", minimal_image, VM, "--vcpus", "1", "--memory", "128MiB")
    yield VM
    popek("delete", "--force", VM, check=False)


def _workdir(popek_home: Path) -> Path:
    return popek_home / "instances" / "default" / VM


def _last_pid(vm: str) -> int:
    """The last pid the guest kernel handed out (/proc/loadavg, fifth field)."""
    return int(popek("exec", vm, "--", "cat", "/proc/loadavg").stdout.split()[4])


def test_idle_agent_forks_nothing(vm: str) -> None:
    """Between host clients the agent sleeps in the kernel: no process is made while idle.

    The shell agent read its port, got end-of-file, ran ``sleep 0.2`` and read
    again, five forks a second; the guest's pid counter shows it.
    """
    before = _last_pid(vm)
    window = 3.0
    time.sleep(window)  # the measured idle window, not a synchronisation
    after = _last_pid(vm)
    # the second exec itself makes its sh and cat (one or two pids); a kernel worker thread
    # may start meanwhile; the shell agent made 24 in this window
    assert after - before <= 6, f"{after - before} processes in {window}s of idleness"


def test_large_exec_output_streams(vm: str, tmp_path: Path) -> None:
    """200 MB of stdout arrive whole through the CLI, and the next exec answers at once."""
    size = 200_000_000
    out = tmp_path / "out"
    with open(out, "wb") as f:
        proc = subprocess.run([*POPEK, "exec", vm, "--", "sh", "-c",
                               f"head -c {size} /dev/zero; echo done >&2; exit 5"],
                              stdout=f, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              timeout=900, check=False)
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr == b"done\n"
    assert out.stat().st_size == size
    with open(out, "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == \
            hashlib.sha256(b"\0" * size).hexdigest()
    started = time.monotonic()
    assert popek("exec", vm, "--timeout", "20", "--", "echo", "next").stdout == "next\n"
    assert time.monotonic() - started < 20


def test_large_stdin_reaches_the_command_whole(vm: str) -> None:
    """Input is read to its end (a pipe gives 64 KiB per read) and bounded at 4 MiB."""
    payload = os.urandom(3 << 20)
    got = popek("exec", vm, "--", "sha256sum", stdin=payload.hex().encode()[: 3 << 20])
    assert got.stdout.split()[0] == hashlib.sha256(payload.hex().encode()[: 3 << 20]).hexdigest()
    refused = popek("exec", vm, "--", "wc", "-c", stdin=b"x" * ((4 << 20) + 1), check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip() == ("Error: the input of a command run in a VM is at most "
                                      "4 MiB; 4194305 bytes were given")


def test_whole_exec_output_is_capped_with_one_line(vm: str) -> None:
    """Without streaming (--no-stdin) the output kept is bounded, with a clear error."""
    res = popek("exec", vm, "--no-stdin", "--", "sh", "-c", "head -c 40000000 /dev/zero",
                check=False, timeout=600)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "Error: the command's output exceeds the 16 MiB an exec keeps in memory; "
        "a streamed exec has no such limit"]
    assert popek("exec", vm, "--", "echo", "next").stdout == "next\n"


def test_abandoned_exec_is_ended(vm: str) -> None:
    """A client that goes away mid-output: the guest ends the command, the next exec is served."""
    reader = subprocess.Popen([*POPEK, "exec", vm, "--", "sh", "-c", "exec yes popek-h1"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              stdin=subprocess.DEVNULL)
    assert reader.stdout is not None
    got = reader.stdout.read(1 << 20)
    assert got.startswith(b"popek-h1\n") and len(got) == 1 << 20  # the flood really ran
    reader.stdout.close()  # the client's writes now fail: it ends, and so does its session
    reader.send_signal(signal.SIGTERM)
    reader.wait(timeout=60)
    started = time.monotonic()
    ps = popek("exec", vm, "--timeout", "20", "--", "ps", "-o", "args").stdout
    assert "yes popek-h1" not in ps
    assert time.monotonic() - started < 20


def test_console_log_is_bounded_and_rotated(vm: str, popek_home: Path) -> None:
    """A guest printing 6 MB on its console leaves at most 2 x 2 MiB on the host."""
    total = 6_000_000
    line = b"h1-console-flood " * 4 + b"\n"
    count = total // len(line)
    popek("exec", vm, "--timeout", "600", "--", "sh", "-c",
          f"i=0; while [ $i -lt {count // 1000} ]; do "
          f"yes '{line.decode().strip()}' | head -n 1000 > /dev/console; i=$((i+1)); done; "
          "echo h1-console-end > /dev/console", timeout=900)
    work = _workdir(popek_home)
    log, old = work / "console.log", work / "console.log.1"
    limit = conlog.LIMIT + conlog.CHUNK
    # the flood really reached the log: the end marker is there and the log was rotated
    assert old.exists(), "the log was never rotated"
    assert old.stat().st_size <= limit
    assert log.stat().st_size <= limit
    shown = popek("console", vm, "--log", timeout=60).stdout
    assert shown.rstrip().endswith("h1-console-end")
    assert 2 << 20 <= len(shown) <= 2 * limit
    assert popek_json("info", vm)["state"] == "running"
