"""``popek sandbox``: run one application in a bubblewrap sandbox, list profiles.

Registered by :mod:`popek.cli.main` as ``app.add_typer(sandbox_app, name="sandbox")``.
The sandbox engine is imported inside the commands.  ``popek sandbox run lab: --
CMD`` runs it on remote lab (its API: no terminal, the whole input first, the
output and exit code back), as does every sandbox command once ``popek remote
switch`` chose a default remote; ``popek sandbox profiles lab:`` lists its profiles.
"""

from __future__ import annotations

from typing import Any

import typer

from popek.cli import ops, remotes
from popek.cli.common import columns_option, format_option, remote_argument
from popek.cli.output import Column, listing

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run one application in a sandbox with a minimal view of the host.")


@app.command(context_settings={"ignore_unknown_options": True})
def run(
    command: list[str] = typer.Argument(..., metavar="[REMOTE:] COMMAND...",
                                        help="The command and its arguments, after --; "
                                             "a first word lab: runs it on remote lab."),
    profile: str = typer.Option("default", "--profile", "-p",
                                help="Profile (see popek sandbox profiles)."),
    net: bool = typer.Option(False, "--net",
                             help="Network through user-mode networking, in its own namespace."),
    ro: list[str] | None = typer.Option(None, "--ro", help="Bind a host path read-only."),
    rw: list[str] | None = typer.Option(None, "--rw", help="Bind a host path read-write."),
    memory: str | None = typer.Option(None, "--memory",
                                      help="Memory limit (address space, cgroup), e.g. 512MiB."),
    timeout: float | None = typer.Option(None, "--timeout",
                                         help="Kill the application after S seconds (exit 124)."),
) -> None:
    """Run COMMAND sandboxed; its stdin, stdout, stderr and exit code pass through."""
    raise typer.Exit(ops.sandbox_run(**locals()))  # the body is shared with cli.fastpath


def _memory(row: dict[str, Any]) -> str:
    from popek.units import format_size

    mem = row.get("memory")
    return format_size(mem) if isinstance(mem, int) else "-"


PROFILE_COLUMNS = (
    Column("NAME", lambda r: r["name"]),
    Column("NETWORK", lambda r: "invalid" if "error" in r else r["network"]),
    Column("MEMORY", _memory), Column("PATH", lambda r: r["path"]),
    Column("ERROR", lambda r: r.get("error", ""), default=False),
)


@app.command()
def profiles(remote: str | None = remote_argument(), fmt: str = format_option(),
             columns: str = columns_option(PROFILE_COLUMNS)) -> None:
    """List the sandbox profiles (installs the shipped ones on first use)."""
    on = remotes.list_target(remote, "popek sandbox profiles")
    if on is not None:
        from popek.cli import remoteops

        rows = remoteops.client(on).call("GET", "/1.0/sandboxes/profiles")
    else:
        from popek.core.views import sandbox_profiles

        rows = sandbox_profiles()
    listing(rows, PROFILE_COLUMNS, fmt, select=columns, command="popek sandbox profiles")
