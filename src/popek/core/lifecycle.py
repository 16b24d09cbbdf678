"""The lifecycle state machine of an instance.

States and the operations that move between them::

    stopped --start--> starting --(booted)--> running
    running --pause--> paused --resume--> running
    running|paused --stop--> stopping --(exited)--> stopped
    starting|running|paused|stopping --(engine died)--> stopped (with a reason)
    stopped --delete--> deleting --> (gone)

``starting``, ``stopping`` and ``deleting`` are intents: they are written to
the store before popek acts, so a crash in the middle is found and settled by
reconcile.  Any other move raises :class:`popek.errors.StateError`, whose
message ends with what to do next (:func:`next_step`).
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


#: what to do next when an operation finds an instance in a state that refuses it:
#: (operation, state) -> the advice, ``{name}`` standing for the instance
_STOPPED = "start it first: popek start {name}"
_ACTIVE = "stop it first (popek stop {name}), or delete it at once: popek delete --force {name}"
_BUSY = "another operation is under way; popek info {name} shows it"
NEXT_STEPS: dict[tuple[str, State], str] = {
    **{("delete", s): _ACTIVE for s in (State.RUNNING, State.PAUSED, State.STARTING)},
    ("delete", State.STOPPING): "it is stopping; delete it when it is stopped, or at once: "
                                "popek delete --force {name}",
    ("start", State.RUNNING): "it runs already; popek restart {name} starts it again",
    ("start", State.PAUSED): "resume it: popek resume {name}",
    ("start", State.STOPPING): "it is stopping; start it when popek info {name} says stopped",
    ("pause", State.STOPPED): _STOPPED,
    ("pause", State.PAUSED): "it is paused already; popek resume {name} resumes it",
    ("resume", State.STOPPED): _STOPPED,
    ("resume", State.RUNNING): "it runs already",
    ("stop", State.STOPPING): _BUSY,
    ("exec", State.STOPPED): _STOPPED,
    ("exec", State.PAUSED): "resume it first: popek resume {name}",
    ("attach a console to", State.STOPPED): _STOPPED + "; popek console {name} --log prints "
                                            "what its console wrote",
}


def next_step(target: str, operation: str, state: State) -> str:
    """What to do when ``operation`` finds instance ``target`` in ``state`` (``""``: no advice)."""
    advice = NEXT_STEPS.get((operation, state))
    if advice is None and state in (State.STARTING, State.DELETING):
        advice = _BUSY
    return advice.format(name=target) if advice else ""


def refused(target: str, operation: str, state: State, required: tuple[str, ...]) -> StateError:
    """The :class:`StateError` of ``operation`` on ``target`` in ``state``, with the next step."""
    return StateError(target, operation, state.value, required,
                      next_step(target, operation, state))


def transition(target: str, state: State, operation: str) -> State:
    """Return the state ``operation`` leads to from ``state``.

    Raises :class:`StateError` naming the current and the required states, and
    what to do next, when the operation is not allowed from ``state``.
    """
    allowed, result = OPERATIONS[operation]
    if state not in allowed:
        raise refused(target, operation, state, tuple(sorted(s.value for s in allowed)))
    return result
