"""The one "Did you mean" of an unknown command: only for a slip of the fingers.

Click and Typer each add a suggestion to an unknown command (popek printed
it twice), both from :func:`difflib.get_close_matches`, which offers ``set``
for ``get`` and ``stop`` for ``shop``.  Here a word is suggested only when
the typed one is a single slip away from it: one letter left out, one too
many, two neighbours swapped (words of three letters or more), or the
start of exactly one command.  A
different letter (``get`` for ``set``) is no slip: it may be another word.
"""

from __future__ import annotations

from collections.abc import Iterable


def slip(typed: str, word: str) -> bool:
    """Whether ``typed`` is ``word`` with one letter dropped, added or two swapped."""
    if typed == word:
        return False
    if len(typed) == len(word):
        diff = [i for i, (a, b) in enumerate(zip(typed, word, strict=True)) if a != b]
        return (len(diff) == 2 and diff[1] == diff[0] + 1
                and typed[diff[0]] == word[diff[1]] and typed[diff[1]] == word[diff[0]])
    short, long_ = sorted((typed, word), key=len)
    if len(long_) - len(short) != 1:
        return False
    return any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))


def suggestions(typed: str, commands: Iterable[str]) -> list[str]:
    """The commands ``typed`` may have meant (sorted), or none."""
    names = sorted(set(commands))
    found = [c for c in names if slip(typed, c)] if len(typed) >= 3 else []
    if not found and len(typed) >= 2:
        starting = [c for c in names if c.startswith(typed)]
        found = starting if len(starting) == 1 else []
    return found


def message(typed: str, commands: Iterable[str]) -> str:
    """Click's line for an unknown command, with at most one suggestion sentence."""
    found = suggestions(typed, commands)
    line = f"No such command {typed!r}."
    if len(found) == 1:
        return f"{line} Did you mean {found[0]!r}?"
    if found:
        return f"{line} Did you mean one of: {', '.join(repr(f) for f in found)}?"
    return line
