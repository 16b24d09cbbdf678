"""Shell completion for bash, zsh and fish, in the real shells (issue 13.4).

``popek completion SHELL`` prints a script registered for the command
``popek``; each test loads it in its shell, as a user would, and completes a
sub-command, an option and an instance name.  The ``popek`` these shells call
is the installed command (``.venv/bin/popek``, first on ``PATH``) against a
private POPEK_HOME holding one instance record; ``POPEK_CLI_SERVER=off`` so
that a command server of another checkout state never answers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from popek.cli import completion
from popek.core.lifecycle import State
from popek.core.model import Instance, InstanceSpec
from popek.state.schema import instance_key
from popek.state.store import SQLiteStore

BIN = Path(sys.executable).parent
#: a zsh session in a pseudo-terminal (zpty): load the script, type, press Tab, read
#: until the completed word shows; `timeout` ends it should the word never come
ZPTY = r"""
zmodload zsh/zpty
zpty z 'zsh -f -i'
zpty -w z "$1"' && print READY-$((6*7))'
zpty -r z out '*READY-42*' || exit 3
zpty -w -n z "$2"$'\t'
zpty -r z out "*$3*" || exit 4
print -r -- COMPLETED
zpty -d z
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if not (BIN / "popek").exists():
        pytest.fail(f"{BIN / 'popek'} is missing: run make setup")
    home = tmp_path_factory.mktemp("home")
    store = SQLiteStore(home / "state.db")
    for name in ("web1", "db1"):
        inst = Instance(name, InstanceSpec("minimal"), State.STOPPED, 900000000, "now")
        store.put(instance_key(inst.project, name), inst.to_json())
    store.close()
    return {**{k: v for k, v in os.environ.items() if not k.startswith("_POPEK")},
            "PATH": f"{BIN}:{os.environ['PATH']}", "POPEK_HOME": str(home),
            "POPEK_CLI_SERVER": "off", "HOME": str(home)}


def _shell(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: make setup installs it (scripts/setup.sh)")
    return path


def _run(argv: list[str], env: dict[str, str]) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120,
                         stdin=subprocess.DEVNULL, check=False)
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr)
    assert res.stderr == "", res.stderr
    return res.stdout


def test_the_scripts_register_popek(env: dict[str, str]) -> None:
    for shell in completion.SHELLS:
        script = _run(["popek", "completion", shell], env)
        assert script == completion.script(shell)
        assert "popek" in script and "_POPEK_COMPLETE=complete_" + shell in script
        for leak in ("python", "-c ", "__main__", "_-C_COMPLETE", "popek.cli"):
            assert leak not in script, (shell, leak)
    refused = subprocess.run(["popek", "completion", "tcsh"], capture_output=True, text=True,
                             env=env, timeout=120, check=False)
    assert refused.returncode == 2 and "'tcsh' is not one of" in refused.stderr


BASH = """
source <(popek completion bash) || exit 9
complete -p popek || exit 8
words() { COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _popek_completion popek
          printf '%s\\n' "${COMPREPLY[@]}"; }
"""


def test_bash(env: dict[str, str]) -> None:
    out = _run([_shell("bash"), "-c", BASH + "words popek lau; echo --; words popek stop --f;"
                "echo --; words popek info ''; echo --; words popek image s"], env)
    registered, rest = out.split("\n", 1)
    assert registered == "complete -o default -F _popek_completion popek"
    launch, force, names, image = rest.split("--\n")
    assert launch == "launch\n"
    assert force == "--force\n"
    assert names.split() == ["db1", "web1"]
    assert image == "sign\n"


def test_fish(env: dict[str, str]) -> None:
    fish = _shell("fish")
    out = _run([fish, "--no-config", "-c", "popek completion fish | source; "
                "complete -C 'popek lau'; echo SEP; complete -C 'popek delete w'"], env)
    launch, names = out.split("SEP\n")
    assert [line.split("\t")[0] for line in launch.splitlines()] == ["launch"]
    assert names.splitlines() == ["web1"]


def test_zsh_sourced(env: dict[str, str]) -> None:
    zsh = _shell("zsh")
    out = _run(["timeout", "60", zsh, "-f", "-c", ZPTY, "zpty",
                "autoload -Uz compinit && compinit -u -D && source <(popek completion zsh)",
                "popek lau", "launch"], env)
    assert out == "COMPLETED\n"


def test_zsh_from_its_fpath_as_set_up_installs_it(env: dict[str, str], tmp_path: Path) -> None:
    """Autoloaded from a completion directory (vendor-completions/_popek): no compdef call."""
    zsh = _shell("zsh")
    (tmp_path / "_popek").write_text(completion.script("zsh"))
    out = _run(["timeout", "60", zsh, "-f", "-c", ZPTY, "zpty",
                f"fpath=({tmp_path} $fpath) && autoload -Uz compinit && compinit -u -D",
                "popek start d", "db1"], env)
    assert out == "COMPLETED\n"


def test_setup_installs_where_the_directories_exist(tmp_path: Path) -> None:
    dirs = {"bash": (str(tmp_path / "bash"), "popek"), "zsh": (str(tmp_path / "zsh"), "_popek"),
            "fish": (str(tmp_path / "none"), "popek.fish")}
    (tmp_path / "bash").mkdir()
    (tmp_path / "zsh").mkdir()
    assert completion.install(dirs) == [str(tmp_path / "bash" / "popek"),
                                        str(tmp_path / "zsh" / "_popek")]
    assert (tmp_path / "zsh" / "_popek").read_text() == completion.script("zsh")
    assert not (tmp_path / "none").exists()
    assert completion.INSTALL_DIRS == {
        "bash": ("/usr/share/bash-completion/completions", "popek"),
        "zsh": ("/usr/share/zsh/vendor-completions", "_popek"),
        "fish": ("/usr/share/fish/vendor_completions.d", "popek.fish")}


def test_no_names_without_a_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "nothing"))
    assert completion.instance_names() == []
    assert not (tmp_path / "nothing").exists(), "completion made a home"


def test_image_names_are_those_the_current_project_sees(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Its own images, then default's (shared read-only): before, default's only."""
    monkeypatch.setenv("POPEK_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    for d in ("images/minimal", "images/debian", "images/.projects/lab/mine",
              "images/.projects/other/theirs"):
        (tmp_path / d).mkdir(parents=True)
    monkeypatch.setenv("POPEK_PROJECT", "lab")
    assert completion.image_names() == ["mine", "debian", "minimal"]
    monkeypatch.setenv("POPEK_PROJECT", "default")
    assert completion.image_names() == ["debian", "minimal"]


def test_the_command_server_answers_completion_requests() -> None:
    """A completion request has no arguments (its words are in the environment): the server
    takes it, though an empty command line (usage) runs in-process."""
    from popek.cli import client

    assert client.remote_allowed([], tty=True, completing=True)
    assert not client.remote_allowed([], tty=True)
    assert not client.remote_allowed(["console", "web"], tty=True, completing=True)
    assert client.COMPLETE_VAR == completion.COMPLETE_VAR == "_POPEK_COMPLETE"


def test_a_completion_through_the_command_server(env: dict[str, str], tmp_path: Path) -> None:
    """The server takes the request (a client that falls back exits 99 here) and answers."""
    from unit.test_cmdserver import NOT_TAKEN, Server

    server = Server(tmp_path, idle=600.0)
    try:
        res = server.run(env={**env, "_POPEK_COMPLETE": "complete_bash",
                              "COMP_WORDS": "popek sto", "COMP_CWORD": "1"})
        assert res.returncode != NOT_TAKEN, "the server refused a completion request"
        assert (res.returncode, res.stdout, res.stderr) == (0, "stop\nstorage\n", "")
    finally:
        server.close()
