"""The OCI spec popek writes for a container, and cgroup usage on v1 and v2 layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from popek.engines.container import cgroups, runtime
from popek.engines.container.spec import ID_RANGE, Limits, build_spec
from popek.errors import InvalidInput


def _spec() -> dict:  # type: ignore[type-arg]
    return build_spec(hostname="c1", args=["/sbin/init"], env=["A=1"], cwd="/",
                      host_uid=1_000_065_536, host_gid=1_000_065_536,
                      limits=Limits(memory=128 << 20, cpus=1.5, pids=100),
                      cgroups_path="/popek/default-c1", binds=(("/srv/x", "/mnt", True),))


def test_user_namespace_maps_root_to_the_range() -> None:
    linux = _spec()["linux"]
    assert {n["type"] for n in linux["namespaces"]} == {
        "pid", "network", "ipc", "uts", "mount", "user", "cgroup"}
    assert linux["uidMappings"] == [{"containerID": 0, "hostID": 1_000_065_536,
                                     "size": ID_RANGE}]
    assert linux["gidMappings"][0]["hostID"] == 1_000_065_536


def test_dangerous_capabilities_are_dropped() -> None:
    caps = _spec()["process"]["capabilities"]
    for kind in ("bounding", "effective", "permitted"):
        for cap in ("CAP_SYS_ADMIN", "CAP_SYS_MODULE", "CAP_SYS_BOOT", "CAP_SYS_TIME",
                    "CAP_SYS_PTRACE", "CAP_MKNOD", "CAP_NET_ADMIN", "CAP_NET_RAW",
                    "CAP_DAC_READ_SEARCH", "CAP_SYS_RAWIO", "CAP_BPF"):
            assert cap not in caps[kind]
    assert "inheritable" not in caps and "ambient" not in caps
    assert _spec()["process"]["noNewPrivileges"] is True


def test_seccomp_masks_devices_and_limits() -> None:
    linux = _spec()["linux"]
    names = {n for rule in linux["seccomp"]["syscalls"] for n in rule["names"]}
    assert {"init_module", "kexec_load", "bpf", "mount", "reboot", "ptrace",
            "clock_settime", "keyctl"} <= names
    assert "/proc/kcore" in linux["maskedPaths"] and "/proc/sys" in linux["readonlyPaths"]
    assert {d["path"] for d in linux["devices"]} == {
        "/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty"}
    res = linux["resources"]
    assert res["devices"][0] == {"allow": False, "access": "rwm"}
    assert res["memory"] == {"limit": 128 << 20, "swap": 128 << 20}
    assert res["cpu"] == {"quota": 150_000, "period": 100_000}
    assert res["pids"] == {"limit": 100}
    assert linux["cgroupsPath"] == "/popek/default-c1"


def test_bind_mounts_are_nosuid_nodev() -> None:
    bind = next(m for m in _spec()["mounts"] if m["type"] == "bind")
    assert bind["source"] == "/srv/x" and bind["destination"] == "/mnt"
    assert {"nosuid", "nodev", "ro"} <= set(bind["options"])


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_usage_on_cgroup_v1(tmp_path: Path) -> None:
    _tree(tmp_path, {
        "memory/popek/c/memory.usage_in_bytes": "1048576\n",
        "memory/popek/c/memory.limit_in_bytes": "134217728\n",
        "pids/popek/c/pids.current": "3\n", "pids/popek/c/pids.max": "max\n",
        "cpuacct/popek/c/cpuacct.usage": "2500000000\n"})
    assert not cgroups.is_v2(tmp_path)
    u = cgroups.usage("/popek/c", tmp_path)
    assert (u.memory, u.memory_limit, u.pids, u.pids_limit, u.cpu_seconds) == (
        1 << 20, 128 << 20, 3, None, 2.5)


def test_usage_on_cgroup_v2(tmp_path: Path) -> None:
    _tree(tmp_path, {
        "cgroup.controllers": "cpu memory pids io\n",
        "popek/c/memory.current": "2097152\n", "popek/c/memory.max": "max\n",
        "popek/c/pids.current": "5\n", "popek/c/pids.max": "64\n",
        "popek/c/cpu.stat": "usage_usec 1500000\nuser_usec 1000000\n"})
    assert cgroups.is_v2(tmp_path)
    u = cgroups.usage("/popek/c", tmp_path)
    assert (u.memory, u.memory_limit, u.pids, u.pids_limit, u.cpu_seconds) == (
        2 << 20, None, 5, 64, 1.5)


def test_unknown_runtime() -> None:
    with pytest.raises(InvalidInput, match="allowed: auto, runc, crun"):
        runtime.choose("docker")


def test_nofile_bounds_the_files_of_a_whole_container() -> None:
    """RLIMIT_NOFILE x pids stays under min(2^18, file-max / 8): 1024 tasks get 256 files each."""
    from popek.engines.container import spec

    file_max = 2_466_097  # this build host's fs.file-max (24 GiB of RAM)
    assert spec.nofile(1024, file_max) == 256 and spec.nofile(64, file_max) == 4096
    assert spec.nofile(100, 400_000) == 500  # a small host: 1/8 of its file-max
    assert spec.nofile(16, 1 << 62) == 16384  # systemd's huge file-max: the 2^18 budget
    assert spec.nofile(1, 1 << 62) == spec.NOFILE_MAX
    assert spec.nofile(4_194_304, file_max) == spec.NOFILE_MIN
    for pids in (16, 100, 1024, 4096):
        assert pids * spec.nofile(pids, file_max) <= min(1 << 18, file_max // 8)
    limit = _spec()["process"]["rlimits"][0]
    assert limit["type"] == "RLIMIT_NOFILE"
    assert limit["soft"] == limit["hard"] == spec.nofile(100)


def test_ping_group_range_is_the_containers_gids() -> None:
    assert _spec()["linux"]["sysctl"] == {"net.ipv4.ping_group_range": f"0 {ID_RANGE - 1}"}
