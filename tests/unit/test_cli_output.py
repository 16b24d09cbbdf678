"""Output for people and for scripts: every format parses, plain tables split, one suggestion.

The renderer (popek.cli.output) with awkward values, the ``--format`` option of
every list, info and show command, ``--columns``, ``--version`` and the
"Did you mean" of an unknown command (the CLI runs in a subprocess, no root).
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer
import yaml

from popek.cli import ops, output
from popek.cli.main import app
from popek.cli.suggest import message, suggestions
from popek.errors import InvalidInput

RECORDS = [
    {"name": "web", "state": "stopped", "reason": "the init exited (killed or crashed)",
     "ports": [{"ipv4": "10.0.0.2"}, {"ipv4": "10.1.0.2"}], "memory": 1 << 29, "note": None},
    {"name": "db-1", "state": "running", "reason": "", "ports": [], "memory": 1 << 27,
     "note": "ünïcode, \"quoted\"\nand a new line"},
]
COLUMNS = (
    output.Column("NAME", lambda r: r["name"], "n"),
    output.Column("STATE", lambda r: r["state"], "s"),
    output.Column("IPV4", lambda r: ",".join(p["ipv4"] for p in r["ports"]), "4"),
    output.Column("NOTE", lambda r: r["note"], default=False),
    output.Column("REASON", lambda r: r["reason"], "r", width=10),
)


def _render(fmt: str, select: str = "", boxed: bool = False) -> str:
    chosen = output.choose(COLUMNS, select, "popek test")
    section = ([c.title for c in chosen], [[c.cell(r) for c in chosen] for r in RECORDS])
    return output.render(RECORDS, [section], fmt, boxed=boxed,
                         cut={i: c.width for i, c in enumerate(chosen) if c.width})


def plain_blocks(text: str) -> list[list[list[str]]]:
    """The tables of plain output, each line split on whitespace; every line as wide as
    its header."""
    blocks = [[line.split() for line in block.splitlines()] for block in text.split("\n\n")
              if block.strip()]
    for block in blocks:
        assert all(len(row) == len(block[0]) for row in block), text
    assert not set("┃│━─┏┓└┘┡┩╇┳┴") & set(text), text
    return blocks


def test_json_and_yaml_give_the_whole_records() -> None:
    assert json.loads(_render("json")) == RECORDS
    assert yaml.safe_load(_render("yaml")) == RECORDS
    assert json.loads(_render("json", select="n")) == RECORDS  # --columns is for tables


def test_csv_has_a_header_and_every_character() -> None:
    rows = list(csv.reader(io.StringIO(_render("csv", select="name,note,reason"))))
    assert rows == [["NAME", "NOTE", "REASON"],
                    ["web", "", "the init exited (killed or crashed)"],
                    ["db-1", "ünïcode, \"quoted\"\nand a new line", ""]]


def test_plain_table_splits_on_whitespace_and_cuts_nothing() -> None:
    (table,) = plain_blocks(_render("table", select="n,s,4,note,r"))
    assert table == [["NAME", "STATE", "IPV4", "NOTE", "REASON"],
                     ["web", "stopped", "10.0.0.2,10.1.0.2", "-",
                      "the_init_exited_(killed_or_crashed)"],
                     ["db-1", "running", "-", "ünïcode,_\"quoted\"_and_a_new_line", "-"]]


def test_boxed_table_on_a_terminal_cuts_long_cells() -> None:
    text = _render("table", boxed=True)
    assert "┃ NAME" in text and "the init …" in text and "crashed" not in text


def test_several_tables_in_plain_text_and_csv() -> None:
    sections = [(("FIELD", "VALUE"), [["name", "web"], ["memory used", "1 of 2"]]),
                (("TIME", "EVENT"), [["t1", "launch requested"]]), (("A", "B"), [])]
    blocks = plain_blocks(output.render({}, sections, "table"))
    assert blocks == [[["FIELD", "VALUE"], ["name", "web"], ["memory_used", "1_of_2"]],
                      [["TIME", "EVENT"], ["t1", "launch_requested"]], [["A", "B"]]]
    parts = output.render({}, sections, "csv").split("\n\n")
    assert [list(csv.reader(io.StringIO(p))) for p in parts] == [
        [["FIELD", "VALUE"], ["name", "web"], ["memory used", "1 of 2"]],
        [["TIME", "EVENT"], ["t1", "launch requested"]], [["A", "B"]]]


@pytest.mark.parametrize(("spec", "titles"), [
    ("", ["NAME", "STATE", "IPV4", "REASON"]),
    ("name,ipv4", ["NAME", "IPV4"]),
    ("NAME, note", ["NAME", "NOTE"]),
    ("4ns", ["IPV4", "NAME", "STATE"]),
    ("ns,note", ["NAME", "STATE", "NOTE"]),
])
def test_columns_by_name_or_incus_letters(spec: str, titles: list[str]) -> None:
    assert [c.title for c in output.choose(COLUMNS, spec, "popek test")] == titles


@pytest.mark.parametrize("spec", ["bogus", "n,x", "nz", ",", "name,,state"])
def test_unknown_columns_are_refused_naming_the_allowed_ones(spec: str) -> None:
    with pytest.raises(InvalidInput) as err:
        output.choose(COLUMNS, spec, "popek test")
    text = str(err.value)
    assert "\n" not in text and "popek test: unknown column" in text
    assert "allowed: name (n), state (s), ipv4 (4), note, reason (r)" in text


def test_instance_columns_cover_a_summary() -> None:
    record = {"name": "web", "project": "default", "state": "running", "reason": "",
              "engine": "container", "image": "minimal", "vcpus": 2, "memory": 1 << 30,
              "label": "default", "created": "2026-01-01T00:00:00+00:00", "pid": 7,
              "ports": [{"network": "a", "ipv4": "10.0.0.5", "ipv6": ["fe80::1"]},
                        {"network": "b", "ipv4": "10.1.0.5", "ipv6": []}]}
    chosen = output.choose(ops.INSTANCE_COLUMNS, "n4m6", "popek list")
    assert [c.cell(record) for c in chosen] == ["web", "10.0.0.5,10.1.0.5", "1GiB", "fe80::1"]
    letters = [c.letter for c in ops.INSTANCE_COLUMNS if c.letter]
    assert len(letters) == len(set(letters)) == len(ops.INSTANCE_COLUMNS)


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> dict[str, click.Command]:
    out: dict[str, click.Command] = {}
    for name in group.list_commands(click.Context(group)):
        cmd = group.get_command(click.Context(group), name)
        assert cmd is not None
        if isinstance(cmd, click.Group):
            out.update(_commands(cmd, (*path, name)))
        else:
            out[" ".join((*path, name))] = cmd
    return out


#: every command that lists, shows or describes something
SHOWING = ["list", "info", "image list", "image info", "network list", "network info",
           "trust list", "policy show", "audit log", "config show", "project show",
           "sandbox profiles"]


def test_every_list_info_and_show_command_offers_every_format() -> None:
    root = typer.main.get_command(app)
    assert isinstance(root, click.Group)
    commands = _commands(root)
    showing = set(SHOWING) | {c for c in commands
                              if c.split()[-1] in ("list", "info", "show", "profiles")}
    for name in sorted(showing):
        params = {p.name: p for p in commands[name].params}
        assert "fmt" in params, f"popek {name} has no --format"
        fmt = params["fmt"]
        assert isinstance(fmt, click.Option) and "-f" in fmt.opts and "--format" in fmt.opts
        assert isinstance(fmt.type, click.Choice), name
        assert set(output.FORMATS) <= set(fmt.type.choices), name
    for name in ("list", "image list", "network list", "trust list", "audit log",
                 "sandbox profiles"):
        assert "columns" in {p.name for p in commands[name].params}, f"{name}: no --columns"


def test_help_lists_the_formats() -> None:
    out = _popek("list", "--help").stdout
    assert "[table|json|yaml|csv]" in out and "--columns" in out


# -- the command line: --version, one suggestion ------------------------------------------
def _popek(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "POPEK_HOME": "/nonexistent/popek-unit-test", "COLUMNS": "200",
           "POPEK_CLI_SERVER": "off"}
    return subprocess.run([sys.executable, "-m", "popek", *args], capture_output=True,
                          text=True, env=env, timeout=120, check=False,
                          cwd=Path(__file__).parent)


def test_version() -> None:
    from importlib.metadata import version

    for args in (["--version"], ["version"]):
        res = _popek(*args)
        assert (res.returncode, res.stdout) == (0, f"popek {version('popek')}\n"), res


@pytest.mark.parametrize(("args", "meant"), [
    (["lsit"], "list"), (["strat"], "start"), (["netwrok", "list"], "network"),
    (["image", "lst"], "list"), (["config", "sho", "x"], "show"),
])
def test_did_you_mean_once(args: list[str], meant: str) -> None:
    res = _popek(*args)
    assert res.returncode == 2
    err = res.stderr
    assert err.count("Did you mean") == 1 and f"'{meant}'" in err, err
    assert "Usage: popek" in err and "python -m" not in err and "-c" not in err.split()


@pytest.mark.parametrize("args", [["config", "gte", "x"], ["config", "sett", "x", "y"],
                                  ["shop"], ["xyz"]])
def test_no_suggestion_of_another_command(args: list[str]) -> None:
    err = _popek(*args).stderr
    assert "No such command" in err and err.count("Did you mean") <= 1
    assert "'set'?" not in err or args[1] == "sett"
    if args[0] in ("shop", "xyz"):
        assert "Did you mean" not in err, err


def test_suggestions_are_slips_only() -> None:
    commands = ["get", "set", "show", "unset", "start", "stop", "list"]
    assert suggestions("gte", commands) == ["get"]
    assert suggestions("get", ["set", "show", "unset"]) == []  # another word, not a slip
    assert suggestions("lsit", commands) == ["list"]
    assert suggestions("shw", commands) == ["show"]
    assert suggestions("showw", commands) == ["show"]
    assert suggestions("st", commands) == []  # start, stop: ambiguous
    assert suggestions("li", commands) == ["list"]
    assert message("xyz", commands) == "No such command 'xyz'."
