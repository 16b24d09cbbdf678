"""Tables for people and for scripts, in a few milliseconds whatever their length.

On a terminal, a boxed table (the look Rich gives, without its layout
engine: Rich took over a second for 500 rows here).  Anywhere else, plain
columns: a header line, two spaces between columns, no box characters and
nothing cut, so ``awk``, ``cut`` and ``column`` work on the output.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

_EDGES = {  # (left, fill, joint, right) of each horizontal rule and row
    "top": ("┏", "━", "┳", "┓"), "head": ("┃", " ", "┃", "┃"),
    "under": ("┡", "━", "╇", "┩"), "row": ("│", " ", "│", "│"),
    "bottom": ("└", "─", "┴", "┘"),
}


def _width(text: str) -> int:
    return len(text)


def _line(kind: str, cells: Sequence[str], widths: Sequence[int]) -> str:
    left, fill, joint, right = _EDGES[kind]
    if kind in ("head", "row"):
        parts = [f" {c}{' ' * (w - _width(c))} " for c, w in zip(cells, widths, strict=True)]
    else:
        parts = [fill * (w + 2) for w in widths]
    return left + joint.join(parts) + right


def render(columns: Sequence[str], rows: Sequence[Sequence[str]], boxed: bool) -> str:
    """The table as text: boxed for a terminal, plain columns otherwise."""
    cells = [[str(c).replace("\n", " ") for c in row] for row in rows]
    widths = [max([_width(h), *(_width(r[i]) for r in cells)]) for i, h in enumerate(columns)]
    if not boxed:
        lines = [list(columns), *cells]
        return "\n".join("  ".join(f"{c}{' ' * (w - _width(c))}" if i < len(widths) - 1 else c
                                   for i, (c, w) in enumerate(zip(line, widths, strict=True)))
                         for line in lines) + "\n"
    out = [_line("top", [], widths), _line("head", columns, widths), _line("under", [], widths)]
    out += [_line("row", r, widths) for r in cells]
    out.append(_line("bottom", [], widths))
    return "\n".join(out) + "\n"


def print_table(columns: Sequence[str], rows: Sequence[Sequence[str]],
                stream: TextIO | None = None) -> None:
    """Print ``rows`` under ``columns``: boxed on a terminal, plain columns otherwise."""
    out = stream or sys.stdout
    out.write(render(columns, rows, boxed=out.isatty()))
    out.flush()
