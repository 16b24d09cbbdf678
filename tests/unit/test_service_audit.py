"""One service boundary: every request is audited in core, the same from every front end.

The same request through the ``popek`` command line (a real subprocess, no
command server) and through the library (``Core().handle``) in two fresh
homes leaves records equal in operation, target, parameters and result.  A
library caller who changes state leaves a record (before issue 11 it left
none); allowed, denied and failed requests alike.  No root: trust requests
need none, instance requests run on the fake engine of test_core_instances.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from popek.core.requests import AllowUnsigned, ConfigSet, KeyGen, Launch, PolicyApply, Stop
from popek.core.service import Core
from popek.errors import InvalidInput, NotFound
from popek.trust.audit import AuditLog
from popek.trust.policy import PolicyDenied
from unit.test_core_instances import Env

SAME = ("op", "target", "params", "result", "actor")
POLICY = """version = {version}
mode = "enforcing"
labels = ["default", "web", "bank-a", "bank-b"]

[[conflict]]
name = "banks"
labels = ["bank-a", "bank-b"]
"""


def records(home: Path) -> list[dict[str, Any]]:
    log = home / "audit" / "log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def cli(home: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "POPEK_HOME": str(home), "POPEK_CLI_SERVER": "off"}
    return subprocess.run([sys.executable, "-m", "popek", *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def homes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    cli_home, lib_home = tmp_path / "cli", tmp_path / "lib"
    monkeypatch.setenv("POPEK_HOME", str(lib_home))
    yield cli_home, lib_home


def mutating(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of requests (not the policy decisions they caused)."""
    return [{k: r[k] for k in SAME} for r in recs if r["op"] != "policy.check"]


@pytest.mark.parametrize(("argv", "request_", "stdin"), [
    (["trust", "keygen", "k1", "--role", "image", "--days", "30"],
     KeyGen("k1", "image", 30), ""),
    (["trust", "keygen", "BAD!", "--role", "image"], KeyGen("BAD!", "image", 3650), ""),
    (["trust", "allow-unsigned", "--project", "lab"], AllowUnsigned("lab", True), ""),
    (["policy", "apply", "-"], PolicyApply(POLICY.format(version=3), source="-"),
     POLICY.format(version=3)),
])
def test_cli_and_library_leave_the_same_record(homes: tuple[Path, Path], argv: list[str],
                                               request_: Any, stdin: str) -> None:
    cli_home, lib_home = homes
    proc = cli(cli_home, *argv, stdin=stdin)
    core = Core()
    try:
        core.handle(request_)
        lib_error = ""
    except (InvalidInput, NotFound) as exc:
        lib_error = str(exc)
    assert (proc.returncode != 0) == bool(lib_error), proc.stderr
    if lib_error:
        assert lib_error in proc.stderr
    from_cli, from_lib = mutating(records(cli_home)), mutating(records(lib_home))
    assert from_cli, f"the command left no record: {proc.stderr}"
    assert from_cli == from_lib


def test_a_library_caller_that_changes_state_is_audited(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    env = Env(tmp_path)
    core = Core(env.store, env.instances())
    core.handle(Launch("minimal", "web", memory=128 << 20, engine="fake"))
    before = len(records(tmp_path / "home"))
    core.handle(ConfigSet("web", key="limits.memory", value="256MiB"))
    after = records(tmp_path / "home")
    assert len(after) == before + 2  # the intent, then the outcome
    assert [{k: r[k] for k in ("op", "target", "result", "change")} for r in after[-2:]] == [
        {"op": "config.set", "target": "web", "result": "started",
         "change": 'key="limits.memory" value="256MiB"'},
        {"op": "config.set", "target": "web", "result": "ok",
         "change": 'key="limits.memory" value="256MiB"'}]


def test_failed_and_denied_requests_are_audited_as_such(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    env = Env(tmp_path)
    core = Core(env.store, env.instances())
    with pytest.raises(NotFound):
        core.handle(Stop("ghost"))
    core.handle(PolicyApply(POLICY.format(version=2)))
    core.handle(Launch("minimal", "a", memory=128 << 20, engine="fake", label="bank-a"))
    with pytest.raises(PolicyDenied):
        core.handle(Launch("minimal", "b", memory=128 << 20, engine="fake", label="bank-b"))
    recs = [r for r in records(tmp_path / "home") if r["op"] != "policy.check"]
    results = {(r["op"], r["target"]): r["result"] for r in recs}
    assert results[("instance.stop", "ghost")].startswith("error: NotFound: instance 'ghost'")
    assert results[("instance.launch", "a")] == "ok"
    assert results[("instance.launch", "b")].startswith("denied: access control policy")
    assert AuditLog(core.trust).verify() == []


def test_params_leave_out_callbacks_and_stdin() -> None:
    req = Launch("minimal", "web", networks=("lan",), progress=print)
    params = req.params()
    assert "progress" not in params and params["networks"] == ["lan"]
    assert params["name"] == "web" and params["memory"] is None  # not given: see Launch


@pytest.mark.parametrize("argv", [["trust", "keygen", "k2", "--role", "image"],
                                  ["trust", "list"], ["audit", "checkpoint"]])
def test_a_damaged_store_is_one_line_and_exit_7(tmp_path: Path, argv: list[str]) -> None:
    """Before, a mutating command printed the error and then a second line, a warning
    that the audit log (kept in the same damaged store) was not written."""
    home = tmp_path / "home"
    assert cli(home, "trust", "keygen", "k1", "--role", "image").returncode == 0
    with (home / "state.db").open("r+b") as f:
        f.write(b"garbage, not SQLite's header")
    proc = cli(home, *argv)
    assert proc.returncode == 7
    assert proc.stderr.count("\n") == 1 and "is damaged" in proc.stderr, proc.stderr


def test_records_say_what_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``trust allow-unsigned`` and ``--off`` were the same record but for a digest."""
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    core = Core()
    core.handle(AllowUnsigned("lab", True))
    core.handle(AllowUnsigned("lab", False))
    recs = records(tmp_path / "home")
    assert [(r["op"], r["target"], r["result"], r["change"]) for r in recs] == [
        ("trust.allow-unsigned", "project lab", "started", "allow=true"),
        ("trust.allow-unsigned", "project lab", "ok", "allow=true"),
        ("trust.allow-unsigned", "project lab", "started", "allow=false"),
        ("trust.allow-unsigned", "project lab", "ok", "allow=false")]
    assert AuditLog(core.trust).verify() == []


def test_the_intent_is_on_disk_before_the_request_acts(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A request killed midway has its record: it was written before ``run`` began."""
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    seen: list[dict[str, Any]] = []

    @dataclasses.dataclass(frozen=True)
    class Probe(AllowUnsigned):
        def run(self, core: Core) -> None:
            seen.extend(records(tmp_path / "home"))  # what a SIGKILL here would leave

    Core().handle(Probe("lab", False))
    assert [(r["op"], r["result"], r["change"]) for r in seen] == [
        ("trust.allow-unsigned", "started", "allow=false")]


def test_no_intent_record_no_action(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the intent cannot be written, the request does not run."""
    from popek.errors import StoreUnavailable

    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    ran: list[bool] = []

    @dataclasses.dataclass(frozen=True)
    class Probe(AllowUnsigned):
        def run(self, core: Core) -> None:
            ran.append(True)

    (tmp_path / "home" / "audit").mkdir(parents=True, mode=0o700)
    (tmp_path / "home" / "audit" / "log.jsonl").mkdir()  # cannot be opened as a file
    with pytest.raises(StoreUnavailable, match="cannot write the audit log"):
        Core().handle(Probe("lab", False))
    assert ran == []
