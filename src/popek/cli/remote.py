"""``popek remote``: add, list, remove and switch the remotes (other hosts' ``popek serve``).

Kept in the user's own file (:mod:`popek.cli.remotes`, 0600); the token is
never printed back.  ``add`` of an https URL reads the server's certificate and
pins its SHA-256 fingerprint once the user accepts it (``--accept-certificate``,
or yes on a terminal); every later connection is checked against that pin
(:mod:`popek.cli.remoteclient`).

An https remote authenticates with a bearer token (``--token``) or, without
one, with this user's TLS client certificate (``--auth certificate``, the
default then): made on first use in the user's config directory
(:mod:`popek.cli.clientcert`), its path and fingerprint printed so that the
remote's host admin can trust it (``popek certificate add``).
"""

from __future__ import annotations

import sys
from operator import itemgetter

import typer

from popek.cli import remotes
from popek.cli.common import columns_option, format_option
from popek.cli.output import Column, listing
from popek.errors import AlreadyExists, InvalidInput

app = typer.Typer(no_args_is_help=True,
                  help="Remotes: other hosts' popek serve, named as REMOTE:NAME (lab:web).")

REMOTE_COLUMNS = (
    Column("NAME", itemgetter("name"), "n"),
    Column("URL", itemgetter("url"), "u"),
    Column("FINGERPRINT", itemgetter("fingerprint"), "f"),
    Column("AUTH", itemgetter("auth"), "a"),
    Column("TOKEN", itemgetter("token"), "t", default=False),
    Column("DEFAULT", lambda r: "*" if r["default"] else "", "d"),
)


@app.command("add")
def add(
    name: str = typer.Argument(..., help=f"The remote's name: {remotes.REMOTE_RULE}."),
    url: str = typer.Argument(..., help="https://HOST:PORT (popek serve --listen) or "
                                        "unix:///path/to/api.sock."),
    token: str = typer.Option("", "--token", help="The bearer token (popek token create on "
                              "the server); kept in the remotes file, never shown."),
    accept_certificate: bool = typer.Option(False, "--accept-certificate",
                                            help="Pin the server's certificate without "
                                                 "asking (compare its fingerprint first)."),
    auth: str = typer.Option("", "--auth", metavar="token|certificate",
                             help="How to authenticate: token (with --token) or certificate "
                                  "(this user's TLS client certificate, made on first use). "
                                  "Default: token when --token is given, else certificate "
                                  "for https."),
) -> None:
    """Add a remote; for https, show the server's certificate fingerprint and pin it."""
    remotes.check_name(name)
    if name == remotes.LOCAL:
        raise InvalidInput("local is this host and always exists: choose another name")
    url = remotes.check_url(url)
    auth = _auth(auth, url, token)
    data = remotes.load()
    if name in data["remotes"]:
        raise AlreadyExists(f"remote {name} already exists: popek remote remove {name} first")
    fingerprint = ""
    if url.startswith("https://"):
        from popek.cli.remoteclient import server_fingerprint

        fingerprint = server_fingerprint(url)
        print(f"Certificate fingerprint of {url}: {fingerprint}", file=sys.stderr)
        if not accept_certificate:
            if not (sys.stdin.isatty() and sys.stderr.isatty()):
                raise InvalidInput("the certificate was not accepted (no terminal to ask on): "
                                   "compare the fingerprint with the one popek serve printed, "
                                   "then add --accept-certificate; nothing was saved")
            if not typer.confirm("Does it match the one popek serve printed? Pin it",
                                 default=False, err=True):
                raise InvalidInput("the certificate was not accepted; nothing was saved")
    if auth == remotes.CERTIFICATE:
        _announce_client_certificate(name)
    data["remotes"][name] = {"url": url, "fingerprint": fingerprint, "token": token,
                             "auth": auth}
    remotes.save(data)
    print(f"Remote {name} added ({url}).")


def _auth(asked: str, url: str, token: str) -> str:
    """How a remote at ``url`` authenticates: ``--auth`` as asked, checked against ``--token``
    and the URL; InvalidInput naming what is allowed."""
    chosen = {"": "", "token": remotes.TOKEN, "certificate": remotes.CERTIFICATE,
              "cert": remotes.CERTIFICATE}.get(asked)
    if chosen is None:
        raise InvalidInput(f"invalid --auth {asked!r}: use token (with --token) or certificate")
    if not chosen:
        if token:
            return remotes.TOKEN
        return remotes.CERTIFICATE if url.startswith("https://") else ""
    if chosen == remotes.TOKEN and not token:
        raise InvalidInput("--auth token needs --token SECRET (popek token create on the "
                           "server); nothing was saved")
    if chosen == remotes.CERTIFICATE and token:
        raise InvalidInput("a remote authenticates with a token or a client certificate, not "
                           "both: drop --token or --auth certificate; nothing was saved")
    if chosen == remotes.CERTIFICATE and not url.startswith("https://"):
        raise InvalidInput("--auth certificate is for https remotes (a unix socket is root's: "
                           "it needs no credential); nothing was saved")
    return chosen


def _announce_client_certificate(name: str) -> None:
    """Make this user's client certificate when it is missing; say how to get it trusted."""
    from popek.cli import clientcert

    cert, _, made = clientcert.ensure()
    print(f"{'Made the' if made else 'Using the'} client certificate {cert} (SHA-256 "
          f"{clientcert.fingerprint(cert)}).", file=sys.stderr)
    print(f"Until the host admin of {name} trusts it, {name} refuses it: there, popek "
          f"certificate add client.crt --project PROJECT --role ROLE", file=sys.stderr)


@app.command("list")
def list_(fmt: str = format_option(), columns: str = columns_option(REMOTE_COLUMNS)) -> None:
    """List the remotes (* marks the default); tokens are never shown, only whether one is set."""
    chosen = remotes.default()
    rows = [{**r.public(), "default": r.name == chosen} for r in remotes.all_remotes()]
    listing(rows, REMOTE_COLUMNS, fmt, select=columns, command="popek remote list")


@app.command("remove")
def remove(name: str) -> None:
    """Forget a remote (and its token); the default goes back to local if it was this one."""
    if name == remotes.LOCAL:
        raise InvalidInput("local is this host and cannot be removed")
    remotes.get(name)  # NotFound
    data = remotes.load()
    del data["remotes"][name]
    if data.get("default") == name:
        data["default"] = remotes.LOCAL
    remotes.save(data)
    print(f"Remote {name} removed.")


@app.command("switch")
def switch(name: str) -> None:
    """Make NAME the default remote: instance names without REMOTE: go there (local: this host)."""
    if name != remotes.LOCAL:
        remotes.get(name)  # NotFound
    data = remotes.load()
    data["default"] = name
    remotes.save(data)
    print(f"Default remote: {name}.")
