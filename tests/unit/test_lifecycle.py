"""The lifecycle state machine allows exactly the documented moves.

The expected moves are written out by hand below, not derived from
``OPERATIONS``: a test that read the legal moves from the table it checks
would pass with any table (allowing ``delete`` from ``running`` passed the
earlier version of this file).
"""

from __future__ import annotations

import pytest

from popek.core.lifecycle import ACTIVE, OPERATIONS, State, next_step, transition
from popek.errors import StateError

S = State

#: (state, operation) -> the state it leads to; every pair not listed is refused.
#: Mirrors the diagram in popek.core.lifecycle's docstring.
EXPECTED: dict[tuple[State, str], State] = {
    (S.STOPPED, "start"): S.STARTING,
    (S.STARTING, "booted"): S.RUNNING,
    (S.RUNNING, "pause"): S.PAUSED,
    (S.PAUSED, "resume"): S.RUNNING,
    (S.STARTING, "stop"): S.STOPPING,
    (S.RUNNING, "stop"): S.STOPPING,
    (S.PAUSED, "stop"): S.STOPPING,
    (S.STARTING, "exited"): S.STOPPED,
    (S.RUNNING, "exited"): S.STOPPED,
    (S.PAUSED, "exited"): S.STOPPED,
    (S.STOPPING, "exited"): S.STOPPED,
    (S.STOPPED, "delete"): S.DELETING,
}

#: the operations, named by hand (a new one must be added here and above)
OPERATION_NAMES = ("start", "booted", "pause", "resume", "stop", "exited", "delete")


def test_the_operations_are_the_documented_ones() -> None:
    assert set(OPERATIONS) == set(OPERATION_NAMES)


def test_the_states_are_the_documented_ones() -> None:
    assert {s.value for s in State} == {
        "stopped", "starting", "running", "paused", "stopping", "deleting"}


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
@pytest.mark.parametrize("op", OPERATION_NAMES)
def test_every_state_and_operation(state: State, op: str) -> None:
    """Each of the 6 x 7 pairs either leads where EXPECTED says or is refused."""
    if (state, op) in EXPECTED:
        assert transition("vm", state, op) == EXPECTED[(state, op)]
        return
    required = sorted(s.value for (s, o) in EXPECTED if o == op)
    with pytest.raises(StateError) as exc:
        transition("vm", state, op)
    err = exc.value
    assert err.target == "vm"
    assert err.operation == op
    assert err.state == state.value
    # the required states are named, sorted, so the message is stable
    assert err.required == tuple(required)
    # then what to do next, when popek knows (issue 13.5)
    hint = next_step("vm", op, state)
    assert err.hint == hint
    assert str(err) == (f"cannot {op} vm: it is {state.value}; "
                        f"{op} needs it to be one of: {', '.join(required)}"
                        + (f"; {hint}" if hint else ""))


def test_delete_from_running_is_refused() -> None:
    """The bug the old test let through, named on its own."""
    with pytest.raises(StateError):
        transition("vm", State.RUNNING, "delete")


def test_active_states_are_those_with_a_live_engine() -> None:
    assert frozenset({S.STARTING, S.RUNNING, S.PAUSED, S.STOPPING}) == ACTIVE


def test_pause_a_stopped_instance_message() -> None:
    with pytest.raises(StateError, match="cannot pause vm: it is stopped; pause needs it"):
        transition("vm", State.STOPPED, "pause")


def test_a_refused_delete_names_stop_and_force() -> None:
    for state in (S.RUNNING, S.PAUSED, S.STARTING):
        with pytest.raises(StateError) as exc:
            transition("web", state, "delete")
        assert "popek stop web" in str(exc.value), state
        assert "popek delete --force web" in str(exc.value), state


def test_starting_a_paused_or_pausing_a_stopped_instance_says_what_to_run() -> None:
    with pytest.raises(StateError, match="resume it: popek resume vm$"):
        transition("vm", State.PAUSED, "start")
    with pytest.raises(StateError, match="start it first: popek start vm$"):
        transition("vm", State.STOPPED, "pause")
