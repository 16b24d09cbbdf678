"""What the list, info and show commands print: one place for every output format.

Each such command builds its records (plain JSON data) and says how to show
them as tables; this module prints them in the format asked for with
``--format`` (:data:`FORMATS`):

- ``table``: for people.  Boxed on a terminal; anywhere else plain columns
  for scripts (see :mod:`popek.cli.table`): no box characters, nothing cut,
  and each cell one word (an empty cell is ``-``, spaces inside a cell become
  ``_``), so every line splits on whitespace into as many fields as its header.
- ``json`` and ``yaml``: the whole records, the same data in both.
- ``csv``: the table's columns (all of them, or those ``--columns`` chose)
  with a header row, values as they are; a command showing several tables
  writes each with its header, an empty line between them.

A listing's columns are :class:`Column` objects: ``--columns`` chooses them
by name (``name,state,ipv4``) or, as incus does, by their one-letter
shorthands run together (``ns4``).  Neither Typer nor Click is imported here
(:mod:`popek.cli.fastpath` runs ``list`` and ``info`` without them), and the
YAML and CSV libraries only for their formats.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from popek.errors import InvalidInput

#: the values of every ``--format`` option
FORMATS = ("table", "json", "yaml", "csv")

#: a table: its header and its rows of cells
Section = tuple[Sequence[str], Sequence[Sequence[object]]]


@dataclass(frozen=True)
class Column:
    """One column of a listing: its header, its ``--columns`` letter, how to get its cell."""

    title: str                     # the header: one word (plain tables split on whitespace)
    cell: Callable[[Any], object]  # the cell of one record
    letter: str = ""               # incus-style shorthand for --columns
    default: bool = True           # shown when --columns is not given
    width: int = 0                 # on a terminal, longer cells are cut (plain output never)

    @property
    def name(self) -> str:
        """The column's name for ``--columns``: its header in lower case."""
        return self.title.lower()


def choose(columns: Sequence[Column], spec: str, command: str) -> list[Column]:
    """The columns ``--columns SPEC`` selects, in its order; the default ones for ``""``.

    SPEC is a comma-separated list of column names, each of which may also be
    a run of one-letter shorthands (``ns4`` for name, state, ipv4).  Anything
    else raises :class:`InvalidInput` naming the allowed columns.
    """
    if not spec.strip():
        return [c for c in columns if c.default]
    by_name = {c.name: c for c in columns}
    by_letter = {c.letter: c for c in columns if c.letter}
    chosen: list[Column] = []
    for word in (w.strip() for w in spec.split(",")):
        if word.lower() in by_name:
            chosen.append(by_name[word.lower()])
        elif word and all(ch in by_letter for ch in word):
            chosen.extend(by_letter[ch] for ch in word)
        else:
            allowed = ", ".join(f"{c.name} ({c.letter})" if c.letter else c.name
                                for c in columns)
            raise InvalidInput(f"{command}: unknown column {word!r} in --columns; "
                               f"allowed: {allowed}")
    return chosen


def describe(columns: Sequence[Column]) -> str:
    """The columns for ``--help``: each name (and letter), the default ones marked ``*``."""
    return ", ".join(c.name + (f" ({c.letter})" if c.letter else "") + ("*" if c.default else "")
                     for c in columns) + " (* by default)"


def listing(records: Sequence[Any], columns: Sequence[Column], fmt: str, *,
            select: str = "", command: str = "popek list", data: Any = None,
            stream: TextIO | None = None) -> None:
    """Print ``records`` in ``fmt``: as rows of ``columns`` (chosen by ``select``) or whole.

    json and yaml print ``data`` (the records themselves when ``None``), every
    field whatever ``select`` says; table and csv print the chosen columns.
    """
    chosen = choose(columns, select, command)
    cut = {i: c.width for i, c in enumerate(chosen) if c.width}
    section = ([c.title for c in chosen], [[c.cell(r) for c in chosen] for r in records])
    emit(records if data is None else data, [section], fmt, stream, cut=cut)


def details(data: Any, fields: Sequence[tuple[str, object]], fmt: str,
            more: Sequence[Section] = (), stream: TextIO | None = None) -> None:
    """Print one object: ``data`` whole (json, yaml), or its ``fields`` as a FIELD VALUE table.

    ``more`` are further tables shown after it (an instance's history).
    """
    emit(data, [(("FIELD", "VALUE"), [list(f) for f in fields]), *more], fmt, stream)


def emit(data: Any, sections: Sequence[Section], fmt: str, stream: TextIO | None = None, *,
         cut: dict[int, int] | None = None) -> None:
    """Print ``data`` (json, yaml) or ``sections`` (table, csv) in ``fmt``."""
    out = stream or sys.stdout
    out.write(render(data, sections, fmt, boxed=out.isatty(), cut=cut))
    out.flush()


def render(data: Any, sections: Sequence[Section], fmt: str, boxed: bool = False,
           cut: dict[int, int] | None = None) -> str:
    """The text :func:`emit` prints; ``boxed`` for a terminal, ``cut`` its column widths."""
    if fmt == "json":
        return json.dumps(data, indent=2, default=str) + "\n"
    if fmt == "yaml":
        import yaml

        # through JSON, so both formats give the same data (tuples, paths...)
        plain = json.loads(json.dumps(data, default=str))
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml: 20 times faster
        return str(yaml.dump(plain, Dumper=dumper, sort_keys=False, default_flow_style=False,
                             allow_unicode=True))
    if fmt == "csv":
        return _csv(sections)
    if fmt != "table":
        raise InvalidInput(f"unknown output format {fmt!r}; allowed: {', '.join(FORMATS)}")
    from popek.cli.table import render as table

    parts = []
    for header, rows in sections:
        cells = [[_text(c) for c in row] for row in rows]
        if boxed:
            cells = [[_cut(c, (cut or {}).get(i, 0)) for i, c in enumerate(row)]
                     for row in cells]
        else:
            cells = [[_word(c) for c in row] for row in cells]
        parts.append(table(list(header), cells, boxed=boxed))
    return "\n".join(parts)


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value).replace("\n", " ")


def _word(text: str) -> str:
    """A cell of a plain table: one word, ``-`` when empty."""
    return "_".join(text.split()) or "-"


def _cut(text: str, width: int) -> str:
    return text if not width or len(text) <= width else text[:width - 1] + "…"


def _csv(sections: Sequence[Section]) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for i, (header, rows) in enumerate(sections):
        if i:
            buf.write("\n")
        writer.writerow(header)
        writer.writerows([["" if c is None else c for c in row] for row in rows])
    return buf.getvalue()
