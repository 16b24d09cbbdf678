"""The fast path parses the instance verbs exactly as Typer does, or leaves them to it (no root)."""

from __future__ import annotations

import inspect
from typing import Any

import click
import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st

from popek.cli import fastgen, fastpath, ops
from popek.cli._fasttable import TABLE
from popek.cli.main import app


@pytest.fixture(scope="module")
def root() -> click.Group:
    cmd = typer.main.get_command(app)
    assert isinstance(cmd, click.Group)
    return cmd


def test_the_table_matches_the_typer_commands() -> None:
    assert fastgen.render() == fastgen.TARGET.read_text(), (
        "src/popek/cli/_fasttable.py is stale: run python -m popek.cli.fastgen")


def _command(root: click.Group, verb: str) -> click.Command:
    cmd: click.Command | None = root
    for word in verb.split():
        assert isinstance(cmd, click.Group)
        cmd = cmd.get_command(click.Context(cmd), word)
    assert cmd is not None
    return cmd


@pytest.mark.parametrize("verb", sorted(TABLE))
def test_each_fast_function_takes_its_commands_parameters(root: click.Group, verb: str) -> None:
    cmd = _command(root, verb)
    func = getattr(ops, TABLE[verb]["func"])
    assert list(inspect.signature(func).parameters) == [
        p.name for p in cmd.params if p.name != "help"]


def _click(root: click.Group, verb: str, args: list[str]) -> dict[str, Any] | None:
    cmd = _command(root, verb)
    try:
        ctx = cmd.make_context(verb, list(args))
    except (click.ClickException, click.exceptions.Exit):
        return None
    return {k: list(v) if isinstance(v, tuple) else v for k, v in ctx.params.items()}


@pytest.mark.parametrize(("verb", "args", "want"), [
    ("launch", ["minimal", "web1"], {"image": "minimal", "name": "web1", "vcpus": None,
                                     "memory": None, "container": False, "mount": [],
                                     "network": [], "config": [], "profile": []}),
    ("launch", ["minimal", "web1", "-c", "limits.memory=1GiB", "-p", "small", "--config",
                "limits.cpu=2", "--profile=big", "-c", "limits.cpu=1"],
     {"config": ["limits.memory=1GiB", "limits.cpu=2", "limits.cpu=1"],
      "profile": ["small", "big"], "memory": None}),
    ("launch", ["--vcpus=2", "minimal", "--container", "web1", "--network", "a",
                "--network", "b=10.0.0.5"],
     {"vcpus": 2, "container": True, "network": ["a", "b=10.0.0.5"], "name": "web1"}),
    ("exec", ["c1", "-n", "--timeout", "5", "--", "sh", "-c", "echo --timeout"],
     {"name": "c1", "no_stdin": True, "timeout": 5.0, "command": ["sh", "-c", "echo --timeout"]}),
    ("list", ["--format", "json"], {"fmt": "json"}),
    ("stop", ["vm1", "--force", "--timeout", "2.5"], {"force": True, "timeout": 2.5}),
    ("sandbox run", ["-p", "net", "--ro", "/srv", "--", "ls", "-l"],
     {"profile": "net", "ro": ["/srv"], "rw": [], "memory": None, "command": ["ls", "-l"]}),
])
def test_common_command_lines_take_the_fast_path(root: click.Group, verb: str,
                                                 args: list[str], want: dict[str, Any]) -> None:
    got = fastpath.parse(verb, args)
    assert got is not None
    assert {k: got[k] for k in want} == want
    assert got == _click(root, verb, args)


@pytest.mark.parametrize(("verb", "args"), [
    ("launch", ["--help"]), ("launch", ["minimal"]), ("launch", ["minimal", "a", "b"]),
    ("launch", ["minimal", "a", "--vcpus", "two"]), ("launch", ["minimal", "a", "--vcpus"]),
    ("launch", ["minimal", "a", "--container=yes"]), ("launch", ["minimal", "a", "--cpus", "2"]),
    ("launch", ["minimal", "a", "-climits.cpu=2"]), ("launch", ["minimal", "a", "-c=x=1"]),
    ("launch", ["minimal", "a", "-c"]), ("launch", ["minimal", "a", "-pc", "x"]),
    ("exec", ["c1", "ls", "-la"]), ("exec", ["c1", "-nT", "--", "ls"]), ("exec", ["c1"]),
    ("list", ["--format", "xml"]), ("info", ["a", "-x"]), ("nope", ["a"]),
    ("sandbox run", ["--help"]), ("sandbox run", ["-p"]),
])
def test_anything_unusual_is_left_to_typer(verb: str, args: list[str]) -> None:
    assert fastpath.parse(verb, args) is None


def _tokens(verb: str) -> st.SearchStrategy[str]:
    opts = [o for p in TABLE[verb]["params"] if p["kind"] == "option"
            for o in p["opts"] + p["secondary"]] or ["--force"]  # unknown to pause/resume
    values = ["1", "2.5", "-1", "x", "json", "table", "", "--", "-", "a=b", "--help", "-nT"]
    return st.one_of(st.sampled_from(opts), st.sampled_from(values),
                     st.sampled_from(opts).map(lambda o: f"{o}=3"),
                     st.text("abc-=", max_size=4))


@pytest.mark.parametrize("verb", sorted(TABLE))
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_where_the_fast_path_answers_click_agrees(root: click.Group, verb: str,
                                                  data: st.DataObject) -> None:
    args = data.draw(st.lists(_tokens(verb), max_size=7))
    got = fastpath.parse(verb, args)
    if got is not None:
        assert got == _click(root, verb, args), args


@pytest.mark.parametrize("argv", [
    ["launch", "minimal", "web1", "--container"], ["exec", "c1", "--", "ls"],
    ["list"], ["info", "vm1", "--format", "json"], ["stop", "vm1", "--force"], ["delete", "x"],
    ["sandbox", "run", "--net", "--", "curl", "x"],
])
def test_the_fast_path_audits_as_typer_does(root: click.Group, argv: list[str]) -> None:
    from popek.cli.auditing import describe, operation, target_of

    found = fastpath.command(argv)
    assert found is not None
    verb, rest = found
    values = fastpath.parse(verb, rest)
    assert values is not None
    op = operation(verb.split(), rest)
    arguments = [p["name"] for p in TABLE[verb]["params"] if p["kind"] == "argument"]
    fast = None if op is None else (op, target_of(arguments, values))
    assert fast == describe(root, argv)


@pytest.mark.parametrize(("argv", "want"), [
    (["sandbox", "run", "--", "ls"], ("sandbox run", ["--", "ls"])),
    (["launch", "a", "b"], ("launch", ["a", "b"])), (["sandbox", "profiles"], None),
    (["sandbox"], None), ([], None), (["image", "list"], None),
])
def test_commands_of_one_or_two_words_are_found(argv: list[str],
                                                want: tuple[str, list[str]] | None) -> None:
    assert fastpath.command(argv) == want
