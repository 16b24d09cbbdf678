"""Helpers shared by the ``popek`` sub-commands: the ``--format`` and ``--columns`` options.

The output itself is printed by :mod:`popek.cli.output`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click
import typer

from popek.cli.output import FORMATS, Column, describe

__all__ = ["FORMATS", "columns_option", "format_option", "project_option", "remote_argument"]


def format_option() -> Any:
    """``--format`` / ``-f``: table, json, yaml or csv (a Click choice, listed in ``--help``)."""
    return typer.Option("table", "--format", "-f", click_type=click.Choice(FORMATS),
                        help="table (plain columns when not on a terminal), json, yaml or csv.")


def columns_option(columns: Sequence[Column]) -> Any:
    """``--columns`` / ``-c``: the columns of a listing, by name or incus-style letters."""
    letters = " (or their letters run together, as incus's: -c ns4)" if any(
        c.letter for c in columns) else ""
    return typer.Option("", "--columns", "-c",
                        help=f"Columns of the table and csv, comma-separated names{letters}: "
                             f"{describe(columns)}.")


def project_option() -> Any:
    """``--project``: the project the command acts in (see popek.cli.scope)."""
    return typer.Option(None, "--project", help="The project (default: $POPEK_PROJECT, else "
                        "the one popek project switch chose, else default).")


def remote_argument(what: str = "") -> Any:
    """``[REMOTE:]``: the remote an object-less command (a list, the policy...) acts on."""
    return typer.Argument(None, metavar="[REMOTE:]",
                          help=f"A remote (lab:; popek remote list){what}; default: the "
                               "default remote (popek remote switch), else this host; local: "
                               "this host.")
