"""Parsing and formatting of sizes such as ``512MiB`` or ``2GiB``."""

from __future__ import annotations

import re

from popek.errors import InvalidInput

_UNITS = {
    "B": 1,
    "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
}
#: more digits than any size a host has (2**64 has 20): refused before ``int`` sees them
MAX_DIGITS = 20
_SIZE = re.compile(r"^\s*(\d+)\s*([A-Za-z]*)\s*$", re.ASCII)
ALLOWED = "a whole number followed by a unit: B, KiB, MiB, GiB, TiB, KB, MB, GB or TB (e.g. 512MiB)"


def parse_size(text: str, what: str = "size") -> int:
    """Parse ``text`` (e.g. ``512MiB``, ``2GiB``) into bytes.

    Raises :class:`InvalidInput` naming ``what`` and the allowed forms.
    """
    m = _SIZE.match(text)
    if not m:
        raise InvalidInput(f"invalid {what} {text!r}: expected {ALLOWED}")
    if len(m.group(1)) > MAX_DIGITS:
        raise InvalidInput(f"invalid {what}: a number of {len(m.group(1))} digits; at most "
                           f"{MAX_DIGITS}, {ALLOWED}")
    number, unit = int(m.group(1)), m.group(2)
    if unit not in _UNITS:
        raise InvalidInput(f"invalid {what} {text!r}: unknown unit {unit or '(none)'!r}; "
                           f"expected {ALLOWED}")
    return number * _UNITS[unit]


def format_size(size: int) -> str:
    """Format bytes in the largest binary unit that divides them evenly (``2GiB``)."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if size and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return f"{size}B"
