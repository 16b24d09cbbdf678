"""The lifecycle state machine allows exactly the documented moves."""

from __future__ import annotations

import pytest

from popek.core.lifecycle import OPERATIONS, State, transition
from popek.errors import StateError


@pytest.mark.parametrize(("state", "op", "result"), [
    (State.STOPPED, "start", State.STARTING),
    (State.STARTING, "booted", State.RUNNING),
    (State.RUNNING, "pause", State.PAUSED),
    (State.PAUSED, "resume", State.RUNNING),
    (State.RUNNING, "stop", State.STOPPING),
    (State.PAUSED, "stop", State.STOPPING),
    (State.STOPPING, "exited", State.STOPPED),
    (State.STOPPED, "delete", State.DELETING),
])
def test_allowed(state: State, op: str, result: State) -> None:
    assert transition("vm", state, op) == result


def test_every_illegal_move_is_refused_with_the_required_states() -> None:
    for op, (allowed, _) in OPERATIONS.items():
        for state in set(State) - allowed:
            with pytest.raises(StateError) as exc:
                transition("vm", state, op)
            assert exc.value.state == state.value
            assert set(exc.value.required) == {s.value for s in allowed}
            assert state.value in str(exc.value)


def test_pause_a_stopped_instance_message() -> None:
    with pytest.raises(StateError, match="cannot pause vm: it is stopped; pause needs it"):
        transition("vm", State.STOPPED, "pause")
