"""The exception hierarchy of popek, rooted in :class:`PopekError`.

Every error carries a message meant for a human operator: it says what was
wrong and, where it applies, what is allowed.  Front ends (CLI, API) print the
message and exit non-zero; they never show a traceback for a ``PopekError``.
A message is at most :data:`MAX_MESSAGE` characters (:func:`bounded`): a
value that a user or an image gave is echoed by its two ends, never whole.
"""

from __future__ import annotations

#: the longest error message popek prints (a 100 KB value is shown by its ends)
MAX_MESSAGE = 1000

# -- exit codes: a contract scripts rely on ---------------------------------------
# One table, here: `popek --help` prints it and a unit test holds the README's
# table and every error class's ``exit_code`` to it (tests/unit/test_exit_codes.py).
SUCCESS = 0
FAILURE = 1
BAD_INPUT = 2
TAMPERED = 3
DENIED = 4
CONFLICT = 5
UNAVAILABLE = 6
DAMAGED = 7
NOT_FOUND = 8
EXISTS = 9
WRONG_STATE = 10
INTERNAL = 70
INTERRUPTED = 130

#: every exit code of ``popek`` and what it means, in order
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (SUCCESS, "success"),
    (FAILURE, "failed: an engine, the host or a build failed (the message says why)"),
    (BAD_INPUT, "bad input: an argument, option or value is refused; nothing changed"),
    (TAMPERED, "tampered: a signature, a hash or the audit chain failed its check"),
    (DENIED, "denied: the access control policy, a token or its role refused (the "
             "message says which)"),
    (CONFLICT, "conflict: another operation changed the same object at once; retry"),
    (UNAVAILABLE, "the state store cannot be written: busy, no permission or no space"),
    (DAMAGED, "the state store or a log is damaged (its path is in the message)"),
    (NOT_FOUND, "not found: no instance, image, network, key... of that name"),
    (EXISTS, "already exists: there is one of that name"),
    (WRONG_STATE, "wrong state: its state does not allow it; the message says what to do"),
    (INTERNAL, "internal error: a bug in popek, please report it"),
    (INTERRUPTED, "interrupted (Ctrl-C)"),
)
#: what the table leaves out: the commands whose exit code is their guest command's
EXIT_CODES_NOTE = ("popek exec and popek sandbox run exit with the code of the command "
                   "they ran, once it runs.")


def bounded(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` if it has at most ``limit`` characters, else its two ends and what was cut.

    The result is never longer than ``limit`` (at least 100) and says how many
    characters were left out in its middle.
    """
    limit = max(limit, 100)
    if len(text) <= limit:
        return text
    widest = len(f" ...[{len(text)} characters left out]... ")
    keep = limit - widest
    marker = f" ...[{len(text) - keep} characters left out]... "
    head = keep * 2 // 3
    return text[:head] + marker + text[len(text) - (keep - head):]


class PopekError(Exception):
    """Root of every error popek raises on purpose."""

    exit_code: int = FAILURE

    def __init__(self, message: str) -> None:
        message = bounded(message)
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidInput(PopekError):
    """A value given by the user (name, size, count, option) is not acceptable."""

    exit_code = BAD_INPUT


class NotFound(PopekError):
    """A named object (instance, image, ...) does not exist."""

    exit_code = NOT_FOUND


class AlreadyExists(PopekError):
    """A named object already exists."""

    exit_code = EXISTS


class StateError(PopekError):
    """An operation was asked for in a state that does not allow it.

    Carries the current state, the states the operation requires and a
    ``hint``: what to do next (``popek start NAME``), appended to the message.
    """

    exit_code = WRONG_STATE

    def __init__(self, target: str, operation: str, state: str, required: tuple[str, ...],
                 hint: str = "") -> None:
        allowed = ", ".join(required) if required else "none"
        super().__init__(
            f"cannot {operation} {target}: it is {state}; "
            f"{operation} needs it to be one of: {allowed}" + (f"; {hint}" if hint else "")
        )
        self.hint = hint
        self.target = target
        self.operation = operation
        self.state = state
        self.required = required


class ResourceError(PopekError):
    """The host cannot provide what was asked for (CPUs, memory, ...)."""


class EngineError(PopekError):
    """An engine (QEMU, ...) failed or is missing."""


class CapabilityError(EngineError):
    """The engine of an instance does not have a capability an operation needs."""


class ImageError(PopekError):
    """An image is broken, missing files, or cannot be built."""


class IntegrityError(ImageError):
    """A file no longer matches the hash or size recorded for it."""

    exit_code = TAMPERED


class StoreError(PopekError):
    """The state store failed (corrupt database, failed transaction, ...)."""


class ConflictError(StoreError):
    """A compare-and-swap lost: another operation changed the record first; retry."""

    exit_code = CONFLICT


class StoreUnavailable(StoreError):
    """The state store cannot be reached or written (busy, full disk, no permission)."""

    exit_code = UNAVAILABLE


class StoreDamaged(StoreUnavailable):
    """The state store or a log is damaged; its path is in the message, nothing was replaced."""

    exit_code = DAMAGED


class AgentError(EngineError):
    """The guest agent did not answer or answered something unexpected."""


class NoSpace(StoreUnavailable):
    """The filesystem that holds popek's files (``POPEK_HOME``) is full; nothing was changed."""


def no_space(exc: BaseException, path: object = None) -> NoSpace | None:
    """The :class:`NoSpace` error for ``exc`` when it means a full filesystem, else ``None``.

    ``path`` names the file that was written when ``exc`` does not (SQLite's errors).
    """
    import errno

    if isinstance(exc, NoSpace):
        return exc
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        path = exc.filename2 or exc.filename or path  # a copy names the target second
    elif not (path is not None and "disk is full" in str(exc)):  # sqlite3's SQLITE_FULL
        return None
    where = f"the filesystem holding {path}" if path else "a filesystem popek writes to"
    return NoSpace(f"no space left on {where}: the command changed nothing; free space "
                   "there and run it again")
