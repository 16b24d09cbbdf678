"""The remotes file (0600, tokens never printed) and ``REMOTE:NAME`` on the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from popek import errors
from popek.cli import fastpath, remotes
from popek.cli.remote import app
from popek.errors import InvalidInput, NotFound
from popek.names import validate_name

SECRET = "pk1.abcdef123456.very-secret-token-value"


@pytest.fixture()
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    return tmp_path / "cfg" / "popek" / "remotes.json"


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        assert isinstance(result.exception, errors.PopekError), result.exception
        return result.exception.exit_code, str(result.exception)
    return result.exit_code, result.output


def test_add_keeps_the_token_private_and_never_prints_it(config: Path) -> None:
    code, out = _run("add", "lab", "unix:///run/popek/api.sock", "--token", SECRET)
    assert code == 0 and SECRET not in out
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    assert oct(config.parent.stat().st_mode & 0o777) == "0o700"
    assert json.loads(config.read_text())["remotes"]["lab"]["token"] == SECRET
    for fmt in ("table", "json", "yaml", "csv"):
        code, out = _run("list", "--format", fmt)
        assert code == 0 and SECRET not in out and "lab" in out and "local" in out
    rows = {r["name"]: r for r in json.loads(_run("list", "-f", "json")[1])}
    assert rows["lab"]["token"] == "yes" and rows["local"]["default"] is True


@pytest.mark.parametrize("args, code", [
    (("add", "Lab", "unix:///s"), errors.BAD_INPUT),
    (("add", "local", "unix:///s"), errors.BAD_INPUT),
    (("add", "lab", "http://host:8443"), errors.BAD_INPUT),
    (("add", "lab", "unix://relative"), errors.BAD_INPUT),
    (("remove", "nope"), errors.NOT_FOUND),
    (("remove", "local"), errors.BAD_INPUT),
    (("switch", "nope"), errors.NOT_FOUND),
])
def test_bad_remote_commands_change_nothing(config: Path, args: tuple[str, ...],
                                            code: int) -> None:
    assert _run(*args)[0] == code
    assert not config.exists()


def test_add_twice_is_refused(config: Path) -> None:
    assert _run("add", "lab", "unix:///a.sock")[0] == 0
    assert _run("add", "lab", "unix:///b.sock")[0] == errors.EXISTS
    assert json.loads(config.read_text())["remotes"]["lab"]["url"] == "unix:///a.sock"


def test_names_and_the_default_remote(config: Path) -> None:
    assert remotes.locate("web") is None
    assert remotes.locate("local:web") is None
    assert remotes.locate("lab:web") == ("lab", "web")
    with pytest.raises(InvalidInput, match="no instance name"):
        remotes.locate("lab:")
    with pytest.raises(InvalidInput, match="invalid remote name"):
        remotes.locate("La b:web")
    assert remotes.list_target(None) is None and remotes.list_target("lab:") == "lab"
    assert remotes.list_target("local:") is None
    for bad in ("lab", "lab:web"):
        with pytest.raises(InvalidInput):
            remotes.list_target(bad)
    _run("add", "lab", "unix:///a.sock")
    assert _run("switch", "lab")[0] == 0
    assert remotes.locate("web") == ("lab", "web") and remotes.list_target(None) == "lab"
    assert remotes.locate("local:web") is None
    assert _run("remove", "lab")[0] == 0  # the default goes back to local
    assert remotes.locate("web") is None
    with pytest.raises(NotFound, match="remote lab not found"):
        remotes.get("lab")


def test_an_instance_name_never_holds_a_colon() -> None:
    with pytest.raises(InvalidInput):
        validate_name("lab:web")


def test_fast_path_parses_list_of_a_remote() -> None:
    assert fastpath.parse("list", ["lab:"])["remote"] == "lab:"  # type: ignore[index]
    assert fastpath.parse("list", ["-f", "json"])["remote"] is None  # type: ignore[index]
    assert fastpath.parse("info", ["lab:web"])["name"] == "lab:web"  # type: ignore[index]


def test_api_error_codes_map_to_exit_codes() -> None:
    from popek.cli.remoteclient import exit_code_of

    assert exit_code_of("not_found") == errors.NOT_FOUND
    assert exit_code_of("wrong_state") == errors.WRONG_STATE
    assert exit_code_of("unauthenticated") == errors.DENIED
    assert exit_code_of("denied") == errors.DENIED
    assert exit_code_of("internal") == errors.INTERNAL
    assert exit_code_of("no such code") == errors.FAILURE


def test_local_commands_import_no_remote_client(tmp_path: Path) -> None:
    code = ("import sys; from popek.cli import fastpath, ops, remotes; "
            "remotes.locate('web'); remotes.list_target(None); "
            "print(sorted(m for m in sys.modules if m.startswith(('httpx', 'popek.cli.remote'))))")
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True).stdout
    assert out.strip() == "['popek.cli.remotes']"


@pytest.mark.parametrize("argv", [
    ["console", "--log", "lab:web"],
    ["network", "attach", "net", "lab:web"], ["network", "detach", "net", "lab:web"],
    ["attest", "lab:web", "--nonce", "00"],
])
def test_instance_verbs_go_to_the_remote(config: Path, tmp_path: Path, argv: list[str]) -> None:
    """Each asks the remote named (here a socket nobody serves), never this host."""
    from popek.cli.main import app as main_app

    assert _run("add", "lab", f"unix://{tmp_path / 'none.sock'}")[0] == 0
    result = CliRunner().invoke(main_app, argv)
    exc = result.exception
    assert isinstance(exc, errors.PopekError), result.output
    assert "cannot reach remote lab" in str(exc), exc
