"""``popek project`` and ``popek token`` on the command line (no root, no instance):
formats, the current project, the secret printed once and never stored or listed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def cli(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k != "POPEK_PROJECT"}
    full.update({"POPEK_HOME": str(home), "POPEK_CLI_SERVER": "off", **env})
    return subprocess.run([sys.executable, "-m", "popek", *args], env=full,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    assert cli(h, "project", "create", "hauth-a").returncode == 0
    return h


def test_project_list_switch_and_the_environment(home: Path) -> None:
    rows = json.loads(cli(home, "project", "list", "--format", "json").stdout)
    assert rows == [{"name": "default", "current": True, "instances": 0},
                    {"name": "hauth-a", "current": False, "instances": 0}]
    assert cli(home, "project", "switch", "hauth-a").stdout == "Current project: hauth-a.\n"
    assert (home / "client.json").stat().st_mode & 0o077 == 0
    csv = cli(home, "project", "list", "--format", "csv").stdout.splitlines()
    assert csv == ["NAME,CURRENT,INSTANCES", "default,,0", "hauth-a,*,0"]
    env_rows = json.loads(cli(home, "project", "list", "--format", "json",
                              POPEK_PROJECT="default").stdout)
    assert [r["name"] for r in env_rows if r["current"]] == ["default"]
    r = cli(home, "project", "switch", "nope")
    assert r.returncode == 8 and "project 'nope' not found" in r.stderr
    r = cli(home, "list", "--project", "nope")
    assert r.returncode == 8 and r.stderr.count("\n") == 1


def test_project_set_is_all_or_nothing_and_show_has_the_quotas(home: Path) -> None:
    r = cli(home, "project", "set", "hauth-a", "limits.cpu=4", "limits.memory=lots")
    assert r.returncode == 2 and "limits.memory" in r.stderr
    shown = json.loads(cli(home, "project", "show", "hauth-a", "--format", "json").stdout)
    assert shown["limits.cpu"] == "unlimited"
    assert cli(home, "project", "set", "hauth-a", "limits.cpu=4",
               "limits.memory=8GiB").returncode == 0
    shown = json.loads(cli(home, "project", "show", "hauth-a", "--format", "json").stdout)
    assert (shown["limits.cpu"], shown["limits.memory"], shown["used.memory"]) == (
        "4", "8GiB", "0B")


def test_a_token_secret_is_printed_once_and_never_listed(home: Path) -> None:
    r = cli(home, "token", "create", "--project", "hauth-a", "--role", "operator",
            "--console", "--expires", "7", "--name", "ci")
    assert r.returncode == 0, r.stderr
    secret = r.stdout.splitlines()[-1]
    assert secret.startswith("pk1.")
    listed = cli(home, "token", "list", "--format", "json").stdout
    (token,) = json.loads(listed)
    assert (token["name"], token["project"], token["role"], token["console"]) == (
        "ci", "hauth-a", "operator", True)
    assert token["expires"] and token["revoked"] is None and "hash" not in token
    stored = b"".join(p.read_bytes() for p in home.rglob("*") if p.is_file())
    assert secret.encode() not in stored  # not in the store, nor the audit log
    assert cli(home, "token", "revoke", token["id"]).returncode == 0
    (token,) = json.loads(cli(home, "token", "list", "--format", "json").stdout)
    assert token["revoked"]
    r = cli(home, "token", "create", "--project", "nope", "--role", "viewer")
    assert r.returncode == 8 and "project 'nope' not found" in r.stderr
    r = cli(home, "token", "create", "--project", "hauth-a", "--role", "root")
    assert r.returncode == 2 and "allowed: admin, operator, viewer" in r.stderr
    assert len(json.loads(cli(home, "token", "list", "--format", "json").stdout)) == 1
