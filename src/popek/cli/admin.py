"""``popek admin``: back up and restore the state store and trust keys; reset and boot.

Registered by :mod:`popek.cli.main` as ``app.add_typer(admin_app, name="admin")``
(``from popek.cli.admin import app as admin_app``).  The work is done by
:mod:`popek.state.backup`; this module only prints.  Both commands are
audited (``admin.backup`` exports private keys).  ``reset`` and ``boot`` run
the requests of :mod:`popek.core.requests.admin` (:mod:`popek.core.hostcare`
does the work).

``backup``, ``reset`` and ``boot`` also work on a remote (``lab:`` as their
last argument, or the default remote of ``popek remote switch``), through its
API: a remote's backup is written here.  ``restore`` has no API (it replaces
the store under the server's own connections): it acts on this host only, and
refuses while another default remote is chosen (``local:`` says this host).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from popek.cli import remotes
from popek.cli.common import remote_argument

if TYPE_CHECKING:
    from popek.core.hostcare import Report

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Back up and restore the state store and the trust keys; reset "
                       "this home's host pieces; bring them back at boot.")


@app.command()
def backup(
    file: Path = typer.Argument(..., help="Backup file to write (replaced if it exists)."),
    remote: str | None = remote_argument(" to back up (the file is written here)"),
) -> None:
    """Write a consistent copy of the state store and the private keys to FILE (mode 0600)."""
    on = remotes.list_target(remote, "popek admin backup")
    if on is not None:
        from popek.cli import remoteops
        from popek.state.backup import save

        data = remoteops.client(on).content("/1.0/admin/backup", method="POST",
                                            timeout=600)
        info = save(file, data)
    else:
        from popek.state.backup import backup as run

        info = run(file)
    print(f"Backed up the state store (revision {info.revision}) and {len(info.keys)} private "
          f"key(s) to {info.path} ({info.size} bytes, mode 0600; it holds private keys).")


@app.command()
def restore(
    file: Path = typer.Argument(..., help="Backup file written by popek admin backup."),
    remote: str | None = typer.Argument(None, metavar="[local:]",
                                        help="local: restores on this host even while "
                                             "popek remote switch chose another remote "
                                             "(a remote has no restore: on its host)."),
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
    from popek.errors import InvalidInput
    from popek.state.backup import restore as run

    if remote is None:
        remotes.here_only("popek admin restore", f"popek admin restore {file} local:")
    elif remotes.list_target(remote, "popek admin restore") is not None:
        raise InvalidInput(f"popek admin restore has no API (it replaces the store under "
                           f"the server's own connections): restore on {remote[:-1]}'s host, "
                           "with its popek serve stopped")

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


@dataclass
class _Report:
    """A remote's report (``done``, ``failed``), printed as this host's."""

    done: list[str]
    failed: list[str]


def _print_report(report: Report | _Report, nothing: str) -> None:
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
    remote: str | None = remote_argument(),
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
    on = remotes.list_target(remote, "popek admin reset")
    if on is not None:
        what = (f"Delete every instance and network of remote {on}" if purge else
                f"Stop every instance of remote {on} and remove its networks and cgroups "
                "from its host (its data stays)")
        _confirm(f"{what}?", yes)
        from popek.cli import remoteops

        _print_report(_Report(**remoteops.client(on).call(
            "POST", "/1.0/admin/reset", params={"purge": purge or None}, timeout=600)),
            f"Nothing of remote {on} was on its host.")
        return
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
def boot(remote: str | None = remote_argument()) -> None:
    """Bring this POPEK_HOME back after the host booted (run by popek-boot.service).

    Instances whose processes are gone are marked stopped, the networks'
    bridges, nftables rules and dnsmasqs are restored, and every instance
    whose config key boot.autostart is true is started.  Exit 1 if one failed.
    """
    on = remotes.list_target(remote, "popek admin boot")
    if on is not None:
        from popek.cli import remoteops

        report: Report | _Report = _Report(**remoteops.client(on).call(
            "POST", "/1.0/admin/boot", timeout=600))
    else:
        from popek.cli.ops import core
        from popek.core.requests.admin import HostBoot

        report = core().handle(HostBoot())
    _print_report(report, "Nothing to do: the host matches the records.")
