"""Attacks from QEMU's seat against its jail: each must find nothing to take.

The threat (survey, section V): a guest that escapes into QEMU and then
reads or writes the host through QEMU's view of the file system, or makes
QEMU consume the host's CPU, memory or tasks.  Like Firecracker's jailer,
popek starts every QEMU in a mount namespace of its own that holds only
QEMU, its libraries and firmware, a minimal /dev, its own processes in
and its instance directory (no /proc); inside a cgroup with the instance's
limits; as the instance's unprivileged uid (see engines/qemu/jail.py).

One guest is booted for the module.  A directory of a neighbour instance
with a secret in it is made beside it first: QEMU must not see it.  The
tests look at QEMU's view from the host (``/proc/PID/root``,
``/proc/PID/mountinfo``), enter QEMU's mount namespace as QEMU's uid with
``nsenter``, and ask QEMU itself to open files over QMP.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import instance, popek, popek_json, require_root_and_tools
from popek import paths, proc
from popek.engines import cgroupfs
from popek.engines.base import LaunchSpec
from popek.engines.qemu import jail, qmp
from popek.errors import EngineError

require_root_and_tools("qemu-system-x86_64", "nsenter", "unshare")

VM = "jailed"
NEIGHBOUR = "neighbour"
VCPUS = 2
MEMORY = 256 << 20


@pytest.fixture(scope="module")
def vm(minimal_image: str, popek_home: Path) -> Iterator[dict[str, object]]:
    neighbour = popek_home / "instances" / "default" / NEIGHBOUR
    neighbour.mkdir(parents=True, exist_ok=True)
    (neighbour / "secret").write_text("the neighbour's secret\n")
    popek("launch", minimal_image, VM, "--vcpus", str(VCPUS), "--memory", f"{MEMORY >> 20}MiB")
    yield popek_json("info", VM)
    popek("delete", "--force", VM, check=False)
    shutil.rmtree(neighbour, ignore_errors=True)


def _pid(vm: dict[str, object]) -> int:
    return int(str(vm["pid"]))


def _root(vm: dict[str, object]) -> Path:
    """QEMU's root directory, seen from the host."""
    return Path(f"/proc/{_pid(vm)}/root")


def _workdir(vm: dict[str, object]) -> Path:
    return Path(str(vm["workdir"]))


def _as_qemu(vm: dict[str, object], script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in QEMU's mount namespace and root, as QEMU's uid and gid."""
    uid = str(vm["uid"])
    return subprocess.run(
        ["nsenter", "--target", str(_pid(vm)), "--mount", "--root", "--wd",
         "--setuid", uid, "--setgid", uid, "--", "/bin/sh", "-c", script],
        capture_output=True, text=True, timeout=30, check=False)


def _open_over_qmp(vm: dict[str, object], path: str) -> str:
    """Make QEMU open ``path`` as a disk; return QEMU's error."""
    node = f"n{abs(hash(path)) % 100000}"
    with pytest.raises(EngineError) as err:
        qmp.execute(_workdir(vm) / "qmp.sock", "blockdev-add", {
            "driver": "file", "node-name": node, "filename": path, "read-only": True})
    return str(err.value)


def test_qemu_runs_unprivileged(vm: dict[str, object]) -> None:
    lines = Path(f"/proc/{_pid(vm)}/status").read_text().splitlines()
    st = {k: v.strip() for k, v in (line.split(":", 1) for line in lines)}
    assert vm["uid"] != 0
    assert all(int(u) == vm["uid"] for u in st["Uid"].split())
    assert all(int(g) == vm["uid"] for g in st["Gid"].split())
    assert st["Groups"] == ""
    assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0
    assert int(st["CapAmb"], 16) == 0 and int(st["CapInh"], 16) == 0
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"


def test_qemu_root_holds_only_what_it_needs(vm: dict[str, object]) -> None:
    """The top of QEMU's file system: system directories, /dev, an empty /etc and the first
    component of the instance directory's path.  No /root, /home, /tmp, /sys, /run, /proc."""
    top = set(os.listdir(_root(vm)))
    expected = {d.name for d in jail.system_dirs()} | {"dev", "etc", _workdir(vm).parts[1]}
    assert top == expected
    for absent in ("root", "home", "tmp", "sys", "run", "proc", "boot", "mnt", "srv", "opt"):
        if absent != _workdir(vm).parts[1]:
            assert not (_root(vm) / absent).exists(), absent


def test_no_host_secrets_in_view(vm: dict[str, object]) -> None:
    root = _root(vm)
    assert not (root / "etc" / "shadow").exists()
    assert os.listdir(root / "etc") == []  # an empty tmpfs ...
    st = (root / "etc").stat()
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700  # ... QEMU cannot enter
    assert not (root / "root").exists()
    assert not (root / "home").exists()


def test_other_instances_are_not_in_view(vm: dict[str, object], popek_home: Path) -> None:
    """Only this instance's directory: no neighbour, no images, no state database."""
    instances = _root(vm) / str(popek_home / "instances" / "default").lstrip("/")
    assert os.listdir(instances) == [VM]
    assert (popek_home / "instances" / "default" / NEIGHBOUR / "secret").exists()  # on the host
    assert not (instances / NEIGHBOUR).exists()
    home = _root(vm) / str(popek_home).lstrip("/")
    assert sorted(os.listdir(home)) == ["instances"]  # no images, state.db, trust, audit
    assert set(os.listdir(_root(vm) / str(_workdir(vm)).lstrip("/"))) >= {
        "qmp.sock", "console.sock", "agent.sock", "console.log"}  # the same paths as outside


def test_dev_is_minimal(vm: dict[str, object]) -> None:
    dev = _root(vm) / "dev"
    expected = ["null", "random", "urandom", "zero"] + (["kvm"] if vm["accel"] == "kvm" else [])
    assert sorted(os.listdir(dev)) == sorted(expected)
    assert all(stat.S_ISCHR((dev / name).stat().st_mode) for name in expected)
    assert not (dev / "net").exists() and not (dev / "vda").exists()


def test_no_way_out_through_a_same_uid_process(vm: dict[str, object]) -> None:
    """A helper running as the instance's uid outside the jail (as swtpm does) is no door.

    Outside the jail, ``/proc/PID/root`` of a process of one's own uid is that process's
    root: the host's.  The jail has no /proc, so QEMU cannot take that path.
    """
    uid = int(str(vm["uid"]))
    helper = subprocess.Popen(["sleep", "120"], user=uid, group=uid, extra_groups=[])
    try:
        door = f"/proc/{helper.pid}/root/etc/hostname"
        outside = subprocess.run(["cat", door], user=uid, group=uid, extra_groups=[],
                                 capture_output=True, text=True, check=False)
        assert outside.returncode == 0  # the door exists for the uid on the host ...
        probe = _as_qemu(vm, f"ls /proc 2>&1; cat {door} 2>&1; echo rc=$?")
        assert "No such file or directory" in probe.stdout  # ... not in QEMU's jail
        assert outside.stdout not in probe.stdout.replace("rc=", "")
        assert probe.stdout.rstrip().endswith("rc=1")
        assert "No such file or directory" in _open_over_qmp(vm, door)
    finally:
        helper.kill()
        helper.wait()


def test_qemu_uid_cannot_open_host_files(vm: dict[str, object], popek_home: Path) -> None:
    neighbour = popek_home / "instances" / "default" / NEIGHBOUR / "secret"
    probe = _as_qemu(vm, f"""
        cat /etc/shadow 2>&1; echo "rc=$?"
        cat /etc/passwd 2>&1; echo "rc=$?"
        ls /root 2>&1; echo "rc=$?"
        cat {neighbour} 2>&1; echo "rc=$?"
        cat {popek_home}/state.db 2>&1; echo "rc=$?"
        ls /sys 2>&1; echo "rc=$?"
        touch /planted 2>&1; echo "rc=$?"
        touch /usr/planted 2>&1; echo "rc=$?"
        touch {_workdir(vm)}/probe && rm {_workdir(vm)}/probe; echo "rc=$?"
    """)
    out = probe.stdout
    assert "/etc/shadow: Permission denied" in out and "/etc/passwd: Permission denied" in out
    assert "/root': No such file or directory" in out or "/root: No such file" in out
    assert f"{neighbour}: No such file or directory" in out
    assert "state.db: No such file or directory" in out
    assert "/sys': No such file or directory" in out or "/sys: No such file" in out
    assert out.count("Read-only file system") == 2  # the jail's root and /usr
    assert out.rstrip().endswith("rc=0")  # its own directory stays writable
    assert "the neighbour's secret" not in out and "root:" not in out


def test_monitor_cannot_open_files_outside_the_jail(vm: dict[str, object],
                                                    popek_home: Path) -> None:
    """QEMU's monitor (what a guest that took over QEMU could do) opens host files as disks."""
    neighbour = popek_home / "instances" / "default" / NEIGHBOUR / "secret"
    assert "Permission denied" in _open_over_qmp(vm, "/etc/shadow")
    for path in (str(neighbour), str(popek_home / "state.db"), "/root/.bashrc",
                 "/proc/1/environ", "/sys/firmware/dmi/tables/DMI", "/dev/vda"):
        assert "No such file or directory" in _open_over_qmp(vm, path), path
    assert instance(VM)["state"] == "running"


def test_jail_mounts(vm: dict[str, object]) -> None:
    """Every mount nosuid, only the instance directory writable, none shared with the host."""
    mounts = []
    for line in Path(f"/proc/{_pid(vm)}/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        mounts.append((fields[4], set(fields[5].split(",")), fields[6:sep], fields[sep + 1]))
    by_target = {m[0]: m for m in mounts}
    assert by_target["/"][3] == "tmpfs" and "ro" in by_target["/"][1]
    for target, opts, optional, _fstype in mounts:
        assert "nosuid" in opts, target
        assert not any(o.startswith("shared:") for o in optional), target  # no propagation
        if "rw" in opts:
            assert target == str(_workdir(vm)) or target.startswith("/dev/"), target
    assert "/proc" not in by_target
    # nothing of the jail was mounted in the host's namespace
    assert str(jail.jail_root()) not in Path("/proc/self/mountinfo").read_text()


def _expected_limits(vm: dict[str, object]) -> cgroupfs.Limits:
    spec = LaunchSpec(VM, _workdir(vm), VCPUS, MEMORY, int(str(vm["uid"])),
                      int(str(vm["uid"])), None)
    return jail.limits(spec, str(vm["accel"]))


def test_qemu_is_in_its_cgroup_with_the_limits(vm: dict[str, object]) -> None:
    pid = _pid(vm)
    lim = _expected_limits(vm)
    rel = f"popek/{paths.home_id()}-default-{VM}"
    assert vm["cgroup"] == rel
    memberships = dict(line.split(":", 2)[1:] for line in
                       Path(f"/proc/{pid}/cgroup").read_text().splitlines())
    root = cgroupfs.ROOT
    if cgroupfs.is_v2():
        assert memberships[""] == f"/{rel}"
        d = root / rel
        assert (d / "cpu.max").read_text().split() == [str(lim.cpu_quota_us), "100000"]
        assert int((d / "memory.max").read_text()) == lim.memory
        assert int((d / "pids.max").read_text()) == lim.pids
        tasks = (d / "cgroup.threads").read_text().split()
    else:
        for controller in ("cpu", "memory", "pids", "blkio"):
            key = next(k for k in memberships if controller in k.split(","))
            assert memberships[key] == f"/{rel}", controller
        assert int((root / "cpu" / rel / "cpu.cfs_quota_us").read_text()) == lim.cpu_quota_us
        assert int((root / "cpu" / rel / "cpu.cfs_period_us").read_text()) == 100_000
        mem = root / "memory" / rel
        assert int((mem / "memory.limit_in_bytes").read_text()) == lim.memory
        if (mem / "memory.memsw.limit_in_bytes").exists():
            assert int((mem / "memory.memsw.limit_in_bytes").read_text()) == lim.memory
        assert int((root / "pids" / rel / "pids.max").read_text()) == lim.pids
        weight = root / "blkio" / rel / "blkio.bfq.weight"
        if weight.exists():
            assert weight.read_text().split()[-1] == "100"
        tasks = (root / "pids" / rel / "tasks").read_text().split()
    # the numbers this guest has: 2 vCPUs + 0.5, 256 MiB + overhead, 2 + 96 tasks
    assert lim.cpu_quota_us == 250_000 and lim.pids == VCPUS + jail.PIDS_EXTRA
    assert lim.memory >= MEMORY + jail.MEMORY_OVERHEAD_MIN
    # every thread of QEMU, and nothing else
    assert sorted(tasks) == sorted(os.listdir(f"/proc/{pid}/task"))


def test_stop_removes_the_cgroup_and_the_namespace(vm: dict[str, object]) -> None:
    pid = _pid(vm)
    started = proc.start_time(pid)
    dirs = cgroupfs.dirs(f"popek/{paths.home_id()}-default-{VM}")
    assert dirs and all(d.is_dir() for d in dirs)
    popek("stop", VM, "--force")
    assert started is not None and not proc.alive(pid, started)  # gone (or a zombie)
    assert not any(d.exists() for d in dirs)
    popek("start", VM)  # and a new jail and cgroup on the next start
    again = popek_json("info", VM)
    assert all(d.is_dir() for d in dirs)
    assert not (_root(again) / "etc" / "shadow").exists()
    assert os.listdir(_root(again) / str(_workdir(again).parent).lstrip("/")) == [VM]
