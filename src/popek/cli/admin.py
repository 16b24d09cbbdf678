"""``popek admin``: back up and restore the state store and trust keys; reset and boot.

Registered by :mod:`popek.cli.main` as ``app.add_typer(admin_app, name="admin")``
(``from popek.cli.admin import app as admin_app``).  The work is done by
:mod:`popek.state.backup`; this module only prints.  Both commands are
audited (``admin.backup`` exports private keys).  ``reset`` and ``boot`` run
the requests of :mod:`popek.core.requests.admin` (:mod:`popek.core.hostcare`
does the work).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from popek.core.hostcare import Report

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Back up and restore the state store and the trust keys; reset "
                       "this home's host pieces; bring them back at boot.")


@app.command()
def backup(
    file: Path = typer.Argument(..., help="Backup file to write (replaced if it exists)."),
) -> None:
    """Write a consistent copy of the state store and the private keys to FILE (mode 0600)."""
    from popek.state.backup import backup as run

    info = run(file)
    print(f"Backed up the state store (revision {info.revision}) and {len(info.keys)} private "
          f"key(s) to {info.path} ({info.size} bytes, mode 0600; it holds private keys).")


@app.command()
def restore(
    file: Path = typer.Argument(..., help="Backup file written by popek admin backup."),
    force: bool = typer.Option(False, "--force",
                               help="Restore even while instances are not stopped."),
) -> None:
    """Replace the state store and the private keys by those of backup FILE.

    The whole file is checked first; nothing changes when it is damaged or
    not a popek backup.  Refused while an instance is not stopped (unless
    --force) or while another popek process has the store open.  The store
    replaced is kept beside it as state.db.pre-restore-TIME; the audit log is
    not rolled back.
    """
    from popek.state.backup import restore as run

    info = run(file, force=force)
    print(f"Restored the state store of {info.created} (revision {info.revision}) and "
          f"{len(info.keys)} private key(s) from {file}.")
    if info.previous is not None:
        print(f"The store it replaced is kept as {info.previous}.")
    if info.previous_damage:
        print(f"The store it replaced could not be read ({info.previous_damage}): the audit "
              "head comes from the backup; audit verify reports any records it does not know.")
    if info.kept_keys:
        print(f"Private keys not in the backup were left in place: {', '.join(info.kept_keys)}.")


def _confirm(question: str, yes: bool) -> None:
    """Go on with ``yes``; else ask on the terminal; refuse without one (scripts say --yes)."""
    import sys

    from popek.errors import InvalidInput

    if yes:
        return
    if not sys.stdin.isatty():
        raise InvalidInput(f"{question} asks for confirmation and stdin is not a terminal; "
                           "give --yes to go on without asking")
    answer = input(f"{question} [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise typer.Exit(1)


def _print_report(report: Report, nothing: str) -> None:
    import sys

    for line in report.done:
        print(line)
    if not report.done and not report.failed:
        print(nothing)
    for line in report.failed:
        print(f"popek: failed: {line}", file=sys.stderr)
    if report.failed:
        raise typer.Exit(1)


@app.command()
def reset(
    purge: bool = typer.Option(False, "--purge",
                               help="Also delete the instances, networks, images, keys and "
                                    "audit log: the whole POPEK_HOME."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Remove what this POPEK_HOME made on the host; keep its data unless --purge.

    Every instance is stopped (with --purge: deleted); bridges, tap and veth
    devices, dnsmasqs, nftables tables and cgroups (v1 and v2) of this home
    are removed; /run/popek/jail and other pieces homes share go only when no
    other home uses the host.  Without --purge the state, images, keys and
    audit log stay: popek admin boot (or any network command) brings the
    networks back.  Audited; prints what it removed; exit 1 if a step failed.
    """
    from popek import paths
    from popek.cli.ops import core
    from popek.core.hostcare import remove_home
    from popek.core.requests.admin import HostReset

    home = paths.home()
    what = (f"Delete every instance, network, image and key of {home} and remove it"
            if purge else f"Stop every instance of {home} and remove its networks and "
                          "cgroups from the host (its data stays)")
    _confirm(f"{what}?", yes)
    report = core().handle(HostReset(purge=purge))
    if purge and not report.failed:
        report.done += remove_home(home)
    _print_report(report, f"Nothing of {home} was on the host.")


@app.command()
def boot() -> None:
    """Bring this POPEK_HOME back after the host booted (run by popek-boot.service).

    Instances whose processes are gone are marked stopped, the networks'
    bridges, nftables rules and dnsmasqs are restored, and every instance
    whose config key boot.autostart is true is started.  Exit 1 if one failed.
    """
    from popek.cli.ops import core
    from popek.core.requests.admin import HostBoot

    _print_report(core().handle(HostBoot()), "Nothing to do: the host matches the records.")
