"""Names, sizes and resource requests are validated with clear messages."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popek.core.host import check_resources, host_cpus, host_memory
from popek.core.model import validate_name
from popek.errors import InvalidInput, ResourceError
from popek.units import format_size, parse_size


@pytest.mark.parametrize("name", ["a", "vm1", "web-01", "a" * 63])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "1vm", "-vm", "vm-", "VM", "a" * 64, "a_b", "a.b", "a b",
                                  "../x", "é"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidInput, match="lower-case letters"):
        validate_name(name)


@pytest.mark.parametrize(("text", "size"), [("512MiB", 512 << 20), ("2GiB", 2 << 30),
                                            ("1KB", 1000), ("64 MiB", 64 << 20), ("10B", 10)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "abc", "-1GiB", "1.5GiB", "12XB", "GiB", "512", "1e3MiB"])
def test_parse_size_rejects_nonsense(text: str) -> None:
    with pytest.raises(InvalidInput, match="MiB"):
        parse_size(text, "memory")


@given(st.integers(min_value=1, max_value=1 << 45))
def test_format_parse_roundtrip(n: int) -> None:
    assert parse_size(format_size(n)) == n


def test_resources_checked_against_host() -> None:
    check_resources(1, 64 << 20)
    with pytest.raises(ResourceError, match="CPUs"):
        check_resources(host_cpus() + 1, 64 << 20)
    with pytest.raises(ResourceError, match="memory"):
        check_resources(1, (host_memory() & ~((1 << 20) - 1)) + (1 << 30))
    with pytest.raises(InvalidInput, match="at least 1"):
        check_resources(0, 64 << 20)
    with pytest.raises(InvalidInput, match="at least 64MiB"):
        check_resources(1, 1 << 20)
    with pytest.raises(InvalidInput, match="whole number of MiB"):
        check_resources(1, (64 << 20) + 1)
