"""Attacks on the host through the VMM: each must fail.

The threat (survey, section V): a guest that escapes into QEMU, or a
management channel abused to make QEMU act on the host.  popek runs QEMU as
an unprivileged per-instance uid, with no supplementary groups, no
capabilities, and QEMU's seccomp sandbox with every optional deny on.  These
tests take the attacker's seat in QEMU's monitor (QMP), which can do anything
QEMU itself can do, and show that the host does not give way.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import instance, popek, popek_json, require_root_and_tools, wait_for
from popek.engines.qemu import qmp
from popek.errors import EngineError

require_root_and_tools("qemu-system-x86_64")

VM = "confined"
SPAWNING = "confined-spawning"


@pytest.fixture(scope="module")
def vm(minimal_image: str) -> Iterator[dict[str, object]]:
    popek("launch", minimal_image, VM, "--memory", "256MiB")
    yield popek_json("info", VM)
    popek("delete", "--force", VM, check=False)


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, v in (line.split(":", 1) for line in lines)}


def _qmp_sock(info: dict[str, object]) -> Path:
    return Path(str(info["workdir"])) / "qmp.sock"


def test_qemu_has_no_privilege(vm: dict[str, object]) -> None:
    st = _status(int(str(vm["pid"])))
    assert all(int(u) == vm["uid"] for u in st["Uid"].split())
    assert all(int(g) == vm["uid"] for g in st["Gid"].split())
    assert st["Groups"] == ""  # no supplementary group (no disk, kvm, root...)
    assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"  # filter mode: QEMU's -sandbox is on


def test_monitor_cannot_read_host_secrets(vm: dict[str, object]) -> None:
    """Make QEMU open /etc/shadow as a disk: the kernel refuses the unprivileged uid."""
    with pytest.raises(EngineError, match="Permission denied"):
        qmp.execute(_qmp_sock(vm), "blockdev-add", {
            "driver": "file", "node-name": "stolen", "filename": "/etc/shadow",
            "read-only": True})
    assert instance(VM)["state"] == "running"


def test_other_vmm_uid_cannot_reach_this_instance(vm: dict[str, object]) -> None:
    """Another instance's QEMU (another uid) tries to take over this one's control socket."""
    other = int(str(vm["uid"])) + 4242
    probe = subprocess.run(
        ["python3", "-c", "import socket,sys; s=socket.socket(socket.AF_UNIX);"
         "s.connect(sys.argv[1])", str(_qmp_sock(vm))],
        user=other, group=other, extra_groups=[], capture_output=True, text=True, check=False)
    assert probe.returncode != 0
    assert "Permission denied" in probe.stderr


def test_no_host_channels_are_exposed(vm: dict[str, object]) -> None:
    """Only the devices popek chose: no shared folders, USB, sound, display or host devices."""
    buses = qmp.execute(_qmp_sock(vm), "query-pci")
    ids = {(d["id"]["vendor"], d["id"]["device"]) for bus in buses for d in bus["devices"]}
    virtio = {dev for (vendor, dev) in ids if vendor == 0x1AF4}
    # virtio-serial (0x1003 / 0x1043) and virtio-rng (0x1005 / 0x1044) only
    assert virtio <= {0x1003, 0x1043, 0x1005, 0x1044}, sorted(hex(d) for d in virtio)
    # beyond the chipset (Intel q35) only QEMU's PCIe root ports (1b36:000c), which hold
    # nothing until popek plugs a NIC in
    non_chipset = {(v, d) for (v, d) in ids if v not in (0x1AF4, 0x8086)}
    assert non_chipset <= {(0x1B36, 0x000C)}, non_chipset
    chardevs = {c["label"] for c in qmp.execute(_qmp_sock(vm), "query-chardev")}
    # chrtpm: QEMU's link to the instance's own swtpm (the virtual TPM), nothing of the host's
    assert chardevs <= {"console", "agent", "chrtpm", "compat_monitor0"} | {
        c for c in chardevs if c.startswith("qmp")}


#: x86_64 numbers of the calls that start a process: clone, fork, vfork, execve,
#: execveat, clone3 (QEMU's ``spawn=deny`` set)
SPAWN_SYSCALLS = {56, 57, 58, 59, 322, 435}

#: ``popek launch`` in this process with QEMU's ``spawn=deny`` off, every other
#: option of its sandbox and of the jail unchanged: the control switched off
SPAWN_ALLOWED = (
    "import sys\n"
    "from popek.engines.qemu import cmdline\n"
    "cmdline.SANDBOX = cmdline.SANDBOX.replace(',spawn=deny', '')\n"
    "assert 'spawn' not in cmdline.SANDBOX\n"
    "from popek.cli.entry import main\n"
    "main(sys.argv[1:])\n")


class Kmsg:
    """The kernel log from now on (``/dev/kmsg``), where seccomp kills are audited.

    A seccomp kill is always audited (``kernel.seccomp.actions_logged`` has
    ``kill_process`` by default); with no audit daemon running, as on the
    test hosts, the kernel prints the record to this log.
    """

    def __init__(self) -> None:
        self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(self.fd, 0, os.SEEK_END)
        self.records: list[str] = []

    def read(self) -> list[str]:
        """Return every record logged since this object was made."""
        while True:
            try:
                self.records.append(os.read(self.fd, 8192).decode(errors="replace"))
            except BlockingIOError:
                return self.records
            except BrokenPipeError:  # records overwritten before they were read
                continue

    def close(self) -> None:
        """Stop reading the log."""
        os.close(self.fd)


def _seccomp_kill(records: list[str], pid: int) -> dict[str, str] | None:
    """The audit record (type 1326) of a seccomp kill of ``pid``, as its key=value fields."""
    for record in records:
        text = record.split(";", 1)[-1]
        if "type=1326" not in text:
            continue
        fields = dict(f.split("=", 1) for f in text.split() if "=" in f)
        if fields.get("pid") == str(pid):
            return fields
    return None


def _spawn_probe(info: dict[str, object], marker: Path) -> None:
    """Ask the QEMU of ``info`` to run ``touch MARKER`` (migration to an ``exec:`` URI)."""
    with contextlib.suppress(EngineError):  # QEMU may die before it answers
        qmp.execute(_qmp_sock(info), "migrate", {"uri": f"exec:touch {marker}"})


def test_monitor_cannot_spawn_host_commands(vm: dict[str, object]) -> None:
    """Ask QEMU to run a host command (exec: migration): seccomp kills QEMU, nothing runs.

    The command would touch a marker in the instance directory, which the jail
    binds writable at its own path for QEMU's uid: the one place a spawned
    command could write.  The kernel's audit record of the kill names QEMU's
    pid, SIGSYS and the process-creating call it tried, so the spawn was
    really attempted.  The control (``test_spawn_runs_without_spawn_deny``)
    launches a QEMU without ``spawn=deny``: there the same QMP command creates
    the marker.  With the control off in popek (``cmdline.SANDBOX`` without
    ``spawn=deny``) QEMU survives, the marker appears and this test fails.
    """
    marker = Path(str(vm["workdir"])) / f"popek-pwned-{os.getpid()}"
    marker.unlink(missing_ok=True)
    pid = int(str(vm["pid"]))
    pidfd = os.pidfd_open(pid)
    log = Kmsg()
    try:
        _spawn_probe(vm, marker)
        # a pidfd becomes readable when the process exits: wait for that event
        assert select.select([pidfd], [], [], 10)[0] == [pidfd], "QEMU survived a forbidden spawn"
        wait_for(lambda: _seccomp_kill(log.read(), pid), 10, "the audit record of the kill")
        kill = _seccomp_kill(log.read(), pid)
    finally:
        log.close()
        os.close(pidfd)
    assert kill is not None
    assert kill["sig"] == "31"  # SIGSYS: seccomp's SECCOMP_RET_KILL_PROCESS
    assert int(kill["syscall"]) in SPAWN_SYSCALLS, kill
    assert kill["uid"] == str(vm["uid"])
    assert not marker.exists()
    entry = instance(VM)
    assert entry["state"] == "stopped"
    assert "unexpectedly" in entry["reason"]


@pytest.fixture
def spawning_vm(minimal_image: str) -> Iterator[dict[str, object]]:
    """A VM whose QEMU runs without ``spawn=deny`` (in its jail, as its uid, as usual)."""
    env = {**os.environ, "POPEK_CLI_SERVER": "off"}
    proc = subprocess.run([sys.executable, "-c", SPAWN_ALLOWED, "launch", minimal_image,
                           SPAWNING, "--memory", "256MiB"],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    try:
        assert proc.returncode == 0, proc.stderr
        info = popek_json("info", SPAWNING)
        argv = Path(f"/proc/{info['pid']}/cmdline").read_bytes().split(b"\0")
        sandbox = argv[argv.index(b"-sandbox") + 1].decode()
        assert "spawn" not in sandbox and "elevateprivileges=deny" in sandbox, sandbox
        yield info
    finally:
        popek("delete", "--force", SPAWNING, check=False)


def test_spawn_runs_without_spawn_deny(spawning_vm: dict[str, object]) -> None:
    """The positive control: with ``spawn=deny`` off, the same QMP command runs ``touch``.

    The marker appears in the instance directory, owned by QEMU's uid: the
    probe reaches a place the jail leaves writable, so only the seccomp
    sandbox stops it in ``test_monitor_cannot_spawn_host_commands``.
    """
    marker = Path(str(spawning_vm["workdir"])) / f"popek-pwned-{os.getpid()}"
    marker.unlink(missing_ok=True)
    _spawn_probe(spawning_vm, marker)
    wait_for(marker.exists, 30, "the spawned touch to create the marker")
    assert marker.stat().st_uid == spawning_vm["uid"]
    assert instance(SPAWNING)["state"] == "running"
