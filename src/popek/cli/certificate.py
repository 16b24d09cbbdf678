"""``popek certificate``: the TLS client certificates the API trusts, each for a project and role.

The counterpart of ``popek token`` for clients that authenticate with a
certificate (``popek remote add NAME URL`` makes one on the client: its
``client.crt``).  Every change is a request to the core (audited there); see
:mod:`popek.core.certificates`.  On a remote (``add FILE lab:``, ``list lab:``,
``revoke lab:NAME``, or the default remote of ``popek remote switch``) each goes
to its API and prints the same.
"""

from __future__ import annotations

from operator import itemgetter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import typer

from popek.cli import ops, remotes
from popek.cli.common import columns_option, format_option, remote_argument
from popek.cli.output import Column, listing

app = typer.Typer(no_args_is_help=True,
                  help="TLS client certificates the API trusts: a project and a role "
                       "(admin, operator, viewer).")

CERTIFICATE_COLUMNS = (
    Column("NAME", itemgetter("name"), "n"),
    Column("FINGERPRINT", lambda r: r["fingerprint"][:16], "f"),
    Column("PROJECT", itemgetter("project"), "p"), Column("ROLE", itemgetter("role"), "r"),
    Column("CONSOLE", lambda r: "yes" if r["console"] else "no", "c"),
    Column("SUBJECT", itemgetter("subject"), "s", default=False),
    Column("ADDED", itemgetter("added"), "a", default=False),
    Column("EXPIRES", itemgetter("not_after"), "e"),
    Column("REVOKED", lambda r: r["revoked"] or "", "v"),
)


def _read(path: Path) -> str:
    """The certificate in ``path`` as PEM; InvalidInput naming the file otherwise."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from popek.core.certificates import MAX_BYTES, parse
    from popek.errors import InvalidInput

    try:
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise InvalidInput(f"cannot read the certificate {path}: {exc.strerror}") from exc
    cert, _ = parse(data, f"{path}")
    return cert.public_bytes(Encoding.PEM).decode()


def _api(remote: str) -> Any:
    from popek.cli import remoteops

    return remoteops.client(remote)


@app.command("add")
def add(
    path: Path = typer.Argument(..., metavar="FILE",
                                help="The client's certificate (PEM or DER; client.crt of "
                                     "popek remote add), never its key."),
    remote: str | None = remote_argument(" to trust it on"),
    project: str = typer.Option(..., "--project", help="The project the client acts in."),
    role: str = typer.Option(..., "--role", help="admin, operator or viewer."),
    console: bool = typer.Option(False, "--console", help="May use the console and exec."),
    name: str | None = typer.Option(None, "--name", help="A name to know it by (default: "
                                    "cert- and its fingerprint's first digits)."),
) -> None:
    """Trust a client certificate on the API's TCP listener, for a project and a role."""
    pem = _read(path)
    on = remotes.list_target(remote, "popek certificate add")
    rec: dict[str, Any]
    if on is not None:
        rec = _api(on).call("POST", "/1.0/certificates", json={
            "certificate": pem, "project": project, "role": role, "console": console,
            "name": name})
    else:
        from popek.core.requests import CertificateAdd

        rec = ops.core(check=False).handle(
            CertificateAdd(pem, project, role, console, name)).public()
    print(f"Certificate {rec['name']} trusted: {rec['role']} in project {rec['project']}"
          f"{', console/exec' if rec['console'] else ''}, until {rec['not_after']}.")
    print(f"SHA-256 fingerprint: {rec['fingerprint']}")


@app.command("list")
def list_(remote: str | None = remote_argument(), fmt: str = format_option(),
          columns: str = columns_option(CERTIFICATE_COLUMNS),
          project: str | None = typer.Option(None, "--project",
                                             help="Only this project's certificates.")) -> None:
    """List the trusted client certificates (revoked ones too, as revoked)."""
    on = remotes.list_target(remote, "popek certificate list")
    if on is not None:
        rows = _api(on).call("GET", "/1.0/certificates", params={"project": project})
    else:
        from popek.core.certificates import Certificates

        rows = [c.public() for c in Certificates(ops.core(check=False).store).list(project)]
    listing(rows, CERTIFICATE_COLUMNS, fmt, select=columns, command="popek certificate list")


@app.command("revoke")
def revoke(ref: str = typer.Argument(..., metavar="[REMOTE:]NAME|FINGERPRINT",
                                     help="Its name, or its SHA-256 fingerprint (at least "
                                          "8 hex digits of it); lab:NAME: on remote "
                                          "lab.")) -> None:
    """Revoke a client certificate at once (it stays listed, as revoked)."""
    where = remotes.locate(ref, "certificate")
    rec: dict[str, Any]
    if where is not None:
        rec = _api(where[0]).call("POST",
                                  f"/1.0/certificates/{quote(where[1], safe='')}/revoke")
    else:
        from popek.core.requests import CertificateRevoke

        rec = ops.core(check=False).handle(CertificateRevoke(ref)).public()
    print(f"Certificate {rec['name']} ({rec['fingerprint'][:16]}) revoked.")
