"""The audit of command lines that never reached the core.

Every request that reaches :meth:`popek.core.service.Core.handle` is audited
there.  A command that fails before it builds its request (a usage error,
an unknown option, a size that does not parse) is audited here instead, so
that every attempt leaves a record: every command except the read-only ones
listed in :data:`READ_ONLY`, so a new command is audited unless someone
decides otherwise.  The operation is the command path (``instance.launch``,
``network.create``, ``trust.revoke``...), the same name the core's request
uses, the target its first argument, the parameters the digest of the whole
command line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import click

READ_ONLY = frozenset({
    "list", "info", "config.show", "config.get", "profile.list", "profile.show",
    "image.list", "image.info",
    "network.list", "network.info",
    "trust.list", "trust.export",
    "policy.show", "policy.check",
    "audit.log", "audit.verify",
    "certificate.list",
    "sandbox.profiles",
    # the user's own remotes file, not this host's state (a remote audits what it is sent)
    "remote.list", "remote.add", "remote.remove", "remote.switch",
})
# Commands that are sessions with a guest: audited even though they change nothing.
SESSIONS = frozenset({"console", "exec", "attest"})


def operation(path: list[str], args: list[str]) -> str | None:
    """The audited operation of the command ``path`` given ``args``, or ``None`` (read-only)."""
    op = ".".join(path)
    if not path or "--help" in args or op in READ_ONLY or (
            op == "console" and "--log" in args) or (
            op == "attest" and args[:1] == ["verify"] and len(args) > 1
            and not args[1].startswith("-")):  # checking a quote changes nothing
        return None
    kind = "session" if op in SESSIONS else "instance" if len(path) == 1 else ""
    return f"{kind}.{op}" if kind else op


def target_of(arguments: list[str], params: dict[str, Any]) -> str:
    """The object of a command: its ``name`` argument, else its first one, else the project.

    ``arguments`` are the command's positional parameter names in order,
    ``params`` their parsed values.
    """
    for p in sorted(arguments, key=lambda p: p != "name"):
        value = params.get(p)
        if value:
            return " ".join(value) if isinstance(value, list | tuple) else str(value)
    project = params.get("project")
    return f"project {project}" if isinstance(project, str) else ""


def describe(root: click.Command, argv: list[str]) -> tuple[str, str] | None:
    """Return (operation, target) for ``argv``, or ``None`` when it is not audited."""
    import click

    cmd, path, args = root, [], list(argv)
    while isinstance(cmd, click.Group) and args and not args[0].startswith("-"):
        sub = cmd.get_command(click.Context(cmd), args[0])
        if sub is None:
            return None
        path.append(args.pop(0))
        cmd = sub
    if isinstance(cmd, click.Group):
        return None
    op = operation(path, args)
    if op is None:
        return None
    target = ""
    try:
        ctx = cmd.make_context(path[-1], args, resilient_parsing=True)
        target = target_of([p.name for p in cmd.params
                            if isinstance(p, click.Argument) and p.name], ctx.params)
    except click.ClickException:
        pass
    return op, target


def record(op: str, target: str, args: list[str], code: int, error: str) -> None:
    """Append one command's record to the audit log (a warning if it cannot be written)."""
    from popek.cli import scope
    from popek.core.auth import HOST_ADMIN
    from popek.core.service import warn_unaudited
    from popek.errors import PopekError
    from popek.state import open_store
    from popek.trust.audit import AuditLog
    from popek.trust.keys import TrustStore

    try:
        result = "ok" if code == 0 else (f"error: {error}" if error else f"exit {code}")
        AuditLog(TrustStore(open_store())).append(
            op, target, {"argv": args}, result[:500], identity=HOST_ADMIN,
            project=scope.current())
    except (OSError, PopekError) as exc:
        warn_unaudited(exc, error)
