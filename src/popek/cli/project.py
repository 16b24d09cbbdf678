"""``popek project``: the defaults instances of a project get (see popek.core.projects)."""

from __future__ import annotations

import typer

from popek.cli import ops
from popek.cli.common import format_option
from popek.cli.output import details
from popek.core.model import DEFAULT_PROJECT

app = typer.Typer(no_args_is_help=True, help="Show and change a project's defaults.")


@app.command("show")
def show(project: str = typer.Option(DEFAULT_PROJECT, "--project", help="The project."),
         fmt: str = format_option()) -> None:
    """Show the defaults new instances of the project get."""
    from popek.core.projects import Projects

    values = Projects(ops.core().instances.store).show(project)
    details(values, list(values.items()), fmt)


@app.command("set")
def set_(key: str = typer.Argument(..., help="limits.disk: a new container's writable layer, "
                                             "e.g. 20GiB."),
         value: str = typer.Argument(..., help="The new default."),
         project: str = typer.Option(DEFAULT_PROJECT, "--project", help="The project.")) -> None:
    """Change a default; instances made later get it, existing ones keep theirs."""
    from popek.core.requests import ProjectSet

    ops.core().handle(ProjectSet(project, key, value))
    print(f"Project {project}: {key} = {value} for new instances.")
