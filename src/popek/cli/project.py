"""``popek project`` and ``popek token``: projects (tenancy, defaults, quotas) and API tokens.

See :mod:`popek.core.projects` and :mod:`popek.core.auth`; every change is a
request to the core (audited there).  Every command but ``project switch``
also works on a remote (``lab:``, ``lab:NAME``, or the default remote of
``popek remote switch``), through its API (:mod:`popek.cli.remoteops`), printed
by the same code; ``project switch`` chooses this host's current project only.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any
from urllib.parse import quote

import typer

from popek.cli import ops, remotes, scope
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


def _api(remote: str) -> Any:
    from popek.cli import remoteops

    return remoteops.client(remote)


def _remote_option() -> Any:
    return typer.Argument(None, metavar="[REMOTE:]",
                          help="A remote (lab:; popek remote list); default: the default "
                               "remote (popek remote switch), else this host.")


@app.command("list")
def list_(remote: str | None = _remote_option(), fmt: str = format_option(),
          columns: str = columns_option(PROJECT_COLUMNS)) -> None:
    """List the projects (* marks the current one) and how many instances each holds."""
    on = remotes.list_target(remote, "popek project list")
    if on is not None:
        from popek.cli import remoteops

        rows = remoteops.projects(on)
    else:
        rows = _rows()
    listing(rows, PROJECT_COLUMNS, fmt, select=columns, command="popek project list")


@app.command("create")
def create(name: str = typer.Argument(..., metavar="[REMOTE:]NAME",
                                      help="Project name: a-z, 0-9 and '-' (lab:NAME: on "
                                           "remote lab).")) -> None:
    """Create a project (no quotas; popek project set adds them)."""
    where = remotes.locate(name, "project")
    if where is not None:
        _api(where[0]).call("POST", "/1.0/projects", json={"name": where[1]})
        print(f"Project {where[1]} created.")
        return
    from popek.core.requests import ProjectCreate

    ops.core(check=False).handle(ProjectCreate(name))
    print(f"Project {name} created.")


@app.command("delete")
def delete(name: str = typer.Argument(..., metavar="[REMOTE:]NAME",
                                      help="The project (lab:NAME: on remote lab).")) -> None:
    """Delete an empty project (refused while it holds instances or profiles)."""
    where = remotes.locate(name, "project")
    if where is not None:
        _api(where[0]).call("DELETE", f"/1.0/projects/{quote(where[1], safe='')}")
        print(f"Project {where[1]} deleted.")
        return
    from popek.core.requests import ProjectDelete

    ops.core(check=False).handle(ProjectDelete(name))
    if scope.stored() == name:
        scope.switch("default")
    print(f"Project {name} deleted.")


@app.command("switch")
def switch(name: str = typer.Argument(..., metavar="[local:]NAME",
                                      help="The project of this host.")) -> None:
    """Make NAME the project of later commands on this host ($POPEK_PROJECT and --project win
    over it; a remote's commands take --project)."""
    from popek.core.projects import Projects
    from popek.errors import InvalidInput

    if ":" in name:
        where = remotes.locate(name, "project")
        if where is not None:
            raise InvalidInput(f"popek project switch chooses this host's current project; "
                               f"on remote {where[0]}, give --project {where[1]} to each "
                               "command (a token acts in its own project)")
        name = name.partition(":")[2]
    else:
        remotes.here_only("popek project switch", f"popek project switch local:{name}")

    Projects(ops.core(check=False).store).require(name)
    scope.switch(name)
    print(f"Current project: {name}.")


@app.command("show")
def show(name: str | None = typer.Argument(None, metavar="[REMOTE:]NAME",
                                          help="The project (default: the current); "
                                               "lab:NAME: on remote lab."),
         fmt: str = format_option()) -> None:
    """Show a project's defaults, its quotas and what its instances use of them."""
    target = name or scope.current()
    where = remotes.locate(target, "project")
    if where is not None:
        from popek.cli import remoteops

        record = remoteops.project(*where)
    else:
        from popek.core.views import project_detail

        record = project_detail(ops.core(check=False), target)
    details(record, list(record.items()), fmt)


@app.command("set")
def set_(name: str = typer.Argument(..., metavar="[REMOTE:]NAME",
                                    help="The project (lab:NAME: on remote lab)."),
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
    where = remotes.locate(name, "project")
    if where is not None:  # one request: the remote checks every value before it sets one
        _api(where[0]).call("PATCH", f"/1.0/projects/{quote(where[1], safe='')}",
                            json={key: value or None for key, _, value in pairs})
        for key, _, value in pairs:
            print(f"Project {where[1]}: {key} = {value or 'unlimited'}.")
        return
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
    remote: str | None = _remote_option(),
    project: str = typer.Option(..., "--project", help="The project the token acts in."),
    role: str = typer.Option(..., "--role", help="admin, operator or viewer."),
    console: bool = typer.Option(False, "--console", help="May use the console and exec."),
    expires: float | None = typer.Option(None, "--expires", metavar="DAYS",
                                         help="Days until it expires (default: never)."),
    name: str | None = typer.Option(None, "--name", help="A name to know it by."),
) -> None:
    """Create an API token; its secret is printed once and never stored."""
    on = remotes.list_target(remote, "popek token create")
    if on is not None:
        from popek.cli import remoteops

        rec = remoteops.token_create(on, {"project": project, "role": role, "console": console,
                                          "expires": expires, "name": name})
        secret = str(rec.pop("secret"))
    else:
        from popek.core.requests import TokenCreate

        token, secret = ops.core(check=False).handle(
            TokenCreate(project, role, console, name, expires))
        rec = token.public()
    print(f"Token {rec['name']} ({rec['id']}): {rec['role']} in project {rec['project']}"
          f"{', console/exec' if rec['console'] else ''}"
          f"{', expires ' + str(rec['expires']) if rec['expires'] else ''}.", flush=True)
    print("Its secret (shown this once; keep it safe):")
    print(secret)


@token_app.command("list")
def token_list(remote: str | None = _remote_option(), fmt: str = format_option(),
               columns: str = columns_option(TOKEN_COLUMNS),
               project: str | None = typer.Option(None, "--project",
                                                  help="Only this project's tokens.")) -> None:
    """List the API tokens (never their secrets)."""
    on = remotes.list_target(remote, "popek token list")
    if on is not None:
        from popek.cli import remoteops

        rows = remoteops.tokens(on, project)
    else:
        from popek.core.views import token_summaries

        rows = token_summaries(ops.core(check=False), project)
    listing(rows, TOKEN_COLUMNS, fmt, select=columns, command="popek token list")


@token_app.command("revoke")
def token_revoke(token_id: str = typer.Argument(..., metavar="[REMOTE:]ID")) -> None:
    """Revoke an API token at once (it stays listed, as revoked)."""
    where = remotes.locate(token_id, "token id")
    if where is not None:
        from popek.cli import remoteops

        rec = remoteops.token_revoke(*where)
    else:
        from popek.core.requests import TokenRevoke

        rec = ops.core(check=False).handle(TokenRevoke(token_id)).public()
    print(f"Token {rec['name']} ({rec['id']}) revoked.")
