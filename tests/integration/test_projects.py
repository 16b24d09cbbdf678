"""Projects on a real container (issue 14.3): an instance of one project is invisible from
another, every instance command takes --project, a project is not deleted while it holds
an instance, and a quota refuses a launch with nothing made."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import popek, popek_json

A, B = "hauth-a", "hauth-b"
CT = "hauth-web"


@pytest.fixture(scope="module")
def projects(popek_home: Path, minimal_image: str) -> Iterator[str]:
    for p in (A, B):
        popek("project", "create", p)
    popek("launch", minimal_image, CT, "--container", "--memory", "64MiB", "--project", A)
    yield minimal_image
    popek("delete", "--force", CT, "--project", A, check=False)
    popek("delete", "--force", "hauth-two", "--project", A, check=False)
    for p in (A, B):
        popek("project", "delete", p, check=False)


def names(*args: str, env: dict[str, str] | None = None) -> list[str]:
    out = popek("list", "--format", "json", *args, env=env).stdout
    return [i["name"] for i in json.loads(out)]


def test_an_instance_is_seen_only_in_its_project(projects: str) -> None:
    assert names("--project", A) == [CT]
    assert names("--project", B) == []
    assert CT not in names()  # the default project
    every = json.loads(popek("list", "--all-projects", "--format", "json").stdout)
    assert {"name": CT, "project": A} in [{k: i[k] for k in ("name", "project")} for i in every]
    r = popek("info", CT, "--project", B, check=False)
    assert r.returncode == 8 and f"instance '{CT}' not found in project '{B}'" in r.stderr
    r = popek("exec", "--project", B, CT, "--", "true", check=False)
    assert r.returncode == 8


def test_the_instance_commands_work_in_a_project(projects: str) -> None:
    env = {**os.environ, "POPEK_PROJECT": A}  # the environment names the project
    assert names(env=env) == [CT]
    assert popek("exec", CT, "--", "cat", "/etc/hostname", env=env).stdout.strip() == CT
    popek("stop", CT, "--project", A)
    assert popek_json("info", CT, "--project", A)["state"] == "stopped"
    popek("start", CT, "--project", A)
    info = popek_json("info", CT, "--project", A)
    assert (info["state"], info["project"]) == ("running", A)


def test_switch_makes_a_project_current(projects: str) -> None:
    popek("project", "switch", B)
    try:
        assert names() == []
        rows = json.loads(popek("project", "list", "--format", "json").stdout)
        assert [r["name"] for r in rows if r["current"]] == [B]
        assert {r["name"]: r["instances"] for r in rows}[A] == 1
    finally:
        popek("project", "switch", "default")
    assert CT not in names()


def test_a_project_holding_an_instance_is_not_deleted(projects: str) -> None:
    r = popek("project", "delete", A, check=False)
    assert r.returncode == 10 and f"holds instances {CT}; delete them first" in r.stderr
    assert "Traceback" not in r.stderr
    assert A in [p["name"] for p in json.loads(
        popek("project", "list", "--format", "json").stdout)]


def test_a_quota_refuses_a_launch_and_nothing_is_made(projects: str,
                                                      popek_home: Path) -> None:
    popek("project", "set", A, "limits.instances=1")
    try:
        r = popek("launch", projects, "hauth-two", "--container", "--memory", "64MiB",
                  "--project", A, check=False)
        assert r.returncode == 1, r.stderr
        assert ("quota limits.instances=1 exceeded: 1 used, a new instance needs 1 more"
                in r.stderr)
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        assert names("--project", A) == [CT]
        assert not (popek_home / "instances" / A / "hauth-two").exists()
        shown = popek_json("project", "show", A)
        assert (shown["limits.instances"], shown["used.instances"]) == ("1", "1")
    finally:
        popek("project", "set", A, "limits.instances=")
