"""CPU placement: instances are pinned to the least used host CPUs."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from popek.core.placement import choose, cpu_list
from popek.engines.container.spec import Limits


def test_first_instance_gets_the_lowest_cpus() -> None:
    assert choose(1, [], [0, 1, 2, 3]) == (0,)
    assert choose(2, [], [0, 1, 2, 3]) == (0, 1)


def test_next_instances_go_to_the_least_used_cpus() -> None:
    assert choose(1, [(0,)], [0, 1]) == (1,)
    assert choose(2, [(0, 1)], [0, 1, 2, 3]) == (2, 3)
    assert choose(1, [(0,), (1,)], [0, 1]) == (0,)  # a tie goes to the lowest number


def test_an_instance_as_large_as_the_host_is_not_pinned() -> None:
    assert choose(2, [], [0, 1]) == ()
    assert choose(8, [(0,)], [0, 1]) == ()


def test_cpus_outside_the_allowed_set_are_ignored() -> None:
    assert choose(1, [(5, 6)], [0, 1]) == (0,)


@given(st.integers(1, 8), st.lists(st.lists(st.integers(0, 7), max_size=4), max_size=6))
def test_choice_is_valid(vcpus: int, busy: list[list[int]]) -> None:
    cpus = list(range(8))
    got = choose(vcpus, busy, cpus)
    if vcpus >= len(cpus):
        assert got == ()
    else:
        assert len(got) == vcpus == len(set(got)) and set(got) <= set(cpus)
        load = {c: sum(c in b for b in busy) for c in cpus}
        # no unchosen CPU carries fewer instances than a chosen one
        assert max(load[c] for c in got) <= min(load[c] for c in cpus if c not in got)


def test_container_limits_carry_the_cpuset() -> None:
    assert Limits(1 << 27, 1.0, 64, cpuset=cpu_list((1,))).resources()["cpu"]["cpus"] == "1"
    assert "cpus" not in Limits(1 << 27, 1.0, 64).resources()["cpu"]
