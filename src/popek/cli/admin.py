"""``popek admin``: back up and restore this host's state store and trust keys.

Registered by :mod:`popek.cli.main` as ``app.add_typer(admin_app, name="admin")``
(``from popek.cli.admin import app as admin_app``).  The work is done by
:mod:`popek.state.backup`; this module only prints.  Both commands are
audited (``admin.backup`` exports private keys).
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Back up and restore the state store and the trust keys.")


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
