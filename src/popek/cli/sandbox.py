"""``popek sandbox``: run one application in a bubblewrap sandbox, list profiles.

Registered by :mod:`popek.cli.main` as ``app.add_typer(sandbox_app, name="sandbox")``.
The sandbox engine is imported inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from popek.cli.common import check_format

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run one application in a sandbox with a minimal view of the host.")


@app.command(context_settings={"ignore_unknown_options": True})
def run(
    command: list[str] = typer.Argument(..., help="The command and its arguments, after --."),
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
    from popek.cli import ops  # the body is shared with cli.fastpath

    raise typer.Exit(ops.sandbox_run(**locals()))


@app.command()
def profiles(fmt: str = typer.Option("table", "--format", help="table or json.")) -> None:
    """List the sandbox profiles (installs the shipped ones on first use)."""
    check_format(fmt)
    from popek.engines.sandbox import load, names, profiles_dir
    from popek.errors import PopekError
    from popek.units import format_size

    rows: list[dict[str, object]] = []
    for name in names():
        path = profiles_dir() / f"{name}.toml"
        try:
            p = load(name)
        except PopekError as exc:
            rows.append({"name": name, "path": str(path), "error": str(exc)})
            continue
        rows.append({"name": name, "path": str(path), "network": p.network,
                     "ro": [str(x) for x in p.ro], "rw": [str(x) for x in p.rw],
                     "memory": p.limits.memory, "nproc": p.limits.nproc,
                     "nofile": p.limits.nofile, "cpu_seconds": p.limits.cpu_seconds,
                     "seccomp_extra": list(p.seccomp_extra)})
    if fmt == "json":
        print(json.dumps(rows, indent=2))
        return
    print(f"{'NAME':<16} {'NETWORK':<8} {'MEMORY':<8} PATH")
    for row in rows:
        if "error" in row:
            print(f"{row['name']!s:<16} {'INVALID':<8} {'-':<8} {row['path']}: {row['error']}")
            continue
        mem = row["memory"]
        shown = format_size(mem) if isinstance(mem, int) else "-"
        print(f"{row['name']!s:<16} {'yes' if row['network'] else 'no':<8} {shown:<8} "
              f"{Path(str(row['path']))}")
