"""Every list, info and show command in every format, as a script reads it (issue 13.2).

A real container on a real network: each command's json and yaml parse to the
same data, its csv has a header row and rows as wide, its table (stdout is a
pipe here, not a terminal) has no box characters and splits on whitespace into
its header's column count.  ``popek list`` shows the container's address and
its json the port; ``--columns`` chooses columns and refuses unknown ones.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from framework import popek, popek_json

NET = "hfmt-fmt"
CT = "hfmt-ct"
PROFILE = "hfmt-small"


@pytest.fixture(scope="module")
def ct(popek_home: Path, minimal_image: str) -> Iterator[str]:
    popek("network", "create", NET)
    popek("profile", "create", PROFILE, "-c", "limits.memory=96MiB", "--network", NET)
    popek("launch", minimal_image, CT, "--container", "-p", PROFILE)
    try:
        yield CT
    finally:
        popek("delete", "--force", CT, check=False)
        popek("profile", "delete", PROFILE, check=False)
        popek("network", "delete", "--force", NET, check=False)


COMMANDS = [
    ["list"], ["info", CT], ["image", "list"], ["image", "info", "minimal"],
    ["network", "list"], ["network", "info", NET], ["trust", "list"], ["policy", "show"],
    ["audit", "log", "--target", CT], ["config", "show", CT], ["project", "show"],
    ["sandbox", "profiles"], ["profile", "list"], ["profile", "show", PROFILE],
]


def _blocks(text: str) -> list[str]:
    return [b for b in text.split("\n\n") if b.strip()]


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_every_format_parses(ct: str, args: list[str]) -> None:
    data = json.loads(popek(*args, "--format", "json").stdout)
    assert data, args
    assert yaml.safe_load(popek(*args, "--format", "yaml").stdout) == data
    for block in _blocks(popek(*args, "--format", "csv").stdout):
        rows = list(csv.reader(io.StringIO(block)))
        assert rows and all(len(r) == len(rows[0]) for r in rows), block
        assert all(h and h == h.upper() for h in rows[0]), rows[0]
    table = popek(*args, "--format", "table").stdout
    assert not set("┃│━─┏┓└┘") & set(table), table
    for block in _blocks(table):
        lines = [line.split() for line in block.splitlines()]
        assert all(len(line) == len(lines[0]) for line in lines), block


def test_list_shows_addresses_and_ports(ct: str) -> None:
    port = popek_json("info", ct)["ports"][0]
    entry = next(e for e in popek_json("list") if e["name"] == ct)
    assert entry["ports"] == [port] and port["network"] == NET and port["ipv4"]
    lines = [line.split() for line in popek("list").stdout.splitlines()]
    header, row = lines[0], next(r for r in lines[1:] if r[0] == ct)
    assert row[header.index("IPV4")] == port["ipv4"]
    assert row[header.index("STATE")] == "running"


def test_columns_by_name_and_letter(ct: str) -> None:
    for spec in ("name,ipv4,state", "n4s"):
        lines = [line.split() for line in popek("list", "--columns", spec).stdout.splitlines()]
        assert lines[0] == ["NAME", "IPV4", "STATE"]
        assert [ct, popek_json("info", ct)["ports"][0]["ipv4"], "running"] in lines[1:]
    rows = list(csv.reader(io.StringIO(popek("list", "-f", "csv", "-c", "name,pid").stdout)))
    assert rows[0] == ["NAME", "PID"] and [ct, str(popek_json("info", ct)["pid"])] in rows
    keys = [line.split()[0] for line in popek("network", "list", "-c", "name,subnet")
            .stdout.splitlines()]
    assert keys[0] == "NAME" and NET in keys


@pytest.mark.parametrize("args", [["list", "-c", "name,bogus"], ["list", "-c", "nz"],
                                  ["image", "list", "--columns", "sizes"]], ids=" ".join)
def test_unknown_columns_are_refused(ct: str, args: list[str]) -> None:
    res = popek(*args, check=False)
    assert res.returncode == 2 and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "unknown column" in res.stderr and "allowed: name" in res.stderr
    assert f"popek {' '.join(args[:-2])}" in res.stderr


def test_bad_format_is_refused_naming_the_choices(ct: str) -> None:
    res = popek("network", "list", "--format", "xml", check=False)
    assert res.returncode == 2 and "'xml' is not one of" in res.stderr
    assert "Usage: popek network list" in res.stderr and "python -m" not in res.stderr
