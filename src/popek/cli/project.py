"""``popek project`` and ``popek token``: projects (tenancy, defaults, quotas) and API tokens.

See :mod:`popek.core.projects` and :mod:`popek.core.auth`; every change is a
request to the core (audited there).
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any

import typer

from popek.cli import ops, scope
from popek.cli.common import columns_option, format_option
from popek.cli.output import Column, details, listing

app = typer.Typer(no_args_is_help=True,
                  help="Projects: create, list, switch, delete; their defaults and quotas.")
token_app = typer.Typer(no_args_is_help=True,
                        help="API tokens: a project and a role (admin, operator, viewer).")

PROJECT_COLUMNS = (
    Column("NAME", itemgetter("name"), "n"),
    Column("CURRENT", lambda r: "*" if r["current"] else "", "c"),
    Column("INSTANCES", itemgetter("instances"), "i"),
)


def _rows() -> list[dict[str, Any]]:
    from popek.core.views import project_summaries

    return project_summaries(ops.core(check=False), scope.current())


@app.command("list")
def list_(fmt: str = format_option(), columns: str = columns_option(PROJECT_COLUMNS)) -> None:
    """List the projects (* marks the current one) and how many instances each holds."""
    listing(_rows(), PROJECT_COLUMNS, fmt, select=columns, command="popek project list")


@app.command("create")
def create(name: str = typer.Argument(..., help="Project name: a-z, 0-9 and '-'.")) -> None:
    """Create a project (no quotas; popek project set adds them)."""
    from popek.core.requests import ProjectCreate

    ops.core(check=False).handle(ProjectCreate(name))
    print(f"Project {name} created.")


@app.command("delete")
def delete(name: str) -> None:
    """Delete an empty project (refused while it holds instances or profiles)."""
    from popek.core.requests import ProjectDelete

    ops.core(check=False).handle(ProjectDelete(name))
    if scope.stored() == name:
        scope.switch("default")
    print(f"Project {name} deleted.")


@app.command("switch")
def switch(name: str) -> None:
    """Make NAME the project of later commands ($POPEK_PROJECT and --project win over it)."""
    from popek.core.projects import Projects

    Projects(ops.core(check=False).store).require(name)
    scope.switch(name)
    print(f"Current project: {name}.")


@app.command("show")
def show(name: str | None = typer.Argument(None, help="The project (default: the current)."),
         fmt: str = format_option()) -> None:
    """Show a project's defaults, its quotas and what its instances use of them."""
    from popek.core.views import project_detail

    record = project_detail(ops.core(check=False), name or scope.current())
    details(record, list(record.items()), fmt)


@app.command("set")
def set_(name: str = typer.Argument(..., help="The project."),
         values: list[str] = typer.Argument(..., metavar="KEY=VALUE...",
                                            help="default.limits.disk (a new container's "
                                                 "writable layer), limits.instances, "
                                                 "limits.cpu, limits.memory, limits.disk "
                                                 "(quotas; empty: no limit).")) -> None:
    """Change defaults and quotas of a project; existing instances keep their own values."""
    from popek.core.projects import Projects
    from popek.core.requests import ProjectSet
    from popek.errors import InvalidInput

    pairs = [v.partition("=") for v in values]
    bad = [v for v, (_, eq, _) in zip(values, pairs, strict=True) if not eq]
    if bad:
        raise InvalidInput(f"invalid {bad[0]!r}: give KEY=VALUE (an empty VALUE unsets a quota)")
    for key, _, value in pairs:  # every value checked before the first is set
        Projects.parse(key, value)
    core = ops.core(check=False)
    for key, _, value in pairs:
        core.handle(ProjectSet(name, key, value))
        print(f"Project {name}: {key} = {value or 'unlimited'}.")


TOKEN_COLUMNS = (
    Column("ID", itemgetter("id"), "i"), Column("NAME", itemgetter("name"), "n"),
    Column("PROJECT", itemgetter("project"), "p"), Column("ROLE", itemgetter("role"), "r"),
    Column("CONSOLE", lambda r: "yes" if r["console"] else "no", "c"),
    Column("CREATED", itemgetter("created"), "t", default=False),
    Column("EXPIRES", lambda r: r["expires"] or "never", "e"),
    Column("REVOKED", lambda r: r["revoked"] or "", "v"),
)


@token_app.command("create")
def token_create(
    project: str = typer.Option(..., "--project", help="The project the token acts in."),
    role: str = typer.Option(..., "--role", help="admin, operator or viewer."),
    console: bool = typer.Option(False, "--console", help="May use the console and exec."),
    expires: float | None = typer.Option(None, "--expires", metavar="DAYS",
                                         help="Days until it expires (default: never)."),
    name: str | None = typer.Option(None, "--name", help="A name to know it by."),
) -> None:
    """Create an API token; its secret is printed once and never stored."""
    from popek.core.requests import TokenCreate

    token, secret = ops.core(check=False).handle(TokenCreate(project, role, console, name, expires))
    print(f"Token {token.name} ({token.id}): {token.role} in project {token.project}"
          f"{', console/exec' if token.console else ''}"
          f"{', expires ' + token.expires if token.expires else ''}.", flush=True)
    print("Its secret (shown this once; keep it safe):")
    print(secret)


@token_app.command("list")
def token_list(fmt: str = format_option(), columns: str = columns_option(TOKEN_COLUMNS),
               project: str | None = typer.Option(None, "--project",
                                                  help="Only this project's tokens.")) -> None:
    """List the API tokens (never their secrets)."""
    from popek.core.views import token_summaries

    rows = token_summaries(ops.core(check=False), project)
    listing(rows, TOKEN_COLUMNS, fmt, select=columns, command="popek token list")


@token_app.command("revoke")
def token_revoke(token_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Revoke an API token at once (it stays listed, as revoked)."""
    from popek.core.requests import TokenRevoke

    token = ops.core(check=False).handle(TokenRevoke(token_id))
    print(f"Token {token.name} ({token.id}) revoked.")
