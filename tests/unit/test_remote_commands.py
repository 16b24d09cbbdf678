"""Every command with an API route asks the remote it names, or the default remote of
``popek remote switch``, and never acts on this host; the few that cannot reach a remote
refuse while another default is chosen (issue 14.4).

The remote is a Unix socket nobody serves: a command that asked it fails with
"cannot reach remote lab", and this host's POPEK_HOME stays empty.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from test_api_parity import CLIENT_ONLY, ROUTES
from typer.testing import CliRunner

from framework.certs import make_cert
from popek import errors
from popek.cli import ops, remotes
from popek.cli.main import app

#: each verb with a route, as a command line naming no remote (the default remote's)
#: and the same naming remote lab explicitly ("{R}" is where "lab:" goes)
COMMANDS: dict[str, list[str]] = {
    "launch": ["launch", "minimal", "{R}web"],
    "list": ["list", "{R}"],
    "info": ["info", "{R}web"],
    "start": ["start", "{R}web"],
    "stop": ["stop", "{R}web"],
    "restart": ["restart", "{R}web"],
    "pause": ["pause", "{R}web"],
    "resume": ["resume", "{R}web"],
    "delete": ["delete", "{R}web"],
    "exec": ["exec", "{R}web", "--", "true"],
    "console": ["console", "--log", "{R}web"],
    "attest": ["attest", "{R}web", "--nonce", "00"],
    "monitor": ["monitor", "{R}"],
    "config get": ["config", "get", "{R}web", "limits.cpu"],
    "config show": ["config", "show", "{R}web"],
    "config set": ["config", "set", "{R}web", "limits.cpu=2"],
    "config unset": ["config", "unset", "{R}web", "limits.cpu"],
    "image build": ["image", "build", "{R}minimal"],
    "image import": ["image", "import", "{FILE}", "{R}rnc-img"],
    "image list": ["image", "list", "{R}"],
    "image info": ["image", "info", "{R}minimal"],
    "image delete": ["image", "delete", "{R}rnc-img"],
    "image sign": ["image", "sign", "{R}minimal"],
    "network create": ["network", "create", "{R}rnc-net"],
    "network list": ["network", "list", "{R}"],
    "network info": ["network", "info", "{R}rnc-net"],
    "network delete": ["network", "delete", "{R}rnc-net"],
    "network attach": ["network", "attach", "net", "{R}web"],
    "network detach": ["network", "detach", "net", "{R}web"],
    "trust keygen": ["trust", "keygen", "{R}rnc-k", "--role", "image"],
    "trust add": ["trust", "add", "{FILE}", "{R}", "--name", "rnc-k", "--role", "image"],
    "trust list": ["trust", "list", "{R}"],
    "trust export": ["trust", "export", "{R}rnc-k"],
    "trust remove": ["trust", "remove", "{R}rnc-k"],
    "trust revoke": ["trust", "revoke", "{R}rnc-k"],
    "trust allow-unsigned": ["trust", "allow-unsigned", "{R}", "--project", "default"],
    "policy show": ["policy", "show", "{R}"],
    "policy apply": ["policy", "apply", "{FILE}", "{R}"],
    "policy check": ["policy", "check", "{FILE}", "{R}"],
    "audit log": ["audit", "log", "{R}"],
    "audit verify": ["audit", "verify", "{R}"],
    "audit checkpoint": ["audit", "checkpoint", "{R}"],
    "admin backup": ["admin", "backup", "{OUT}", "{R}"],
    "admin reset": ["admin", "reset", "{R}", "--yes"],
    "admin boot": ["admin", "boot", "{R}"],
    "profile create": ["profile", "create", "{R}rnc-p"],
    "profile edit": ["profile", "edit", "{R}rnc-p"],
    "profile list": ["profile", "list", "{R}"],
    "profile show": ["profile", "show", "{R}rnc-p"],
    "profile delete": ["profile", "delete", "{R}rnc-p"],
    "sandbox run": ["sandbox", "run", "{R}", "--", "true"],
    "sandbox profiles": ["sandbox", "profiles", "{R}"],
    "project list": ["project", "list", "{R}"],
    "project create": ["project", "create", "{R}rnc-a"],
    "project delete": ["project", "delete", "{R}rnc-a"],
    "project show": ["project", "show", "{R}rnc-a"],
    "project set": ["project", "set", "{R}rnc-a", "limits.instances=2"],
    "token create": ["token", "create", "{R}", "--project", "default", "--role", "viewer"],
    "token list": ["token", "list", "{R}"],
    "token revoke": ["token", "revoke", "{R}0123456789ab"],
    "certificate add": ["certificate", "add", "{CERT}", "{R}", "--project", "default",
                        "--role", "viewer"],
    "certificate list": ["certificate", "list", "{R}"],
    "certificate revoke": ["certificate", "revoke", "{R}cert-1"],
    "storage create": ["storage", "create", "{R}rnc-pool", "dir"],
    "storage list": ["storage", "list", "{R}"],
    "storage info": ["storage", "info", "{R}local"],
    "storage delete": ["storage", "delete", "{R}rnc-pool"],
    "storage volume create": ["storage", "volume", "create", "{R}local", "v", "--size", "1GiB"],
    "storage volume list": ["storage", "volume", "list", "{R}"],
    "storage volume info": ["storage", "volume", "info", "{R}local", "v"],
    "storage volume resize": ["storage", "volume", "resize", "{R}local", "v", "2GiB"],
    "storage volume set": ["storage", "volume", "set", "{R}local", "v",
                           "limits.disk.write_bps=10MB"],
    "storage volume delete": ["storage", "volume", "delete", "{R}local", "v"],
    "storage volume snapshot": ["storage", "volume", "snapshot", "{R}local", "v", "s"],
    "storage volume snapshot-delete": ["storage", "volume", "snapshot-delete", "{R}local", "v",
                                       "s"],
    "storage volume restore": ["storage", "volume", "restore", "{R}local", "v", "s"],
    "storage volume clone": ["storage", "volume", "clone", "{R}local", "v", "s", "w"],
    "storage volume import": ["storage", "volume", "import", "{R}local", "v", "{FILE}"],
    "storage volume export": ["storage", "volume", "export", "{R}local", "v", "{OUT}"],
    "storage volume attach": ["storage", "volume", "attach", "{R}local/v", "web"],
    "storage volume detach": ["storage", "volume", "detach", "{R}local/v", "web"],
}


@pytest.fixture()
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Remote lab on a socket nobody serves; an empty POPEK_HOME that must stay empty."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("POPEK_HOME", str(home))
    monkeypatch.delenv("POPEK_PROJECT", raising=False)
    data = {"default": "local", "remotes": {"lab": {"url": f"unix://{tmp_path / 'none.sock'}"}}}
    remotes.save(data)
    return home


def _argv(verb: str, remote: str, tmp_path: Path) -> list[str]:
    pem = tmp_path / "key.pem"
    pem.write_text("-----BEGIN PUBLIC KEY-----\n"
                   "MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n"
                   "-----END PUBLIC KEY-----\n")
    policy = tmp_path / "policy.toml"
    policy.write_text('version = 2\nmode = "enforce"\nlabels = ["default"]\n')
    files = {"{FILE}": str(pem if verb == "trust add" else policy),
             "{OUT}": str(tmp_path / "backup.tar.gz"), "{CERT}": str(_cert(tmp_path))}
    out = []
    for word in COMMANDS[verb]:
        if word in files:
            out.append(files[word])
        elif word == "{R}":
            if remote:
                out.append(remote)
        else:
            out.append(word.replace("{R}", remote))
    return out


def _cert(tmp_path: Path) -> Path:
    path = tmp_path / "certs" / "rnc-client.crt"
    return path if path.exists() else make_cert(tmp_path / "certs", "rnc-client").crt


def _invoke(argv: list[str]) -> BaseException | None:
    result = CliRunner().invoke(app, argv, input="")
    return result.exception


def _asked_lab(argv: list[str], home: Path) -> None:
    exc = _invoke(argv)
    assert isinstance(exc, errors.PopekError), (argv, exc)
    assert "cannot reach remote lab" in str(exc), (argv, exc)
    assert exc.exit_code == errors.FAILURE
    assert list(home.iterdir()) == [], f"{argv} touched this host: {list(home.iterdir())}"


def test_every_verb_with_a_route_is_covered() -> None:
    missing = set(ROUTES) - set(COMMANDS)
    assert not missing, f"verbs with a route and no remote test: {sorted(missing)}"


@pytest.mark.parametrize("verb", sorted(COMMANDS))
def test_named_remote_is_asked_never_this_host(lab: Path, tmp_path: Path, verb: str) -> None:
    _asked_lab(_argv(verb, "lab:", tmp_path), lab)


@pytest.mark.parametrize("verb", sorted(COMMANDS))
def test_after_switch_the_default_remote_is_asked(lab: Path, tmp_path: Path, verb: str) -> None:
    remotes.save({**remotes.load(), "default": "lab"})
    _asked_lab(_argv(verb, "", tmp_path), lab)


def test_attest_verify_on_a_remote(lab: Path, tmp_path: Path) -> None:
    quote, expect = tmp_path / "q.json", tmp_path / "e.json"
    quote.write_text(json.dumps({"body": {}}))
    expect.write_text(json.dumps({"measurement": "00"}))
    args = ["attest", "verify", str(quote), "--nonce", "00", "--expect", str(expect)]
    _asked_lab([*args[:3], "lab:", *args[3:]], lab)
    remotes.save({**remotes.load(), "default": "lab"})
    _asked_lab(args, lab)


def test_sandbox_run_through_the_fast_path_asks_the_remote(
        lab: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path runs ops.sandbox_run itself: the first word lab: and the switch."""
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"")))
    for command in (["lab:", "true"], ["true"]):
        with pytest.raises(errors.PopekError, match="cannot reach remote lab"):
            ops.sandbox_run(command, "default", False, None, None, None, None)
        remotes.save({**remotes.load(), "default": "lab"})
    assert list(lab.iterdir()) == []


@pytest.mark.parametrize("argv, local_form", [
    (["admin", "restore", "/nonexistent/backup"], "popek admin restore /nonexistent/backup "
                                                   "local:"),
    (["project", "switch", "rnc-a"], "popek project switch local:rnc-a"),
])
def test_host_only_commands_refuse_after_switch(lab: Path, argv: list[str],
                                                local_form: str) -> None:
    remotes.save({**remotes.load(), "default": "lab"})
    exc = _invoke(argv)
    assert isinstance(exc, errors.InvalidInput), exc
    assert "default remote is lab" in str(exc) and local_form in str(exc)
    assert "popek remote switch local" in str(exc)
    assert "\n" not in str(exc)
    assert list(lab.iterdir()) == []


def test_client_only_verbs_are_known() -> None:
    assert {"admin restore", "project switch"} <= set(CLIENT_ONLY)


def test_restore_and_project_switch_on_a_remote_say_where(lab: Path) -> None:
    exc = _invoke(["admin", "restore", "/nonexistent/backup", "lab:"])
    assert isinstance(exc, errors.InvalidInput) and "on lab's host" in str(exc)
    exc = _invoke(["project", "switch", "lab:rnc-a"])
    assert isinstance(exc, errors.InvalidInput) and "--project rnc-a" in str(exc)
    assert list(lab.iterdir()) == []


def test_local_names_this_host_after_switch(lab: Path) -> None:
    """local: acts here while lab is the default (policy show reads this home's store)."""
    remotes.save({**remotes.load(), "default": "lab"})
    result = CliRunner().invoke(app, ["policy", "show", "local:", "-f", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["version"] >= 0


def test_a_list_target_must_be_a_remote(lab: Path) -> None:
    for argv in (["trust", "list", "lab"], ["policy", "show", "lab:x"]):
        exc = _invoke(argv)
        assert isinstance(exc, errors.InvalidInput) and "is not a remote" in str(exc), exc


def test_monitor_with_its_socket_is_this_hosts(lab: Path, tmp_path: Path) -> None:
    remotes.save({**remotes.load(), "default": "lab"})
    exc = _invoke(["monitor", "--socket", str(tmp_path / "mine.sock")])
    assert isinstance(exc, errors.PopekError) and "cannot reach popek serve on" in str(exc)
    exc = _invoke(["monitor", "lab:", "--socket", str(tmp_path / "mine.sock")])
    assert isinstance(exc, errors.PopekError) and "cannot reach remote lab" in str(exc)


def test_a_remote_backup_that_is_not_one_writes_nothing(tmp_path: Path) -> None:
    from popek.state.backup import save

    dest = tmp_path / "b.backup"
    with pytest.raises(errors.InvalidInput, match="not a popek backup"):
        save(dest, b"not a tar archive" * 10)
    assert list(tmp_path.iterdir()) == []
