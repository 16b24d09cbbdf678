"""A container's writable layer is bounded by ``limits.disk`` (issue 12, point 1).

Real containers on runc through the real CLI.  The attack is a process in
the container writing far past its limit; it must get ENOSPC from its own
file system, while the host's file system and a neighbour container are
untouched.  Before limits.disk, the same ``dd`` landed 1.1 GiB in the
container's upper directory on the host.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import popek, popek_json

CT, NB = "dsk-a", "dsk-b"
LIMIT = 96 << 20
MIB = 1 << 20


def _image(name: str) -> Path:
    return Path(popek_json("info", name)["workdir"]) / "bundle" / "disk.ext4"


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


@pytest.fixture(scope="module")
def cts(minimal_image: str) -> Iterator[None]:
    popek("launch", minimal_image, CT, "--container", "--memory", "64MiB", "--disk", "96MiB")
    popek("launch", minimal_image, NB, "--container", "--memory", "64MiB", "--disk", "96MiB")
    yield
    for name in (CT, NB):
        popek("delete", "--force", name, check=False)


def test_writing_past_the_limit_gets_enospc_and_the_host_is_untouched(
        cts: None, popek_home: Path) -> None:
    image = _image(CT)
    host_before = os.statvfs(popek_home)
    # the attack: 4x the limit, in one file
    r = popek("exec", CT, "--", "sh", "-c",
              "dd if=/dev/zero of=/root/fill bs=1M count=384 2>&1; echo rc=$?", check=False)
    assert "No space left on device" in r.stdout, r.stdout
    written = int(popek("exec", CT, "--", "stat", "-c", "%s", "/root/fill").stdout)
    assert LIMIT // 2 < written <= LIMIT  # it really wrote, up to its own limit
    # the host grew by at most the limit, not by the 384 MiB asked
    assert _allocated(image) <= LIMIT + MIB
    host_after = os.statvfs(popek_home)
    grown = (host_before.f_bfree - host_after.f_bfree) * host_after.f_frsize
    assert grown < LIMIT + 16 * MIB
    # the neighbour writes as before
    popek("exec", NB, "--", "sh", "-c", "dd if=/dev/zero of=/root/mine bs=1M count=32")
    assert popek("exec", NB, "--", "stat", "-c", "%s", "/root/mine").stdout.strip() == str(32 * MIB)
    # info shows the limit and the use
    info = popek_json("info", CT)
    assert info["limits"]["disk"] == LIMIT
    assert info["usage"]["disk_limit"] == LIMIT
    assert info["usage"]["disk_used"] >= written
    assert "limits.disk" in popek("info", CT).stdout
    popek("exec", CT, "--", "rm", "/root/fill")


def test_the_host_keeps_no_mount_per_running_container(cts: None, popek_home: Path) -> None:
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(popek_home) not in mounts
    assert ".ext4" not in mounts


def test_the_limit_changes_with_config_set(cts: None) -> None:
    info = popek_json("info", CT)
    cap_sys_resource = int(_status_field("CapEff"), 16) & (1 << 24)
    r = popek("config", "set", CT, "limits.disk", "128MiB", check=False)
    if cap_sys_resource:  # ext4 grows online
        assert r.returncode == 0, r.stderr
        assert popek_json("info", CT)["usage"]["disk_limit"] == 128 * MIB
    else:  # this host: popek runs without CAP_SYS_RESOURCE; refused, nothing changed
        assert r.returncode != 0
        assert "CAP_SYS_RESOURCE" in r.stderr and "stop it" in r.stderr
        assert r.stderr.count("\n") == 1
        after = popek_json("info", CT)
        assert after["limits"] == info["limits"]
        assert after["usage"]["disk_limit"] == LIMIT
    # shrinking a running container is refused
    r = popek("config", "set", CT, "limits.disk", "64MiB", check=False)
    assert r.returncode != 0 and "stopped" in r.stderr
    popek("stop", CT)
    try:
        popek("config", "set", CT, "limits.disk", "160MiB")
        popek("start", CT)
        assert popek_json("info", CT)["usage"]["disk_limit"] == 160 * MIB
        popek("exec", CT, "--", "sh", "-c", "dd if=/dev/zero of=/root/keep bs=1M count=80")
        popek("stop", CT)
        # smaller than the files: refused, nothing changed
        r = popek("config", "set", CT, "limits.disk", "64MiB", check=False)
        assert r.returncode != 0 and "smaller than what the container's files need" in r.stderr
        assert popek_json("info", CT)["limits"]["disk"] == 160 * MIB
        popek("config", "set", CT, "limits.disk", "136MiB")
    finally:
        popek("start", CT, check=False)
    assert popek_json("info", CT)["usage"]["disk_limit"] == 136 * MIB
    assert popek("exec", CT, "--", "stat", "-c", "%s", "/root/keep").stdout.strip() == \
        str(80 * MIB)


def _status_field(field: str) -> str:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split()[1]
    raise AssertionError(f"{field} not in /proc/self/status")


def test_the_project_default_applies_to_new_containers(cts: None, minimal_image: str) -> None:
    before = popek_json("project", "show", "--format", "json")["default.limits.disk"]
    popek("project", "set", "default", "default.limits.disk=80MiB")
    try:
        popek("launch", minimal_image, "dsk-c", "--container", "--memory", "64MiB")
        assert popek_json("info", "dsk-c")["limits"]["disk"] == 80 * MIB
        assert popek_json("info", CT)["limits"]["disk"] != 80 * MIB  # existing keep theirs
    finally:
        popek("delete", "--force", "dsk-c", check=False)
        popek("project", "set", "default", f"default.limits.disk={before}")


@pytest.mark.parametrize("value, why", [("1KiB", "must be from 64MiB"),
                                        ("lots", "invalid limits.disk")])
def test_bad_limits_are_refused(cts: None, value: str, why: str) -> None:
    r = popek("config", "set", CT, "limits.disk", value, check=False)
    assert r.returncode == 2 and why in r.stderr
    r = popek("project", "set", "default", f"default.limits.disk={value}", check=False)
    assert r.returncode == 2 and why.removeprefix("invalid ") in r.stderr
