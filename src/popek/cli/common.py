"""Helpers shared by the ``popek`` sub-commands: output formats and tables."""

from __future__ import annotations

import typer

from popek.cli.ops import print_table

__all__ = ["FORMATS", "check_format", "print_table"]

FORMATS = ("table", "json")


def check_format(fmt: str) -> None:
    """Refuse an output format other than ``table`` or ``json``."""
    if fmt not in FORMATS:
        raise typer.BadParameter(f"{fmt!r}; allowed: {', '.join(FORMATS)}", param_hint="--format")
