"""``popek config``: show and change an instance's settings, as incus's ``config`` does.

``set NAME KEY=VALUE...`` (several keys, all or none; ``set NAME KEY VALUE`` too),
``get NAME KEY``, ``unset NAME KEY...`` (back to what the instance's profiles say,
else the built-in default) and ``show NAME``.  The keys and their checks are
:mod:`popek.core.config`'s; changes are requests to the core (audited there).
"""

from __future__ import annotations

import typer

from popek.cli import ops, remotes, scope
from popek.cli.common import format_option, project_option
from popek.cli.output import details
from popek.core.config import CONFIG_KEYS, check_key, parse_pairs

KEYS = ", ".join(CONFIG_KEYS)
app = typer.Typer(no_args_is_help=True,
                  help=f"Show and change instance settings (keys: {KEYS}).")


@app.command("set")
def config_set(
    name: str,
    pairs: list[str] = typer.Argument(
        ..., metavar="KEY=VALUE...",
        help="limits.memory (e.g. 1GiB), limits.cpu, limits.pids, limits.net (e.g. 100Mbit, "
             "or none), limits.disk (containers: grows live, shrinks while stopped), "
             "limits.disk.read_bps|write_bps (e.g. 10MB: per second) and "
             "limits.disk.read_iops|write_iops (0: no limit; live), label "
             "(only while stopped); all applied or none.  KEY VALUE also works for one key."),
    project: str | None = project_option(),
) -> None:
    """Change settings; a running instance gets them at once where its engine can."""
    scope.use(project)
    from popek.core.requests import ConfigSet

    if len(pairs) == 2 and "=" not in pairs[0]:  # the older form: KEY VALUE
        values = {check_key(pairs[0]): pairs[1]}
    else:
        values = parse_pairs(pairs, "KEY=VALUE")
    where = remotes.locate(name)
    if where is not None:
        from popek.cli import remoteops

        name = where[1]
        remoteops.config_patch(where[0], name, dict(values), project)
    elif len(values) == 1:
        (key, value), = values.items()
        ops.core().handle(ConfigSet(name, key=key, value=value))
    else:
        ops.core().handle(ConfigSet(name, values=values))
    print(f"Instance {name}: " + ", ".join(f"{k} = {v}" for k, v in values.items()) + ".")


@app.command("unset")
def config_unset(
    name: str,
    keys: list[str] = typer.Argument(..., metavar="KEY...",
                                     help=f"Keys to put back: {KEYS}."),
    project: str | None = project_option(),
) -> None:
    """Put settings back to what the instance's profiles say now, else the defaults."""
    scope.use(project)
    where = remotes.locate(name)
    if where is not None:
        from popek.cli import remoteops

        name = where[1]
        now = remoteops.config_patch(where[0], name, dict.fromkeys(map(check_key, keys)),
                                     project)
    else:
        from popek.core.config import show
        from popek.core.requests import ConfigUnset

        now = show(ops.core().handle(ConfigUnset(name, keys=tuple(keys))))
    print(f"Instance {name}: " + ", ".join(f"{k} = {now.get(k, '(none)')}" for k in keys) + ".")


@app.command("get")
def config_get(name: str, key: str = typer.Argument(..., help=f"One of {KEYS}."),
               project: str | None = project_option()) -> None:
    """Print the value of one key (an empty line when it is not set)."""
    scope.use(project)
    check_key(key)
    where = remotes.locate(name)
    if where is not None:
        from popek.cli import remoteops

        print(remoteops.config(where[0], where[1], project).get(key, ""))
        return
    print(ops.instances(name).config_show(name).get(key, ""))


@app.command("show")
def config_show(name: str, fmt: str = format_option(),
                project: str | None = project_option()) -> None:
    """Show an instance's settings and the profiles it was launched with."""
    scope.use(project)
    where = remotes.locate(name)
    if where is not None:
        from popek.cli import remoteops

        data = remoteops.config(where[0], where[1], project)
        profiles = data.get("profiles") or []
        values = {k: v for k, v in data.items() if k != "profiles"}
    else:
        insts = ops.instances(name)
        values = insts.config_show(name)
        profiles = insts.get(name).spec.profiles
        data = {**values, "profiles": profiles}
    details(data, [*values.items(), ("profiles", ",".join(profiles))], fmt)
