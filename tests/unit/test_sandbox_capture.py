"""The sandbox run the API makes (``SandboxCapture``) and the image build's signer check:
output captured and bounded, host paths the host admin's, a bad key refused before a build.

The sandbox itself is replaced by a fake ``engines.sandbox.run`` that acts on the
descriptors it is given (the real one runs in tests/integration/test_api_tenancy.py)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from popek.core.auth import OPERATOR, Forbidden, Identity
from popek.core.requests import SandboxCapture
from popek.core.requests import sandbox as sandbox_requests
from popek.core.requests.images import check_signer
from popek.core.service import Core
from popek.errors import InvalidInput, NotFound
from popek.state.store import SQLiteStore

Calls = list[tuple[str, list[str], Any]]


@pytest.fixture
def core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Core]:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    store = SQLiteStore(tmp_path / "home" / "state.db")
    yield Core(store)
    store.close()


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    """Runs of the fake sandbox: it echoes its stdin to stdout, its argv to stderr, and
    exits with the number of arguments."""
    seen: Calls = []

    def fake_run(profile: str, options: Any, cmd: Sequence[str],
                 stdio: tuple[int, int, int] | None = None) -> int:
        seen.append((profile, list(cmd), options))
        assert stdio is not None
        data = os.read(stdio[0], 1 << 16)
        os.write(stdio[1], data)
        os.write(stdio[2], " ".join(cmd).encode())
        return len(cmd)

    monkeypatch.setattr("popek.engines.sandbox.run", fake_run)
    return seen


def audit(home: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (home / "audit" / "log.jsonl").read_text().splitlines()]


def test_output_exit_code_and_stdin_come_back(core: Core, calls: Calls,
                                              tmp_path: Path) -> None:
    result = core.handle(SandboxCapture(command=("cat", "-"), stdin=b"hello\n", timeout=5))
    assert (result.exit_code, result.stdout, result.stderr) == (2, b"hello\n", b"cat -")
    assert calls[0][:2] == ("default", ["cat", "-"]) and calls[0][2].timeout == 5
    last = audit(tmp_path / "home")[-1]
    assert (last["op"], last["target"], last["result"]) == ("sandbox.run", "cat -", "ok")
    assert "hello" not in json.dumps(last)  # the input is not audited


def test_output_beyond_the_bound_is_dropped_and_said(core: Core,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox_requests, "MAX_OUTPUT", 1000)

    def loud(profile: str, options: Any, cmd: Sequence[str],
             stdio: tuple[int, int, int] | None = None) -> int:
        assert stdio is not None
        for _ in range(10):
            os.write(stdio[1], b"x" * 500)
        return 0

    monkeypatch.setattr("popek.engines.sandbox.run", loud)
    result = core.handle(SandboxCapture(command=("yes",)))
    assert result.stdout.startswith(b"x" * 1000)
    assert b"4000 more bytes of output dropped" in result.stdout
    assert result.stderr == b""


def test_host_paths_are_for_the_host_admin_only(core: Core, calls: Calls, tmp_path: Path) -> None:
    oper = Identity("token t (abc)", "default", OPERATOR)
    as_token = Core(core.store, identity=oper)
    for ro, rw in ((("/etc",), ()), ((), (str(tmp_path),))):
        with pytest.raises(Forbidden, match="host paths"):
            as_token.handle(SandboxCapture(command=("true",), ro=ro, rw=rw))
    assert calls == []
    denied = [r for r in audit(tmp_path / "home") if r["result"] != "started"]
    assert all(r["result"].startswith("denied") and r["identity"] == oper.name for r in denied)
    assert as_token.handle(SandboxCapture(command=("true",))).exit_code == 1
    core.handle(SandboxCapture(command=("true",), ro=("/etc",)))  # the host admin may
    assert [str(p) for p in calls[-1][2].ro] == ["/etc"]


def test_a_bad_timeout_is_refused_before_the_run(core: Core, calls: Calls) -> None:
    with pytest.raises(InvalidInput):
        core.handle(SandboxCapture(command=("true",), timeout=0))
    assert calls == []


def test_a_signing_key_that_cannot_sign_is_refused(core: Core) -> None:
    check_signer(core, "")  # the host's own key: made when first used
    with pytest.raises(NotFound, match="no key named 'nosuch'"):
        check_signer(core, "nosuch")
    with pytest.raises(InvalidInput):
        check_signer(core, "../../etc/passwd")
