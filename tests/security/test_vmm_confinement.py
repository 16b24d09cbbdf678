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
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import instance, popek, popek_json
from popek.engines.qemu import qmp
from popek.errors import EngineError

VM = "confined"


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


def test_monitor_cannot_spawn_host_commands(vm: dict[str, object]) -> None:
    """Ask QEMU to run a host command (exec: migration): seccomp kills QEMU, nothing runs."""
    marker = Path(f"/var/tmp/popek-pwned-{os.getpid()}")
    marker.unlink(missing_ok=True)
    pid = int(str(vm["pid"]))
    with contextlib.suppress(EngineError):  # QEMU may die before it answers
        qmp.execute(_qmp_sock(vm), "migrate", {"uri": f"exec:touch {marker}"})
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists(), "QEMU survived a forbidden spawn"
    assert not marker.exists()
    entry = instance(VM)
    assert entry["state"] == "stopped"
    assert "unexpectedly" in entry["reason"]
