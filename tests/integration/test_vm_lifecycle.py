"""A real guest under QEMU (TCG here), driven through the real CLI from launch to delete.

One VM is shared by the tests of this module, in order: they go from launch
through exec, pause/resume, graceful stop and start, to kill -9 and delete.
"""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import POPEK, instance, popek, popek_json, processes_mentioning, wait_for
from framework.events import wait_exit, wait_state

VM = "lifecycle"
VCPUS = 2
MEMORY_MIB = 256


@pytest.fixture(scope="module")
def vm(minimal_image: str) -> Iterator[str]:
    popek("launch", minimal_image, VM, "--vcpus", str(VCPUS), "--memory", f"{MEMORY_MIB}MiB")
    yield VM
    popek("delete", "--force", VM, check=False)


def _guest(vm: str, *cmd: str) -> str:
    return popek("exec", vm, "--", *cmd).stdout


def _uptime(vm: str) -> float:
    return float(_guest(vm, "cat", "/proc/uptime").split()[0])


def test_launch_is_running_under_tcg(vm: str) -> None:
    info = popek_json("info", vm)
    assert info["state"] == "running"
    assert info["accel"] == "tcg"  # this host's KVM is software-backed
    assert info["vm_status"] == "running"
    pid = info["pid"]
    st = Path(f"/proc/{pid}")
    assert st.stat().st_uid != 0  # QEMU runs unprivileged
    assert st.stat().st_uid == info["uid"]


def test_nproc_matches_vcpus(vm: str) -> None:
    assert int(_guest(vm, "nproc")) == VCPUS


def test_memtotal_matches_memory(vm: str) -> None:
    meminfo = _guest(vm, "cat", "/proc/meminfo")
    kib = int(next(line for line in meminfo.splitlines() if line.startswith("MemTotal")).split()[1])
    # the kernel keeps its code, page tables and firmware holes for itself (about 40MiB
    # here): MemTotal is just under what QEMU gives, and far from any other size
    assert (MEMORY_MIB - 48) * 1024 < kib <= MEMORY_MIB * 1024


def test_exec_passes_stdout_stderr_and_exit_code(vm: str) -> None:
    proc = popek("exec", vm, "--", "sh", "-c", "echo out; echo err >&2; exit 7", check=False)
    assert proc.returncode == 7
    assert proc.stdout == "out\n"
    assert proc.stderr == "err\n"


def test_exec_forwards_stdin_and_quoting(vm: str) -> None:
    proc = popek("exec", vm, "--", "tr", "a-z", "A-Z", stdin=b"hello popek\n")
    assert proc.stdout == "HELLO POPEK\n"
    assert _guest(vm, "echo", "a b", "$HOME", "'q'") == "a b $HOME 'q'\n"


def test_duplicate_name_is_refused(vm: str, minimal_image: str) -> None:
    before = popek_json("info", vm)
    proc = popek("launch", minimal_image, vm, check=False)
    assert proc.returncode != 0
    assert "already exists" in proc.stderr
    after = popek_json("info", vm)
    assert after["pid"] == before["pid"] and after["state"] == "running"


def test_pause_stops_the_guest_clock(vm: str) -> None:
    before = _uptime(vm)
    t0 = time.monotonic()
    popek("pause", vm)
    assert instance(vm)["state"] == "paused"
    assert popek_json("info", vm)["vm_status"] == "paused"
    # exec cannot run in a paused guest: refused with the state named
    refused = popek("exec", vm, "--", "true", check=False)
    assert refused.returncode != 0 and "paused" in refused.stderr
    # not synchronisation: the host's time passing while the guest is paused is the test
    time.sleep(4)
    popek("resume", vm)
    after = _uptime(vm)
    host_elapsed = time.monotonic() - t0
    assert instance(vm)["state"] == "running"
    # the guest saw far less time than the host: its clock stood still while paused
    assert after - before < host_elapsed - 3, (before, after, host_elapsed)


def test_illegal_transition_is_a_clear_error(vm: str) -> None:
    proc = popek("resume", vm, check=False)
    assert proc.returncode != 0
    assert "cannot resume" in proc.stderr and "it is running" in proc.stderr


def test_graceful_stop_runs_the_guest_shutdown_then_start(vm: str) -> None:
    proc = popek("stop", vm, "--timeout", "60")
    assert "graceful" in proc.stdout
    entry = instance(vm)
    assert entry["state"] == "stopped"
    assert entry["pid"] is None
    log = popek("console", vm, "--log").stdout
    assert "popek-guest: shutdown" in log  # the guest ran its own shutdown path
    assert "reboot: Power down" in log
    popek("start", vm)
    assert instance(vm)["state"] == "running"
    assert int(_guest(vm, "nproc")) == VCPUS


def test_restart(vm: str) -> None:
    old_pid = popek_json("info", vm)["pid"]
    popek("restart", vm, "--timeout", "60")
    info = popek_json("info", vm)
    assert info["state"] == "running" and info["pid"] != old_pid


def test_interactive_console_and_detach(vm: str) -> None:
    """Drive ``popek console`` through a pseudo-terminal: type a command, read it, Ctrl-]."""
    pid, fd = pty.fork()
    if pid == 0:  # child: the CLI on a real terminal
        os.execv(POPEK[0], [*POPEK, "console", vm])
    out = b""
    try:
        deadline = time.monotonic() + 30
        step = 0  # 0: wait for attach, 1: wait for a prompt, 2: command sent
        while time.monotonic() < deadline and b"console-works-42" not in out:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                out += os.read(fd, 4096)
            if step == 0 and b"Ctrl-]" in out:
                # the banner comes first: wait until the CLI made the terminal raw (the
                # master reads the terminal's modes), else the line discipline eats keys
                wait_state(lambda: not termios.tcgetattr(fd)[3] & termios.ICANON, pid, 30,
                           "the console to make the terminal raw")
                os.write(fd, b"\r")
                step, mark = 1, len(out)
            elif step == 1 and b"# " in out[mark:]:
                os.write(fd, b"echo console-works-$((40+2))\r")
                step = 2
        assert b"console-works-42" in out, out[-500:]
        os.write(fd, b"\x1d")  # Ctrl-]
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    assert instance(vm)["state"] == "running"


def test_guest_poweroff_shows_stopped_with_reason(vm: str) -> None:
    pid = popek_json("info", vm)["pid"]
    popek("exec", vm, "--timeout", "5", "--", "sh", "-c", "poweroff &", check=False)
    wait_exit(pid, 60, "QEMU to exit on the guest's poweroff")
    wait_for(lambda: instance(vm)["state"] == "stopped", 10, "popek to see QEMU gone")
    entry = instance(vm)
    assert entry["state"] == "stopped"
    assert entry["reason"] == "the guest powered off"
    popek("start", vm)


def test_kill9_of_qemu_shows_stopped_with_reason(vm: str) -> None:
    pid = popek_json("info", vm)["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_exit(pid, 10, "QEMU to die of SIGKILL")
    wait_for(lambda: instance(vm)["state"] == "stopped", 10, "popek to see QEMU gone")
    entry = instance(vm)
    assert entry["state"] == "stopped"
    assert "QEMU exited unexpectedly" in entry["reason"]
    # and it can be started again
    popek("start", vm)
    assert instance(vm)["state"] == "running"


def test_delete_leaves_nothing_behind(vm: str) -> None:
    info = popek_json("info", vm)
    workdir = info["workdir"]
    refused = popek("delete", vm, check=False)
    assert refused.returncode != 0 and "running" in refused.stderr
    popek("delete", "--force", vm)
    assert VM not in [e["name"] for e in popek_json("list")]
    assert not Path(workdir).exists()  # no socket, log or pid file left
    assert processes_mentioning(workdir) == []
    assert not Path(f"/proc/{info['pid']}").exists() or processes_mentioning(workdir) == []
