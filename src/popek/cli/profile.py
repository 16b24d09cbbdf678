"""``popek profile``: named sets of config keys and networks that ``launch -p`` applies.

create, edit (``$EDITOR`` on a YAML document, or the document on stdin:
``popek profile edit NAME < file``), show, list and delete; see
:mod:`popek.core.profiles`.  Changes are requests to the core (audited there).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from typing import Any

import typer

from popek.cli import ops, scope
from popek.cli.common import format_option, project_option
from popek.cli.output import Column, details, listing
from popek.errors import InvalidInput

app = typer.Typer(no_args_is_help=True,
                  help="Profiles: named sets of config keys and networks for launch -p.")


def _profiles(core: Any) -> Any:
    from popek.core.profiles import Profiles

    return Profiles(core.store, core.project)


@app.command("create")
def profile_create(
    name: str,
    config: list[str] = typer.Option([], "--config", "-c", metavar="KEY=VALUE",
                                     help="A config key, as launch -c (repeatable)."),
    network: list[str] = typer.Option([], "--network",
                                      help="A network the instances join (repeatable)."),
    description: str = typer.Option("", "--description", help="What the profile is for."),
    project: str | None = project_option(),
) -> None:
    """Create a profile (empty unless -c or --network say; popek profile edit changes it)."""
    scope.use(project)
    from popek.core.config import parse_pairs
    from popek.core.requests import ProfileCreate

    ops.core().handle(ProfileCreate(name, description, parse_pairs(config), tuple(network)))
    print(f"Profile {name} created.")


@app.command("edit")
def profile_edit(name: str, project: str | None = project_option()) -> None:
    """Edit a profile as a YAML document in $EDITOR, or replace it with stdin's document."""
    scope.use(project)
    from popek.core.profiles import from_doc, parse_document
    from popek.core.requests import ProfileEdit

    current = _profiles(ops.core()).get(name)
    text = _in_editor(current.to_doc()) if sys.stdin.isatty() else sys.stdin.read()
    new = from_doc(name, parse_document(text))
    ops.core().handle(ProfileEdit(name, new.description, new.config, tuple(new.networks)))
    print(f"Profile {name} changed (instances launched from now on get it).")


def _in_editor(doc: dict[str, Any]) -> str:
    """The text the user left in ``$EDITOR`` (``$VISUAL``, else vi) after editing ``doc``."""
    from popek.cli.output import render

    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    fd, path = tempfile.mkstemp(prefix="popek-profile-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as f:
            f.write("# popek profile: description, config (KEY: VALUE), networks (names).\n")
            f.write(render(doc, [], "yaml"))
        code = subprocess.call([*shlex.split(editor), path])
        if code != 0:
            raise InvalidInput(f"the editor {editor!r} exited with {code}; the profile is "
                               "unchanged")
        with open(path) as f:
            return f.read()
    finally:
        os.unlink(path)


PROFILE_COLUMNS = (
    Column("NAME", lambda p: p["name"], "n"),
    Column("DESCRIPTION", lambda p: p["description"], "d", width=40),
    Column("CONFIG", lambda p: ",".join(f"{k}={v}" for k, v in p["config"].items()), "c"),
    Column("NETWORKS", lambda p: ",".join(p["networks"]), "N"),
    Column("USED_BY", lambda p: ",".join(p["used_by"]), "u"),
)


@app.command("list")
def profile_list(fmt: str = format_option(), project: str | None = project_option()) -> None:
    """List profiles and the instances launched with each."""
    scope.use(project)
    from popek.core.views import profile_summaries

    listing(profile_summaries(ops.core()), PROFILE_COLUMNS, fmt, command="popek profile list")


@app.command("show")
def profile_show(name: str, fmt: str = format_option(),
                 project: str | None = project_option()) -> None:
    """Show a profile: its description, config keys, networks and the instances using it."""
    scope.use(project)
    from popek.core.views import profiles_used

    core = ops.core()
    doc = {**_profiles(core).get(name).to_doc(), "used_by": profiles_used(core).get(name, [])}
    fields: list[tuple[str, object]] = [("name", name), ("description", doc["description"])]
    fields += [(k, v) for k, v in doc["config"].items()]
    fields += [("networks", ",".join(doc["networks"])), ("used_by", ",".join(doc["used_by"]))]
    details(doc, fields, fmt)


@app.command("delete")
def profile_delete(name: str, project: str | None = project_option()) -> None:
    """Delete a profile (refused while an instance launched with it exists)."""
    scope.use(project)
    from popek.core.requests import ProfileDelete

    ops.core().handle(ProfileDelete(name))
    print(f"Profile {name} deleted.")
