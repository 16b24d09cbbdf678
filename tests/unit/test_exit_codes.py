"""Exit codes are a contract (issue 13.3): one table, shown by ``popek --help`` and the README.

Each kind of failure a script may tell apart has its own code; the table in
:mod:`popek.errors` is the one place they are written, and this test holds
the error classes, ``popek --help``, the README and the real command to it.
The CLI runs in a subprocess against a private POPEK_HOME (no engine, no root
needed): a missing instance, a missing image, a bad value.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from framework import REPO
from popek import errors
from popek.cli import client, exitcodes
from popek.core.lifecycle import State, transition
from popek.core.requests import Stop
from popek.core.service import Core
from popek.images.compress import TooLarge
from popek.network.nft import NftTableMissing, RulesetInputError
from popek.trust.keys import TrustError
from popek.trust.policy import PolicyDenied
from unit.test_core_instances import Env, launch

CODES = dict(errors.EXIT_CODES)


def test_the_table_has_one_meaning_per_code() -> None:
    codes = [code for code, _ in errors.EXIT_CODES]
    assert codes == sorted(set(codes))
    for kind in ("not found", "already exists", "wrong state", "denied", "tampered",
                 "bad input"):
        assert sum(kind in meaning for meaning in CODES.values()) == 1, kind


@pytest.mark.parametrize(("error", "code"), [
    (errors.InvalidInput("x"), errors.BAD_INPUT),
    (RulesetInputError("x"), errors.BAD_INPUT),
    (errors.NotFound("x"), errors.NOT_FOUND),
    (NftTableMissing("x"), errors.NOT_FOUND),
    (errors.AlreadyExists("x"), errors.EXISTS),
    (errors.StateError("web", "exec", "stopped", ("running",)), errors.WRONG_STATE),
    (PolicyDenied("x"), errors.DENIED),
    (TrustError("x"), errors.TAMPERED),
    (errors.IntegrityError("x"), errors.TAMPERED),
    (errors.ConflictError("x"), errors.CONFLICT),
    (errors.StoreUnavailable("x"), errors.UNAVAILABLE),
    (errors.NoSpace("x"), errors.UNAVAILABLE),
    (errors.StoreDamaged("x"), errors.DAMAGED),
    (errors.EngineError("x"), errors.FAILURE),
    (TooLarge("x"), errors.FAILURE),
])
def test_each_error_exits_with_its_code(error: errors.PopekError, code: int) -> None:
    assert error.exit_code == code
    assert code in CODES


def test_every_error_class_exits_with_a_code_of_the_table() -> None:
    seen, todo = set(), [errors.PopekError]
    while todo:
        cls = todo.pop()
        seen.add(cls)
        todo += [c for c in cls.__subclasses__() if c not in seen]
    assert len(seen) > 15
    assert {cls.__name__: cls.exit_code for cls in seen
            if cls.exit_code not in CODES} == {}


def test_codes_that_live_apart_agree_with_the_table() -> None:
    # the client refuses an impostor server without importing popek: a trust check failed
    assert client.REFUSED == errors.TAMPERED
    assert sorted(CODES)[-2:] == [70, 130]
    from popek.cli import entry

    assert entry.INTERNAL_ERROR == errors.INTERNAL


def test_the_readme_shows_the_table() -> None:
    readme = (REPO / "README.md").read_text()
    assert exitcodes.markdown() in readme, "README.md's exit code table differs from " \
        "popek.errors.EXIT_CODES; paste popek.cli.exitcodes.markdown() there"


def _popek(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "POPEK_HOME": str(home), "POPEK_CLI_SERVER": "off", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "popek", *args], capture_output=True,
                          text=True, env=env, timeout=120, stdin=subprocess.DEVNULL,
                          check=False)


def test_help_shows_the_table(tmp_path: Path) -> None:
    out = _popek(tmp_path, "--help").stdout
    for code, meaning in errors.EXIT_CODES:
        assert f"{code:<5}{meaning}" in out, (code, out)
    assert errors.EXIT_CODES_NOTE in out


def test_the_command_exits_with_the_code_of_each_case(tmp_path: Path) -> None:
    home = tmp_path / "home"
    missing = _popek(home, "info", "nosuch")
    assert (missing.returncode, missing.stderr) == (
        errors.NOT_FOUND, "Error: instance 'nosuch' not found; existing instances: none\n")
    image = _popek(home, "launch", "nosuch", "web")
    assert image.returncode == errors.NOT_FOUND and "image 'nosuch' not found" in image.stderr
    bad = _popek(home, "launch", "minimal", "Bad_Name")
    assert bad.returncode == errors.BAD_INPUT, bad.stderr
    usage = _popek(home, "launch", "minimal", "x", "--vcpus", "many")
    assert usage.returncode == errors.BAD_INPUT, usage.stderr
    env_socket = {client.ENV_SOCKET: str(tmp_path / "none.sock")}
    server = subprocess.run([sys.executable, "-m", "popek", "command-server", "status"],
                            capture_output=True, text=True, timeout=120, check=False,
                            env={**os.environ, "POPEK_HOME": str(home), **env_socket})
    assert server.returncode == errors.NOT_FOUND, server


# -- stop of a stopped instance: a success, as podman's ----------------------------------
def test_stopping_a_stopped_instance_reports_already_stopped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    env = Env(tmp_path)
    insts = launch(env)
    core = Core(env.store, instances=insts)
    assert core.handle(Stop("web")) == "graceful"
    calls = list(env.engine.calls)
    history = insts.get("web").history
    assert core.handle(Stop("web")) == "already stopped"
    assert env.engine.calls == calls, "the engine was asked to stop a stopped instance"
    assert insts.get("web").history == history and insts.get("web").state == State.STOPPED
    assert [r["result"] for r in core.audit.records()][-2:] == ["started", "ok"]


def test_other_refused_moves_stay_errors_with_the_wrong_state_code() -> None:
    with pytest.raises(errors.StateError) as exc:
        transition("web", State.STOPPING, "stop")
    assert exc.value.exit_code == errors.WRONG_STATE
    assert "popek info web" in str(exc.value)
