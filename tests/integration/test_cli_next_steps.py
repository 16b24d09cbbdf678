"""Exit codes and next steps on real instances, through the real CLI (issue 13 points 3, 5).

One container, shared and taken through the cases in order: stop twice (the
second a success with a note), exec into it stopped (names ``popek start``),
delete while it runs (names ``--force`` and ``popek stop``), a second launch of
its name (already exists), a missing image (lists the images, says how to
build one), and ``popek console`` with stdin not a terminal: ``/dev/null``
and a pipe.  One VM, for the serial console relay: piped input reaches the
guest's shell, the input's end does not end the session, and the command
returns when the console closes (the VM stops).
"""

from __future__ import annotations

import fcntl
import os
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import POPEK, instance, popek, wait_for
from popek import errors

CT, VM = "herr-steps-ct", "herr-steps-vm"


@pytest.fixture(scope="module")
def ct(minimal_image: str) -> Iterator[str]:
    popek("launch", minimal_image, CT, "--container", "--memory", "128MiB")
    yield CT
    popek("delete", "--force", CT, check=False)


def _fails(code: int, *args: str) -> str:
    proc = popek(*args, check=False)
    assert proc.returncode == code, (args, proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("Error: "), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


def test_console_with_stdin_at_dev_null(ct: str) -> None:
    res = subprocess.run([*POPEK, "console", ct], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "without a terminal" in res.stderr


def test_console_with_piped_input(ct: str) -> None:
    res = subprocess.run([*POPEK, "console", ct], input="echo hi-$((6*7))\n",
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert "hi-42" in res.stdout


def test_delete_while_running_names_force_and_stop(ct: str) -> None:
    err = _fails(errors.WRONG_STATE, "delete", ct)
    assert "popek stop herr-steps-ct" in err and "popek delete --force herr-steps-ct" in err
    assert instance(ct)["state"] == "running"


def test_launch_of_an_existing_name(ct: str, minimal_image: str) -> None:
    err = _fails(errors.EXISTS, "launch", minimal_image, ct, "--container")
    assert f"instance '{ct}' already exists" in err
    assert instance(ct)["state"] == "running"


def test_a_missing_image_says_how_to_build_one(ct: str) -> None:
    err = _fails(errors.NOT_FOUND, "launch", "herr-nosuch", "herr-steps-x", "--container")
    assert "available: minimal" in err and "popek image build NAME" in err


def test_stop_twice_succeeds_with_a_note(ct: str) -> None:
    first = popek("stop", ct, "--timeout", "20")
    assert first.stdout.startswith(f"Instance {ct} stopped (")
    again = popek("stop", ct)
    assert (again.returncode, again.stdout) == (0, "")
    assert again.stderr.endswith(f"popek: instance {ct} is already stopped\n"), again.stderr
    assert instance(ct)["state"] == "stopped"
    log = popek("audit", "log", "--target", ct, "--format", "json").stdout
    assert '"result": "ok"' in log.rsplit('"op": "instance.stop"', 1)[1]


def test_exec_into_a_stopped_instance_names_start(ct: str) -> None:
    err = _fails(errors.WRONG_STATE, "exec", ct, "--", "true")
    assert err.rstrip().endswith(f"start it first: popek start {ct}")
    err = _fails(errors.WRONG_STATE, "console", ct)
    assert f"popek start {ct}" in err and f"popek console {ct} --log" in err


def test_not_found_after_delete(ct: str) -> None:
    popek("delete", ct)
    err = _fails(errors.NOT_FOUND, "info", ct)
    assert f"instance '{ct}' not found" in err


# -- a VM's serial console without a terminal ----------------------------------------------
@pytest.fixture(scope="module")
def vm(minimal_image: str) -> Iterator[str]:
    popek("launch", minimal_image, VM, "--memory", "128MiB")
    yield VM
    popek("delete", "--force", VM, check=False)


def _read_until(proc: subprocess.Popen[bytes], marker: bytes, timeout: float) -> bytes:
    """What ``proc`` printed up to ``marker`` (waiting on its stdout, not sleeping)."""
    assert proc.stdout is not None
    fd, got, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout
    while marker not in got:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} within {timeout}s: {got[-500:]!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            assert chunk, f"the console ended before {marker!r}: {got[-500:]!r}"
            got += chunk
    return got


def _end(proc: subprocess.Popen[bytes]) -> None:
    """Kill ``proc`` if it still runs (a failed test) and close its pipes."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def test_vm_console_takes_piped_input_and_ends_when_the_console_closes(vm: str) -> None:
    read, write = os.pipe()
    proc = subprocess.Popen([*POPEK, "console", vm], stdin=read, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    os.close(read)
    try:
        os.write(write, b"\necho hi-$((6*7))\n")
        os.close(write)  # the input ends; the session goes on
        _read_until(proc, b"hi-42", 120)
        assert proc.poll() is None, "the console ended with its input"
        popek("stop", vm, "--force")  # the console closes with the VM
        assert proc.wait(timeout=60) == 0
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        assert "Traceback" not in err and "Error" not in err, err
    finally:
        _end(proc)


def _attached(vm: str) -> bool:
    """Whether a console session holds the VM's console lock (taken before it connects)."""
    lock = Path(os.environ["POPEK_HOME"]) / "instances" / "default" / vm / "console.lock"
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def test_vm_console_with_stdin_at_dev_null_prints_until_it_closes(vm: str) -> None:
    """Before, /dev/null was an internal error (epoll refuses it); now the session lasts
    until the guest powers off, and what it printed meanwhile shows."""
    popek("start", vm)
    proc = subprocess.Popen([*POPEK, "console", vm], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: _attached(vm) or proc.poll() is not None, 60, "the console session")
        assert proc.poll() is None, "the console ended at once (stdin at EOF)"
        popek("stop", vm, "--timeout", "60")  # ACPI: the guest says it goes down
        assert proc.wait(timeout=60) == 0
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.read(), "nothing of the guest's shutdown showed"
        err = proc.stderr.read().decode()
        assert "without a terminal" in err and "Traceback" not in err, err
    finally:
        _end(proc)
