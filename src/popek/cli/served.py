"""Long CLI commands run by ``popek serve``'s command server, recorded as operations.

While ``popek serve`` runs, the CLI's commands run in its command server
(:mod:`popek.cli.cmdserver`, owned by serve).  A long instance verb handed to
it (launch, start, stop, restart, delete: what the API answers with an
operation) is recorded in the store as the API records its own
(:class:`popek.core.operations.Operations`: ``instance.launch`` on the
instance, its project, ``root@host``), and finished when the command ends:
``success``, or ``failure`` named after the exit code.  So ``GET
/1.0/operations`` and ``popek monitor`` show the CLI's work beside the API's.

The record's process is the command's own: one killed outright (SIGKILL,
which runs no exit hook) stays ``running`` until the next ``popek serve``
starts and marks it failed, as an API server's operations when it is killed.
A command line the fast path does not parse (Typer's then), and an instance
of a remote (``lab:web``: the remote records its own), are not recorded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from popek.cli import fastpath, scope
from popek.errors import PopekError

#: the verbs recorded, and their operation's name (the API's, core/requests/instances.py)
OPERATIONS = {"launch": "instance.launch", "start": "instance.start", "stop": "instance.stop",
              "restart": "instance.restart", "delete": "instance.delete"}


def record(args: list[str]) -> Callable[[int], None] | None:
    """Record ``popek ARGS`` as a running operation when it is a long instance verb.

    Returns the hook that finishes it with the command's exit code (for
    :data:`popek.cli.entry.ON_EXIT`), or ``None`` when nothing was recorded
    (another command, or a store the command itself will report on).
    """
    found = fastpath.command(args)
    if found is None or found[0] not in OPERATIONS:
        return None
    params = fastpath.parse(*found)
    name = str((params or {}).get("name") or "")
    if params is None or not name or ":" in name:
        return None
    from popek.core.auth import host_admin
    from popek.core.operations import Operations, code_name
    from popek.state import open_store

    scope.use(params.get("project"))
    try:
        ops = Operations(open_store())
        op_id = ops.create(OPERATIONS[found[0]], name, scope.current(),
                           host_admin().label())["id"]
    except (PopekError, OSError):
        return None

    def finish(code: int) -> None:
        error = None if code == 0 else {
            "code": code_name(code), "field": None,
            "message": f"popek {found[0]} {name} failed (exit code {code})"}
        with contextlib.suppress(PopekError, OSError):  # the code must still get out
            ops.finish(op_id, {"name": name} if code == 0 else None, error)

    return finish
