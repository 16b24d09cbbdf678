"""The lifecycle state machine of an instance.

States and the operations that move between them::

    stopped --start--> starting --(booted)--> running
    running --pause--> paused --resume--> running
    running|paused --stop--> stopping --(exited)--> stopped
    starting|running|paused|stopping --(engine died)--> stopped (with a reason)
    stopped --delete--> deleting --> (gone)

``starting``, ``stopping`` and ``deleting`` are intents: they are written to
the store before popek acts, so a crash in the middle is found and settled by
reconcile.  Any other move raises :class:`popek.errors.StateError`.
"""

from __future__ import annotations

from enum import StrEnum

from popek.errors import StateError


class State(StrEnum):
    """The states an instance can be in."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    DELETING = "deleting"


#: operation -> (states it may start from, state it leads to)
OPERATIONS: dict[str, tuple[frozenset[State], State]] = {
    "start": (frozenset({State.STOPPED}), State.STARTING),
    "booted": (frozenset({State.STARTING}), State.RUNNING),
    "pause": (frozenset({State.RUNNING}), State.PAUSED),
    "resume": (frozenset({State.PAUSED}), State.RUNNING),
    "stop": (frozenset({State.RUNNING, State.PAUSED, State.STARTING}), State.STOPPING),
    "exited": (frozenset({State.STARTING, State.RUNNING, State.PAUSED, State.STOPPING}),
               State.STOPPED),
    "delete": (frozenset({State.STOPPED}), State.DELETING),
}

#: states in which the engine process is expected to be alive
ACTIVE = frozenset({State.STARTING, State.RUNNING, State.PAUSED, State.STOPPING})


def transition(target: str, state: State, operation: str) -> State:
    """Return the state ``operation`` leads to from ``state``.

    Raises :class:`StateError` naming the current and the required states when
    the operation is not allowed from ``state``.
    """
    allowed, result = OPERATIONS[operation]
    if state not in allowed:
        required = tuple(sorted(s.value for s in allowed))
        raise StateError(target, operation, state.value, required)
    return result
