"""The ``popek`` console script: the fast path for instance verbs, Typer for the rest.

:func:`main` tries :mod:`popek.cli.fastpath` first; when it declines a
command line, the Typer application of :mod:`popek.cli.main` handles it.
Both end in :func:`finish`: a ``PopekError`` is printed as one line and
exits with its code, the command is audited (see :mod:`popek.cli.auditing`),
and the process exits without the interpreter's teardown.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from collections.abc import Callable

#: the program's name in every usage line, error and completion script, whatever
#: started the interpreter (the native client's fallback runs ``python -c``, the
#: command server ``python -m popek.cli.cmdserver``)
PROG_NAME = "popek"

#: the exit code of a failure that is popek's own fault (a bug), as sysexits' EX_SOFTWARE
INTERNAL_ERROR = 70

#: called with the exit code just before the process exits (the command
#: server's child reports the code to its client here)
ON_EXIT: list[Callable[[int], None]] = []


def warn_unless_root(args: list[str]) -> None:
    """Say that instances need root, unless asking for help or completing a command line."""
    if os.geteuid() != 0 and "--help" not in args and not os.environ.get("_POPEK_COMPLETE"):
        print("popek: warning: not running as root; instances need root to drop to their "
              "own uid", file=sys.stderr)


def finish(call: Callable[[], int | None], audit: Callable[[int, str], None]) -> NoReturn:
    """Run ``call``, report its error if it fails, audit it, exit with its code."""
    from popek.errors import PopekError, bounded, no_space

    code, error = 0, ""
    try:
        try:
            code = call() or 0
        except OSError as exc:  # a full filesystem is the host's state, not a bug
            from popek import paths

            full = no_space(exc, paths.home())
            if full is None:
                raise
            raise full from exc
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            error = bounded(str(exc.code))
            print(error, file=sys.stderr)
    except PopekError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        code, error = exc.exit_code, f"{type(exc).__name__}: {exc}"
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        code, error = 130, "interrupted"
    except Exception as exc:  # a bug: one line for the user, the traceback on request
        code, error = INTERNAL_ERROR, bounded(f"internal error: {type(exc).__name__}: {exc}")
        print(internal_message(exc), file=sys.stderr)
        if os.environ.get("POPEK_DEBUG"):
            import traceback

            traceback.print_exc()
    audit(code, error)
    # Every store write is committed and every file closed by now: skip the
    # interpreter's teardown (tens of milliseconds) so commands return at once.
    # What they wrote goes from the WAL into state.db first (a failure is one line).
    store = sys.modules.get("popek.state.store")  # not imported: nothing was written
    leave(store.checkpoint_at_exit(code) if store else code)


def internal_message(exc: BaseException) -> str:
    """The one line a bug in popek prints (bounded, no traceback unless ``POPEK_DEBUG``)."""
    from popek.errors import bounded

    return (f"Error: popek failed inside ({type(exc).__name__}: {bounded(str(exc), 600)}); "
            "this is a bug, please report it (POPEK_DEBUG=1 shows where)")


def leave(code: int) -> NoReturn:
    """Flush stdio, run the ``ON_EXIT`` hooks and exit at once with ``code``."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):  # a closed pipe: the code must still get out
            stream.flush()
    for hook in ON_EXIT:
        hook(code)
    os._exit(code)


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point of the ``popek`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    from popek.proc import TOOL_PATH

    os.environ["PATH"] = TOOL_PATH  # the tools popek runs come from the system, not the caller
    from popek.cli import fastpath

    found = fastpath.command(args)
    if found is not None:
        values = fastpath.parse(*found)
        if values is not None:
            warn_unless_root(args)
            _fast(args, found[0], values)
    from popek.cli.main import main as typer_main

    typer_main(args)


def _fast(args: list[str], verb: str, values: dict[str, object]) -> NoReturn:
    from popek.cli import auditing, ops
    from popek.cli._fasttable import TABLE

    spec = TABLE[verb]
    func = getattr(ops, spec["func"])
    path = verb.split()

    def audit(code: int, error: str) -> None:
        if ops.audited():
            return  # the core audited the request itself
        op = auditing.operation(path, args[len(path):])
        if op is not None:
            arguments = [p["name"] for p in spec["params"] if p["kind"] == "argument"]
            auditing.record(op, auditing.target_of(arguments, values), args, code, error)

    finish(lambda: func(**values), audit)
