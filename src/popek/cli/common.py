"""Helpers shared by the ``popek`` sub-commands: output formats and tables."""

from __future__ import annotations

import typer

FORMATS = ("table", "json")


def check_format(fmt: str) -> None:
    """Refuse an output format other than ``table`` or ``json``."""
    if fmt not in FORMATS:
        raise typer.BadParameter(f"{fmt!r}; allowed: {', '.join(FORMATS)}", param_hint="--format")


def print_table(columns: list[str], rows: list[list[str]]) -> None:
    """Print ``rows`` as a Rich table (Rich is imported only here, on use)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns, show_lines=False)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
