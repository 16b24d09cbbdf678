"""Configuration as incus has it, on a real container: ``launch -c/-p``, ``config``, profiles.

The limits a launch gets from two profiles, a shorthand option and ``-c`` are read
where the kernel holds them (the container's memory and pids cgroups, and the CPUs
``nproc`` sees inside); ``config set`` of several keys changes them all or none,
``config unset`` falls back to the profile; a profile in use cannot be deleted; every
profile operation is in the audit log.  The tests share one container and run in order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from framework import container_cgroup, popek, popek_json

CT = "hcfg-ct"
SMALL, TWO = "hcfg-small", "hcfg-two"


def memory_limit(name: str) -> int:
    """The memory limit the kernel enforces on container ``name`` (cgroup v1 or v2)."""
    cg = container_cgroup(name, "memory")
    path = cg / "memory.limit_in_bytes"
    return int((path if path.exists() else cg / "memory.max").read_text())


def pids_limit(name: str) -> int:
    return int((container_cgroup(name, "pids") / "pids.max").read_text())


def cpus_inside(name: str) -> int:
    return int(popek("exec", name, "--", "nproc").stdout)


@pytest.fixture(scope="module")
def ct(minimal_image: str) -> Iterator[str]:
    popek("profile", "create", SMALL, "-c", "limits.memory=96MiB", "-c", "limits.cpu=1",
          "-c", "limits.pids=300", "--description", "small containers")
    popek("profile", "create", TWO, "--config", "limits.cpu=2")
    # the profiles in order (TWO's cpu wins over SMALL's), --memory, then -c over --memory
    popek("launch", minimal_image, CT, "--container", "-p", SMALL, "-p", TWO,
          "--memory", "200MiB", "-c", "limits.memory=112MiB")
    yield CT
    popek("delete", "--force", CT, check=False)
    for p in (SMALL, TWO):
        popek("profile", "delete", p, check=False)


def test_launch_applies_profiles_then_options_then_c(ct: str) -> None:
    assert memory_limit(ct) == 112 << 20
    assert cpus_inside(ct) == 2
    assert pids_limit(ct) == 300
    shown = popek_json("config", "show", ct)
    assert {k: shown[k] for k in ("limits.memory", "limits.cpu", "limits.pids")} == {
        "limits.memory": "112MiB", "limits.cpu": "2", "limits.pids": "300"}
    assert shown["profiles"] == [SMALL, TWO]
    assert popek("config", "get", ct, "limits.memory").stdout == "112MiB\n"


@pytest.mark.parametrize(("args", "message"), [
    (["-c", "limits.gpu=1"], "unknown key 'limits.gpu'; allowed: limits.memory, limits.cpu"),
    (["-c", "limits.memory=lots"], "invalid limits.memory 'lots'"),
    (["-c", "limits.memory"], "invalid -c 'limits.memory': use KEY=VALUE"),
    (["-p", "hcfg-ghost"], "profile 'hcfg-ghost' not found"),
])
def test_a_bad_key_value_or_profile_creates_nothing(ct: str, minimal_image: str,
                                                    args: list[str], message: str) -> None:
    proc = popek("launch", minimal_image, "hcfg-bad", "--container", *args, check=False)
    assert proc.returncode not in (0, 1, 70) and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "hcfg-bad" not in [i["name"] for i in popek_json("list")]


def test_config_set_of_several_keys_at_once_all_or_none(ct: str) -> None:
    popek("config", "set", ct, "limits.memory=128MiB", "limits.pids=400")
    assert (memory_limit(ct), pids_limit(ct)) == (128 << 20, 400)
    before = popek("config", "show", ct, "--format", "json").stdout
    proc = popek("config", "set", ct, "limits.memory=144MiB", "limits.pids=3", check=False)
    assert proc.returncode == 2 and "from 16 to" in proc.stderr, proc.stderr
    assert (memory_limit(ct), pids_limit(ct)) == (128 << 20, 400)  # neither key applied
    assert popek("config", "show", ct, "--format", "json").stdout == before


def test_config_unset_falls_back_to_the_profile(ct: str) -> None:
    popek("config", "unset", ct, "limits.memory")
    assert memory_limit(ct) == 96 << 20  # SMALL's: TWO says nothing of memory
    assert popek("config", "get", ct, "limits.memory").stdout == "96MiB\n"


def test_profiles_are_shown_and_one_in_use_is_not_deleted(ct: str) -> None:
    listed = {p["name"]: p for p in popek_json("profile", "list")}
    assert listed[SMALL]["used_by"] == [CT] and listed[SMALL]["description"] == \
        "small containers"
    shown = popek_json("profile", "show", TWO)
    assert shown["config"] == {"limits.cpu": "2"} and shown["used_by"] == [CT]
    proc = popek("profile", "delete", SMALL, check=False)
    assert proc.returncode != 0 and f"in use by instance(s) {CT}" in proc.stderr, proc.stderr
    assert SMALL in [p["name"] for p in popek_json("profile", "list")]


def test_profile_edit_from_stdin_changes_later_launches_only(ct: str) -> None:
    doc = {"description": "edited", "config": {"limits.memory": "80MiB"}, "networks": []}
    popek("profile", "edit", SMALL, stdin=json.dumps(doc).encode())
    assert popek_json("profile", "show", SMALL)["config"] == {"limits.memory": "80MiB"}
    assert memory_limit(ct) == 96 << 20  # a running instance keeps what it was given
    bad = popek("profile", "edit", SMALL, stdin=b"colour: red\n", check=False)
    assert bad.returncode == 2 and "unknown field 'colour'" in bad.stderr


def test_deleted_after_its_instances_and_audited(ct: str, popek_home: Path) -> None:
    popek("delete", "--force", ct)
    popek("profile", "delete", SMALL)
    popek("profile", "delete", TWO)
    assert [p["name"] for p in popek_json("profile", "list")
            if p["name"].startswith("hcfg-")] == []
    log = [json.loads(line) for line in (popek_home / "audit" / "log.jsonl").read_text()
           .splitlines()]
    outcomes: list[tuple[Any, ...]] = [
        (r["op"], r["target"], r["result"].split(":")[0]) for r in log
        if r["op"].startswith("profile.") and r["target"] in (SMALL, TWO)
        and r["result"] != "started"]
    assert outcomes == [
        ("profile.create", SMALL, "ok"), ("profile.create", TWO, "ok"),
        ("profile.delete", SMALL, "error"), ("profile.edit", SMALL, "ok"),
        ("profile.edit", SMALL, "error"),  # the bad document: audited by the CLI
        ("profile.delete", SMALL, "ok"), ("profile.delete", TWO, "ok")]
