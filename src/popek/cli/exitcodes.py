"""popek's exit codes as ``popek --help`` and the README show them.

The codes and their meanings are one table, :data:`popek.errors.EXIT_CODES`;
this module only formats it: the help's epilog and the README's Markdown
table (tests/unit/test_exit_codes.py holds the README to it).
"""

from __future__ import annotations

from popek.errors import EXIT_CODES, EXIT_CODES_NOTE


def epilog() -> str:
    """The exit codes for ``popek --help``: one paragraph per code (Typer joins lines)."""
    lines = [f"{code:<5}{meaning}" for code, meaning in EXIT_CODES]
    return "\n\n".join(["Exit codes:", *lines, EXIT_CODES_NOTE])


def markdown() -> str:
    """The exit codes as the README's Markdown table, and the note under it."""
    rows = [f"| {code} | {meaning} |" for code, meaning in EXIT_CODES]
    return "\n".join(["| code | meaning |", "|-----:|---------|", *rows, "", EXIT_CODES_NOTE])
