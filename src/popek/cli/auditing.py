"""Which ``popek`` commands are written to the audit log, and as what.

Every command is audited except the read-only ones listed in
:data:`READ_ONLY`, so a new command is audited unless someone decides
otherwise.  The operation is the command path (``instance.launch``,
``network.create``, ``trust.revoke``...), the target its first argument, the
parameters the digest of the whole command line.
"""

from __future__ import annotations

from typing import Any

import click

READ_ONLY = frozenset({
    "list", "info", "config.show",
    "image.list", "image.info",
    "network.list", "network.info",
    "trust.list", "trust.export",
    "policy.show", "policy.check",
    "audit.log", "audit.verify",
    "sandbox.profiles",
})
# Commands that are sessions with a guest: audited even though they change nothing.
SESSIONS = frozenset({"console", "exec", "attest"})


def describe(root: click.Command, argv: list[str]) -> tuple[str, str] | None:
    """Return (operation, target) for ``argv``, or ``None`` when it is not audited."""
    cmd, path, args = root, [], list(argv)
    while isinstance(cmd, click.Group) and args and not args[0].startswith("-"):
        sub = cmd.get_command(click.Context(cmd), args[0])
        if sub is None:
            return None
        path.append(args.pop(0))
        cmd = sub
    if not path or isinstance(cmd, click.Group) or "--help" in args:
        return None
    op = ".".join(path)
    if op in READ_ONLY or (op == "console" and "--log" in args) or (
            op == "attest" and args[:1] == ["verify"] and len(args) > 1
            and not args[1].startswith("-")):  # checking a quote changes nothing
        return None
    target = ""
    try:
        ctx = cmd.make_context(path[-1], args, resilient_parsing=True)
        # the instance (or object) name when the command has one, else its first argument
        params = sorted(cmd.params, key=lambda p: p.name != "name")
        for p in params:
            if isinstance(p, click.Argument) and p.name and ctx.params.get(p.name):
                value: Any = ctx.params[p.name]
                target = " ".join(value) if isinstance(value, list | tuple) else str(value)
                break
        if not target and isinstance(ctx.params.get("project"), str):
            target = f"project {ctx.params['project']}"
    except click.ClickException:
        pass
    kind = "session" if op in SESSIONS else "instance" if len(path) == 1 else ""
    return (f"{kind}.{op}" if kind else op), target
