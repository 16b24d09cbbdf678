"""``popek project``: the defaults instances of a project get (see popek.core.projects)."""

from __future__ import annotations

import json

import typer

from popek.cli import ops
from popek.cli.common import check_format, print_table
from popek.core.model import DEFAULT_PROJECT

app = typer.Typer(no_args_is_help=True, help="Show and change a project's defaults.")


@app.command("show")
def show(project: str = typer.Option(DEFAULT_PROJECT, "--project", help="The project."),
         fmt: str = typer.Option("table", "--format", help="table or json.")) -> None:
    """Show the defaults new instances of the project get."""
    check_format(fmt)
    from popek.core.projects import Projects

    values = Projects(ops.core().instances.store).show(project)
    if fmt == "json":
        print(json.dumps(values, indent=2))
        return
    print_table(["KEY", "VALUE"], [[k, v] for k, v in values.items()])


@app.command("set")
def set_(key: str = typer.Argument(..., help="limits.disk: a new container's writable layer, "
                                             "e.g. 20GiB."),
         value: str = typer.Argument(..., help="The new default."),
         project: str = typer.Option(DEFAULT_PROJECT, "--project", help="The project.")) -> None:
    """Change a default; instances made later get it, existing ones keep theirs."""
    from popek.core.requests import ProjectSet

    ops.core().handle(ProjectSet(project, key, value))
    print(f"Project {project}: {key} = {value} for new instances.")
