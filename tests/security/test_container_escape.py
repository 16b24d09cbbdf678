"""Attacks from inside a system container: each must fail.

The attacker is root inside a popek container.  The container shares one
host directory (``--mount``) through which the tests hand it a static attack
tool built from tests/security/attacks/escape.c.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import container_cgroup, instance, popek, popek_json, wait_for

CT = "attacker"
NEIGHBOUR = "neighbour"
ATTACKS = Path(__file__).parent / "attacks" / "escape.c"


@pytest.fixture(scope="module")
def share() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="popek-share-", dir="/var/tmp"))
    d.chmod(0o777)  # writable by the container's mapped root
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the attack tool")
    subprocess.run(["gcc", "-static", "-O2", "-o", str(d / "escape"), str(ATTACKS)], check=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def ct(minimal_image: str, share: Path, channel_label: str) -> Iterator[dict[str, object]]:
    # sharing a host directory is a host channel: the policy must grant it to the label
    popek("launch", minimal_image, CT, "--container", "--memory", "64MiB", "--pids", "64",
          "--mount", f"{share}:/share", "--label", channel_label)
    yield popek_json("info", CT)
    popek("delete", "--force", CT, check=False)


@pytest.fixture(scope="module")
def neighbour(minimal_image: str) -> Iterator[str]:
    popek("launch", minimal_image, NEIGHBOUR, "--container", "--memory", "64MiB")
    yield NEIGHBOUR
    popek("delete", "--force", NEIGHBOUR, check=False)


def sh(name: str, script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return popek("exec", name, "--", "sh", "-c", script, check=False, timeout=timeout)


def attack(*args: str) -> str:
    return sh(CT, "/share/escape " + " ".join(args)).stdout.strip()


def test_host_processes_not_visible(ct: dict[str, object]) -> None:
    out = sh(CT, "ps -o pid,comm").stdout
    assert "pytest" not in out and "qemu" not in out and "python" not in out
    pids = [line.split()[0] for line in out.strip().splitlines()[1:]]
    assert "1" in pids and len(pids) < 8  # init, the shell, ps: nothing of the host
    # a host pid, by number, is not reachable either
    assert sh(CT, f"kill -0 {os.getpid()}").returncode != 0


def test_mount_fails(ct: dict[str, object]) -> None:
    proc = sh(CT, "mkdir -p /mnt/x && mount -t tmpfs none /mnt/x")
    assert proc.returncode != 0
    assert "not permitted" in proc.stderr.lower() or "denied" in proc.stderr.lower()
    assert sh(CT, "mount -o remount,rw /sys").returncode != 0


def test_module_loading_fails(ct: dict[str, object]) -> None:
    assert attack("init-module") == "init-module: EPERM"
    assert sh(CT, "insmod /bin/busybox").returncode != 0


def test_reboot_fails(ct: dict[str, object]) -> None:
    proc = sh(CT, "reboot -f; echo still-here")
    assert "still-here" in proc.stdout
    time.sleep(0.5)
    assert instance(CT)["state"] == "running"
    assert sh(CT, "true").returncode == 0


def test_setting_the_clock_fails(ct: dict[str, object]) -> None:
    before = time.time()
    proc = sh(CT, "date -s '2001-01-01 00:00:00'")
    assert "not permitted" in proc.stderr  # busybox date reports it but exits 0
    assert sh(CT, "date +%Y").stdout.strip() != "2001"
    assert abs(time.time() - before) < 60  # the host clock did not move


def test_mknod_fails(ct: dict[str, object]) -> None:
    for node in ("mknod /tmp/sda b 8 0", "mknod /tmp/kvm c 10 232", "mknod /tmp/mem c 1 1"):
        proc = sh(CT, node)
        assert proc.returncode != 0, node


def test_kvm_and_host_disks_not_reachable(ct: dict[str, object]) -> None:
    out = sh(CT, "ls /dev").stdout.split()
    assert "kvm" not in out and not any(d.startswith(("sd", "vd", "nvme", "mem")) for d in out)
    assert attack("open", "/dev/kvm") == "open: ENOENT"
    disks = [d for d in ("/dev/vda", "/dev/sda", "/dev/nvme0n1") if Path(d).exists()]
    for disk in disks:
        assert attack("open", disk).startswith("open: E")


def test_ptrace_fails(ct: dict[str, object]) -> None:
    assert attack("ptrace-pid", str(os.getpid())) == "ptrace-pid: EPERM"
    assert attack("ptrace-pid", "1") == "ptrace-pid: EPERM"
    assert attack("ptrace-child") == "ptrace-child: EPERM"


def test_nested_user_namespace_fails(ct: dict[str, object]) -> None:
    assert attack("unshare-user") == "unshare-user: EPERM"


def test_bind_mount_file_is_owned_by_the_mapped_uid(ct: dict[str, object], share: Path) -> None:
    assert sh(CT, "echo secret > /share/written-by-root && id -u").stdout.strip() == "0"
    st = (share / "written-by-root").stat()
    assert st.st_uid == ct["uid"] and st.st_uid >= 1_000_000_000  # not host root
    assert st.st_gid == ct["uid"]


def _responsive(timeout: float = 5.0) -> float:
    t0 = time.monotonic()
    subprocess.run(["true"], check=True, timeout=timeout)
    return time.monotonic() - t0


def test_fork_bomb_stopped_by_pids_limit(ct: dict[str, object], neighbour: str) -> None:
    pids = container_cgroup(CT, "pids")
    sh(CT, "(f() { f | f & }; f) >/dev/null 2>&1 &", timeout=30)
    try:
        wait_for(lambda: int((pids / "pids.current").read_text()) >= 60, 20, "the bomb to grow")
        time.sleep(2)
        assert int((pids / "pids.current").read_text()) <= 64
        assert _responsive() < 2.0  # the host still forks at once
        t0 = time.monotonic()
        assert popek("exec", neighbour, "--", "echo", "alive").stdout == "alive\n"
        assert time.monotonic() - t0 < 10
    finally:
        popek("restart", "--force", CT)
    assert sh(CT, "echo recovered").stdout == "recovered\n"


def test_memory_hog_killed_by_its_limit(ct: dict[str, object], neighbour: str) -> None:
    hog = sh(CT, "x=0123456789abcdef; while :; do x=$x$x; done", timeout=120)
    assert hog.returncode in (137, -9) or hog.returncode > 128, hog
    usage = popek_json("info", CT)["usage"]
    assert usage["memory"] <= 64 << 20
    assert popek("exec", neighbour, "--", "echo", "alive").stdout == "alive\n"
    assert instance(NEIGHBOUR)["state"] == "running"
