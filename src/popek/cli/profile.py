"""``popek profile``: named sets of config keys and networks that ``launch -p`` applies.

create, edit (``$EDITOR`` on a YAML document, or the document on stdin:
``popek profile edit NAME < file``), show, list and delete; see
:mod:`popek.core.profiles`.  Changes are requests to the core (audited there).
On a remote (``lab:NAME``, ``popek profile list lab:``, or the default remote of
``popek remote switch``) each goes to its API and prints the same.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from typing import Any
from urllib.parse import quote

import typer

from popek.cli import ops, remotes, scope
from popek.cli.common import format_option, project_option, remote_argument
from popek.cli.output import Column, details, listing
from popek.errors import InvalidInput

app = typer.Typer(no_args_is_help=True,
                  help="Profiles: named sets of config keys and networks for launch -p.")


def _profiles(core: Any) -> Any:
    from popek.core.profiles import Profiles

    return Profiles(core.store, core.project)


def _api(remote: str) -> Any:
    from popek.cli import remoteops

    return remoteops.client(remote)


def _path(name: str) -> str:
    return f"/1.0/profiles/{quote(name, safe='')}"


_NAME = typer.Argument(..., metavar="[REMOTE:]NAME", help="The profile (lab:NAME: on remote "
                                                         "lab).")


@app.command("create")
def profile_create(
    name: str = _NAME,
    config: list[str] = typer.Option([], "--config", "-c", metavar="KEY=VALUE",
                                     help="A config key, as launch -c (repeatable)."),
    network: list[str] = typer.Option([], "--network",
                                      help="A network the instances join (repeatable)."),
    description: str = typer.Option("", "--description", help="What the profile is for."),
    project: str | None = project_option(),
) -> None:
    """Create a profile (empty unless -c or --network say; popek profile edit changes it)."""
    from popek.core.config import parse_pairs

    where = remotes.locate(name, "profile")
    if where is not None:
        _api(where[0]).call("POST", "/1.0/profiles", params={"project": project},
                            json={"name": where[1], "description": description,
                                  "config": parse_pairs(config), "networks": list(network)})
        print(f"Profile {where[1]} created.")
        return
    scope.use(project)
    from popek.core.requests import ProfileCreate

    ops.core().handle(ProfileCreate(name, description, parse_pairs(config), tuple(network)))
    print(f"Profile {name} created.")


@app.command("edit")
def profile_edit(name: str = _NAME, project: str | None = project_option()) -> None:
    """Edit a profile as a YAML document in $EDITOR, or replace it with stdin's document."""
    from popek.core.profiles import from_doc, parse_document

    where = remotes.locate(name, "profile")
    if where is not None:
        api, path = _api(where[0]), _path(where[1])
        doc = api.call("GET", path, params={"project": project})
        doc.pop("used_by", None)
        text = _in_editor(doc) if sys.stdin.isatty() else sys.stdin.read()
        new = from_doc(where[1], parse_document(text))
        api.call("PUT", path, params={"project": project},
                 json={"description": new.description, "config": dict(new.config),
                       "networks": list(new.networks)})
        print(f"Profile {where[1]} changed (instances launched from now on get it).")
        return
    scope.use(project)
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
def profile_list(remote: str | None = remote_argument(), fmt: str = format_option(),
                 project: str | None = project_option()) -> None:
    """List profiles and the instances launched with each."""
    on = remotes.list_target(remote, "popek profile list")
    if on is not None:
        rows = _api(on).call("GET", "/1.0/profiles", params={"project": project})
    else:
        scope.use(project)
        from popek.core.views import profile_summaries

        rows = profile_summaries(ops.core())
    listing(rows, PROFILE_COLUMNS, fmt, command="popek profile list")


@app.command("show")
def profile_show(name: str = _NAME, fmt: str = format_option(),
                 project: str | None = project_option()) -> None:
    """Show a profile: its description, config keys, networks and the instances using it."""
    where = remotes.locate(name, "profile")
    if where is not None:
        show(where[1], _api(where[0]).call("GET", _path(where[1]), params={"project": project}),
             fmt)
        return
    scope.use(project)
    from popek.core.views import profiles_used

    core = ops.core()
    show(name, {**_profiles(core).get(name).to_doc(),
                "used_by": profiles_used(core).get(name, [])}, fmt)


def show(name: str, doc: dict[str, Any], fmt: str) -> None:
    """Print ``popek profile show``'s record (of this host or a remote) in ``fmt``."""
    fields: list[tuple[str, object]] = [("name", name), ("description", doc["description"])]
    fields += [(k, v) for k, v in doc["config"].items()]
    fields += [("networks", ",".join(doc["networks"])), ("used_by", ",".join(doc["used_by"]))]
    details(doc, fields, fmt)


@app.command("delete")
def profile_delete(name: str = _NAME, project: str | None = project_option()) -> None:
    """Delete a profile (refused while an instance launched with it exists)."""
    where = remotes.locate(name, "profile")
    if where is not None:
        _api(where[0]).call("DELETE", _path(where[1]), params={"project": project})
        print(f"Profile {where[1]} deleted.")
        return
    scope.use(project)
    from popek.core.requests import ProfileDelete

    ops.core().handle(ProfileDelete(name))
    print(f"Profile {name} deleted.")
