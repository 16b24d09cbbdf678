"""Size parsing (popek.units): every unit's exact factor and the exact refusals.

Written against the survivors of ``make mutants`` (bench/mutants.py): the
messages name what was being parsed (``size`` unless told) and say ``(none)``
when the unit is missing.
"""

from __future__ import annotations

import pytest

from popek.errors import InvalidInput
from popek.units import ALLOWED, format_size, parse_size


@pytest.mark.parametrize(("unit", "factor"), [
    ("B", 1), ("KiB", 1024), ("MiB", 1024**2), ("GiB", 1024**3), ("TiB", 1024**4),
    ("KB", 1000), ("MB", 1000**2), ("GB", 1000**3), ("TB", 1000**4),
])
def test_every_unit_has_its_factor(unit: str, factor: int) -> None:
    assert parse_size(f"3{unit}") == 3 * factor
    assert parse_size(f" 7 {unit} ") == 7 * factor


def test_the_default_name_is_size() -> None:
    with pytest.raises(InvalidInput) as exc:
        parse_size("lots")
    assert str(exc.value) == f"invalid size 'lots': expected {ALLOWED}"


def test_a_missing_unit_is_named_none() -> None:
    with pytest.raises(InvalidInput) as exc:
        parse_size("512")
    assert str(exc.value) == (f"invalid size '512': unknown unit '(none)'; expected {ALLOWED}")


def test_an_unknown_unit_is_named() -> None:
    with pytest.raises(InvalidInput) as exc:
        parse_size("5mib", "memory")
    assert str(exc.value) == f"invalid memory '5mib': unknown unit 'mib'; expected {ALLOWED}"


@pytest.mark.parametrize(("size", "text"), [
    (0, "0B"), (1, "1B"), (1023, "1023B"), (1024, "1KiB"), (1536, "1536B"),
    (3 << 20, "3MiB"), (5 << 30, "5GiB"), (2 << 40, "2TiB"), ((1 << 40) + (1 << 30), "1025GiB"),
])
def test_format_size_uses_the_largest_unit_that_divides(size: int, text: str) -> None:
    assert format_size(size) == text
