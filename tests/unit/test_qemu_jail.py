"""The QEMU jail's pure parts: limits, cgroup settings, mount plan, fstab, launcher argv.

No root and no QEMU: cgroup files are written into fake hierarchies under tmp_path.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from popek import paths, proc
from popek.engines import cgroupfs
from popek.engines.base import LaunchSpec
from popek.engines.qemu import jail
from popek.errors import EngineError

MIB = 1 << 20
GIB = 1 << 30
WORKDIR = Path("/var/lib/popek/instances/default/vm1")


def _spec(vcpus: int = 1, memory: int = 256 * MIB, limits: dict[str, int] | None = None,
          workdir: Path = WORKDIR) -> LaunchSpec:
    return LaunchSpec("vm1", workdir, vcpus, memory, 900000000, 900000000, None,
                      limits=limits or {})


# -- limits ------------------------------------------------------------------


def test_tcg_memory_limit_counts_the_translation_cache() -> None:
    lim = jail.limits(_spec(memory=256 * MIB), "tcg", physmem=24 * GIB)
    # guest RAM + the 128 MiB floor of the overhead + QEMU's 1 GiB TCG code buffer
    assert lim.memory == 256 * MIB + 128 * MIB + 1 * GIB


def test_kvm_memory_overhead_is_a_quarter_of_large_guests() -> None:
    lim = jail.limits(_spec(memory=4 * GIB), "kvm", physmem=24 * GIB)
    assert lim.memory == 4 * GIB + 1 * GIB  # no translation cache under KVM
    assert jail.limits(_spec(memory=256 * MIB), "kvm").memory == 256 * MIB + 128 * MIB


@pytest.mark.parametrize(("physmem", "expected"), [
    (24 * GIB, 1 * GIB),   # capped at 1 GiB
    (4 * GIB, 512 * MIB),  # 1/8 of host RAM
    (0, 1 * GIB),          # unknown host RAM: QEMU's default
])
def test_tcg_code_buffer_follows_qemu(physmem: int, expected: int) -> None:
    assert jail.tcg_code_buffer(physmem) == expected


def test_cpu_quota_is_the_vcpus_plus_a_margin() -> None:
    lim = jail.limits(_spec(vcpus=2), "tcg", physmem=8 * GIB)
    assert lim.cpus == 2.5
    assert lim.cpu_quota_us == 250_000
    assert cgroupfs.Limits(0.001, 1, 1).cpu_quota_us == 1000  # the kernel's minimum


def test_pids_default_and_override_with_a_floor() -> None:
    assert jail.limits(_spec(vcpus=2), "kvm").pids == 2 + jail.PIDS_EXTRA
    assert jail.limits(_spec(vcpus=2, limits={"pids": 500}), "kvm").pids == 500
    # below what QEMU needs for its vCPUs and main threads: raised to the floor
    assert jail.limits(_spec(vcpus=4, limits={"pids": 16}), "kvm").pids == 4 + jail.PIDS_FLOOR


def test_cgroup_path_is_per_home_project_and_name(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "a"))
    in_a = jail.cgroup_path(_spec())
    assert in_a == f"popek/{paths.home_id()}-default-vm1"
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "b"))
    assert jail.cgroup_path(_spec()) != in_a  # before: popek/default-vm1 in every home


# -- cgroup settings and layouts -------------------------------------------------


def test_v1_settings() -> None:
    s = {(x.controller, x.file): (x.value, x.required)
         for x in cgroupfs.v1_settings(cgroupfs.Limits(1.5, 512 * MIB, 97))}
    assert s[("cpu", "cpu.cfs_period_us")] == ("100000", True)
    assert s[("cpu", "cpu.cfs_quota_us")] == ("150000", True)
    assert s[("memory", "memory.limit_in_bytes")] == (str(512 * MIB), True)
    assert s[("memory", "memory.memsw.limit_in_bytes")] == (str(512 * MIB), False)  # no swap
    assert s[("pids", "pids.max")] == ("97", True)
    assert s[("blkio", "blkio.bfq.weight")] == ("100", False)
    assert s[("blkio", "blkio.weight")] == ("500", False)  # CFQ's scale: 500 is its default


def test_v2_settings() -> None:
    s = {x.file: (x.value, x.required)
         for x in cgroupfs.v2_settings(cgroupfs.Limits(2.5, 1 * GIB, 98))}
    assert s["cpu.max"] == ("250000 100000", True)
    assert s["memory.max"] == (str(GIB), True)
    assert s["memory.swap.max"] == ("0", False)
    assert s["pids.max"] == ("98", True)
    assert s["io.weight"] == ("default 100", False)


def _fake_v1(root: Path, comounted: bool = False) -> None:
    for c in ("memory", "pids", "blkio", "freezer"):
        (root / c).mkdir(parents=True)
    if comounted:
        (root / "cpu,cpuacct").mkdir()
        (root / "cpu").symlink_to("cpu,cpuacct")
        (root / "cpuacct").symlink_to("cpu,cpuacct")
    else:
        (root / "cpu").mkdir()
        (root / "cpuacct").mkdir()


def _fake_v2(root: Path) -> None:
    root.mkdir(exist_ok=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    (root / "popek").mkdir()
    (root / "popek" / "cgroup.controllers").write_text("cpu io memory pids\n")
    (root / "popek" / "cgroup.subtree_control").write_text("")


def test_layout_detection(tmp_path: Path) -> None:
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    _fake_v1(v1)
    (v1 / "unified").mkdir()  # hybrid: a v2 mount beside the v1 hierarchies
    _fake_v2(v2)
    assert not cgroupfs.is_v2(v1) and cgroupfs.is_v2(v2)


def test_create_v1_writes_every_hierarchy_and_joins_by_tasks(tmp_path: Path) -> None:
    _fake_v1(tmp_path)
    leaf = tmp_path / "memory" / "popek" / "default-vm1"
    leaf.mkdir(parents=True)
    (leaf / "memory.memsw.limit_in_bytes").write_text("9223372036854771712")  # swap accounting on
    join = cgroupfs.create("popek/default-vm1", cgroupfs.Limits(1.5, 512 * MIB, 97), tmp_path)
    assert sorted(p.parent.parent.parent.name for p in join) == [
        "blkio", "cpu", "cpuacct", "memory", "pids"]
    assert all(p.name == "tasks" for p in join)  # a thread moving itself: no global lock
    d = "popek/default-vm1"
    assert (tmp_path / "cpu" / d / "cpu.cfs_quota_us").read_text() == "150000"
    assert (tmp_path / "memory" / d / "memory.limit_in_bytes").read_text() == str(512 * MIB)
    assert (tmp_path / "memory" / d / "memory.memsw.limit_in_bytes").read_text() == str(512 * MIB)
    assert (tmp_path / "pids" / d / "pids.max").read_text() == "97"
    # the kernel offers neither weight file here (no proportional I/O scheduler): skipped
    assert not (tmp_path / "blkio" / d / "blkio.weight").exists()
    assert not (tmp_path / "freezer" / d).exists()  # only the controllers popek limits


def test_create_v1_comounted_cpu_cpuacct_once(tmp_path: Path) -> None:
    _fake_v1(tmp_path, comounted=True)
    join = cgroupfs.create("popek/x", cgroupfs.Limits(1, 256 * MIB, 20), tmp_path)
    assert len(join) == 4  # cpu,cpuacct + memory + pids + blkio
    assert len(cgroupfs.dirs("popek/x", tmp_path)) == 4


def test_create_v1_without_a_required_controller_is_refused(tmp_path: Path) -> None:
    _fake_v1(tmp_path)
    (tmp_path / "pids").rmdir()
    with pytest.raises(EngineError, match="pids not mounted"):
        cgroupfs.create("popek/x", cgroupfs.Limits(1, 256 * MIB, 20), tmp_path)


def test_create_v2_enables_controllers_and_joins_by_procs(tmp_path: Path) -> None:
    _fake_v2(tmp_path)
    join = cgroupfs.create("popek/default-vm1", cgroupfs.Limits(2.5, GIB, 98), tmp_path)
    leaf = tmp_path / "popek" / "default-vm1"
    assert join == [leaf / "cgroup.procs"]
    assert (leaf / "cpu.max").read_text() == "250000 100000"
    assert (leaf / "memory.max").read_text() == str(GIB)
    assert (leaf / "pids.max").read_text() == "98"
    # a fake file keeps the last write: every controller was enabled, io last
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+io"
    assert (tmp_path / "popek" / "cgroup.subtree_control").read_text() == "+io"


def test_remove_is_idempotent(tmp_path: Path) -> None:
    _fake_v1(tmp_path)
    for c in ("cpu", "memory", "pids"):
        (tmp_path / c / "popek" / "gone").mkdir(parents=True)
    cgroupfs.remove("popek/gone", tmp_path)
    assert not any((tmp_path / c / "popek" / "gone").exists() for c in ("cpu", "memory", "pids"))
    cgroupfs.remove("popek/gone", tmp_path)  # already gone: fine
    assert cgroupfs.procs("popek/gone", tmp_path) == []


def test_kill_only_the_selected_processes(tmp_path: Path) -> None:
    """A stray of this instance dies; a process of another home in the same-named cgroup lives."""
    _fake_v1(tmp_path)
    d = tmp_path / "cpu" / "popek" / "x"
    d.mkdir(parents=True)
    ours, theirs = (subprocess.Popen(["sleep", "60"]) for _ in range(2))
    try:
        (d / "cgroup.procs").write_text(f"{ours.pid}\n{theirs.pid}\n")
        # a fake cgroup.procs keeps listing the dead: select only living processes
        cgroupfs.kill("popek/x", tmp_path, timeout=5,
                      only=lambda pid: pid == ours.pid and proc.start_time(pid) is not None)
        assert ours.wait(timeout=5) == -signal.SIGKILL
        assert theirs.poll() is None
        with pytest.raises(EngineError, match="still run in it"):
            cgroupfs.remove("popek/x", tmp_path)  # refused at once, no waiting
    finally:
        theirs.kill()
        theirs.wait()


# -- mount plan --------------------------------------------------------------------


def _host(tmp_path: Path) -> Path:
    root = tmp_path / "host"
    for d in ("usr/lib", "usr/lib64", "usr/bin", "etc", "root", "home", "tmp", "var", "srv"):
        (root / d).mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")
    (root / "lib64").symlink_to("usr/lib64")
    (root / "bin").symlink_to("usr/bin")
    return root


def test_plan_holds_only_what_qemu_needs(tmp_path: Path) -> None:
    plan = jail.mount_plan(WORKDIR, kvm=False, host_root=_host(tmp_path))
    targets = [m.target for m in plan]
    assert plan[0] == jail.Mount("tmpfs", "/", "tmpfs", plan[0].options)  # a fresh, empty root
    assert plan[-1].options[:2] == ("remount", "ro")                     # read-only at the end
    binds = {m.target: m for m in plan if "bind" in m.options}
    # the host's system directories that exist (no sbin on this fake host), read-only
    for d in ("/usr", "/lib", "/lib64", "/bin"):
        assert binds[d].source == d and "ro" in binds[d].options
    assert "/sbin" not in binds
    # the instance directory at its own path, writable, and nothing else of the host's
    assert binds[str(WORKDIR)].source == str(WORKDIR) and "ro" not in binds[str(WORKDIR)].options
    sources = {m.source for m in plan}
    for secret in ("/etc", "/etc/shadow", "/root", "/home", "/tmp", "/var/lib/popek",
                   "/var/lib/popek/instances", "/sys", "/run", "/dev", "/proc"):
        assert secret not in sources
    assert not any(t.startswith(("/root", "/home", "/tmp", "/sys", "/run", "/proc"))
                   for t in targets)
    # /etc is an empty tmpfs only root may enter
    etc = next(m for m in plan if m.target == "/etc")
    assert etc.fstype == "tmpfs" and "mode=0700" in etc.options and "ro" in etc.options
    # every mount is nosuid; every bind is private (no propagation to or from the host)
    assert all("nosuid" in m.options for m in plan)
    assert all("private" in m.options for m in binds.values())


def test_plan_dev_and_proc(tmp_path: Path) -> None:
    host = _host(tmp_path)
    tcg = jail.mount_plan(WORKDIR, kvm=False, host_root=host)
    kvm = jail.mount_plan(WORKDIR, kvm=True, host_root=host)

    def devices(plan: list[jail.Mount]) -> list[str]:
        return sorted(m.target for m in plan if m.target.startswith("/dev/"))

    assert devices(tcg) == ["/dev/null", "/dev/random", "/dev/urandom", "/dev/zero"]
    assert devices(kvm) == ["/dev/kvm", "/dev/null", "/dev/random", "/dev/urandom", "/dev/zero"]
    assert all(m.source == m.target for m in tcg if m.target.startswith("/dev/"))
    assert "/dev/net/tun" not in devices(kvm)  # taps are passed as descriptors
    # no /proc: its /proc/PID/root links would lead out through any same-uid process
    assert not any(m.fstype == "proc" or m.target.startswith("/proc") for m in tcg + kvm)


def test_plan_refuses_workdirs_qemu_would_share(tmp_path: Path) -> None:
    host = _host(tmp_path)
    with pytest.raises(EngineError, match="under /usr"):
        jail.mount_plan(Path("/usr/local/popek/instances/default/vm1"), False, host_root=host)
    with pytest.raises(EngineError, match="absolute"):
        jail.mount_plan(Path("instances/vm1"), False, host_root=host)


def test_plan_binds_a_qemu_outside_the_system_directories(tmp_path: Path) -> None:
    plan = jail.mount_plan(WORKDIR, False, qemu="/opt/qemu/bin/qemu-system-x86_64",
                           host_root=_host(tmp_path))
    opt = next(m for m in plan if m.target == "/opt/qemu")
    assert opt.source == "/opt/qemu" and "ro" in opt.options


def test_fstab_escapes_and_roots_every_target(tmp_path: Path) -> None:
    workdir = Path("/srv/my popek/instances/default/vm1")
    plan = jail.mount_plan(workdir, False, host_root=_host(tmp_path))
    text = jail.fstab(plan, Path("/run/popek/jail/root"))
    lines = text.splitlines()
    assert len(lines) == len(plan)
    assert all(len(line.split()) == 6 for line in lines)  # the space is escaped
    assert "/srv/my\\040popek/instances/default/vm1 /run/popek/jail/root/srv/my\\040popek/" \
        "instances/default/vm1 none" in text
    assert lines[0].startswith("tmpfs /run/popek/jail/root tmpfs ")
    assert all(line.split()[1].startswith("/run/popek/jail/root") for line in lines)


# -- launcher ----------------------------------------------------------------------


def test_launcher_argv() -> None:
    qemu = ["/usr/bin/qemu-system-x86_64", "-name", "guest=vm1", "-append", "a b 'c'"]
    join = [Path("/sys/fs/cgroup/cpu/popek/default-vm1/tasks"),
            Path("/sys/fs/cgroup/memory/popek/default-vm1/tasks")]
    argv = jail.launcher_argv(qemu, 900000000, 900000000, [], join, Path("/j"))
    assert argv[:5] == ["unshare", "--mount", "--propagation", "slave", "--"]
    assert argv[5:8] == ["sh", "-c", jail.SCRIPT]
    assert argv[8:12] == ["popek-jail", "2", str(join[0]), str(join[1])]
    i = argv.index("chroot")
    # numeric ids (+N: never looked up), no supplementary group, into the jail, then detach
    assert argv[i:i + 7] == ["chroot", "--userspec=+900000000:+900000000", "--groups=", "/j",
                             "setsid", "--fork", qemu[0]]
    assert argv[-len(qemu):] == qemu  # QEMU's argv untouched (it is what was measured)
    with_kvm = jail.launcher_argv(qemu, 5, 5, [104], join, Path("/j"))
    assert "--groups=+104" in with_kvm


def test_launcher_script_joins_before_anything_else() -> None:
    lines = jail.SCRIPT.splitlines()
    assert lines[0] == "set -e"  # a failed join or mount stops the launch
    join = next(i for i, line in enumerate(lines) if "echo 0" in line)
    mount = next(i for i, line in enumerate(lines) if line.startswith("mount "))
    run = next(i for i, line in enumerate(lines) if line.startswith("exec "))
    assert join < mount < run
    assert "umask 077" in lines[run - 1]


@pytest.mark.skipif(os.geteuid() != 0, reason="the jail's host directories must be root's")
def test_prepare_host(tmp_path: Path) -> None:
    base = tmp_path / "popek" / "jail"
    jail.prepare_host(base)
    jail.prepare_host(base)  # idempotent
    assert sorted(os.listdir(base)) == ["dev", "dev-kvm", "root"]
    assert sorted(os.listdir(base / "dev")) == ["null", "random", "urandom", "zero"]
    assert sorted(os.listdir(base / "dev-kvm")) == ["kvm", "null", "random", "urandom", "zero"]
    assert os.listdir(base / "root") == []
    assert all((base / d).stat().st_mode & 0o777 == 0o755 for d in ("dev", "dev-kvm", "root"))
