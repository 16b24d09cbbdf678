"""``popek trust``, ``popek policy``, ``popek audit`` and ``popek attest``.

Registered by :mod:`popek.cli.main`.  The trust package (and through it the
cryptography library) is imported inside the commands.  Each command also works
on a remote (its API, :mod:`popek.cli.remoteops`): a key is named ``lab:NAME``,
a command with no object takes ``lab:`` (after its FILE, if any), and without
either the default remote of ``popek remote switch`` is used; the remote's
answer is printed by the same code as locally.
"""

from __future__ import annotations

import json
import sys
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import click
import typer

from popek.cli import remotes
from popek.cli.common import FORMATS, columns_option, format_option, project_option, remote_argument
from popek.cli.output import Column, details, listing
from popek.errors import InvalidInput

if TYPE_CHECKING:
    from popek.cli.remoteclient import Client
    from popek.trust.keys import TrustStore

trust_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                        help="Signing keys this host trusts, and the signature policy.")
policy_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                         help="The mandatory access control policy between instances.")
audit_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                        help="The tamper-evident audit log.")


def _trust() -> TrustStore:
    from popek.state import open_store
    from popek.trust.keys import TrustStore

    return TrustStore(open_store())


def _api(remote: str) -> Client:
    """The API client of ``remote`` (imported only when a command names one)."""
    from popek.cli import remoteops

    return remoteops.client(remote)


def _key_path(name: str) -> str:
    return f"/1.0/trust/keys/{quote(name, safe='')}"


def _read(path: str, what: str) -> str:
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read {what} {path!r}: {exc}") from exc


def _json_file(path: str, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(_read(path, what))
    except ValueError as exc:
        raise InvalidInput(f"{what} {path!r} is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidInput(f"{what} {path!r} must hold a JSON object")
    return doc


# -- trust ----------------------------------------------------------------------
@trust_app.command()
def keygen(
    name: str = typer.Argument(..., metavar="[REMOTE:]NAME",
                               help="Key name: a-z, 0-9, '.', '_', '-' (lab:NAME: on "
                                    "remote lab, where its private key stays)."),
    role: str = typer.Option(..., "--role", help="image, policy, audit or attestation."),
    days: int = typer.Option(3650, "--days", help="Days the key is valid."),
) -> None:
    """Make an Ed25519 key pair; its public key is trusted for ROLE at once."""
    where = remotes.locate(name, "key")
    if where is not None:
        made = _api(where[0]).call("POST", "/1.0/trust/keys",
                                   json={"name": where[1], "role": role, "days": days})
        print(f"Key {made['name']} ({made['role']}) id {made['id']}; private key on remote "
              f"{where[0]}'s host.")
        return
    from popek.cli.ops import core
    from popek.core.requests import KeyGen
    from popek.trust.keys import private_key_path

    key = core().handle(KeyGen(name, role, days))
    print(f"Key {key.name} ({key.role}) id {key.id}; private key {private_key_path(name)}.")


@trust_app.command()
def add(
    file: str = typer.Argument(..., help="Public key: PEM, or base64 of the 32 raw bytes "
                                         "('-' reads stdin)."),
    remote: str | None = remote_argument(" to trust it on"),
    name: str = typer.Option(..., "--name", help="Name to know the key by."),
    role: str = typer.Option(..., "--role", help="image, policy, audit or attestation."),
    days: int = typer.Option(3650, "--days", help="Days the key is trusted."),
) -> None:
    """Trust a public key made elsewhere."""
    on = remotes.list_target(remote, "popek trust add")
    if on is not None:
        key = _api(on).call("POST", "/1.0/trust/keys",
                            json={"name": name, "role": role, "days": days,
                                  "public_key": _read(file, "public key")})
        print(f"Key {key['name']} ({key['role']}) id {key['id']} is trusted until "
              f"{key['not_after']}.")
        return
    from popek.cli.ops import core
    from popek.core.requests import KeyAdd
    from popek.trust.keys import public_raw_from_text

    raw = public_raw_from_text(_read(file, "public key"))
    key = core().handle(KeyAdd(name, role, raw, days))
    print(f"Key {key.name} ({key.role}) id {key.id} is trusted until {key.not_after}.")


KEY_COLUMNS = (
    Column("NAME", itemgetter("name")), Column("ROLE", itemgetter("role")),
    Column("ID", lambda k: k["id"][:16]), Column("UNTIL", itemgetter("not_after")),
    Column("REVOKED", lambda k: k["revoked"] or "no"),
)


@trust_app.command("list")
def list_(remote: str | None = remote_argument(), fmt: str = format_option(),
          columns: str = columns_option(KEY_COLUMNS)) -> None:
    """List the keys of the trust store, revoked ones included."""
    on = remotes.list_target(remote, "popek trust list")
    rows = (_api(on).call("GET", "/1.0/trust/keys") if on is not None
            else [dict(k.__dict__) for k in _trust().all()])
    listing(rows, KEY_COLUMNS, fmt, select=columns, command="popek trust list")


_KEY_NAME = typer.Argument(..., metavar="[REMOTE:]NAME", help="The key (lab:NAME: on remote "
                                                             "lab).")


@trust_app.command()
def export(name: str = _KEY_NAME) -> None:
    """Print the public key NAME as PEM (to trust it on another host)."""
    where = remotes.locate(name, "key")
    if where is not None:
        print(_api(where[0]).content(f"{_key_path(where[1])}/pem").decode(), end="")
        return
    from popek.trust.keys import public_pem

    print(public_pem(_trust().by_name(name).raw()), end="")


@trust_app.command()
def remove(name: str = _KEY_NAME) -> None:
    """Stop trusting the key NAME (what it signed is refused from now on)."""
    where = remotes.locate(name, "key")
    if where is not None:
        rec = _api(where[0]).call("DELETE", _key_path(where[1]))
    else:
        from popek.cli.ops import core
        from popek.core.requests import KeyRemove

        rec = dict(core().handle(KeyRemove(name)).__dict__)
    print(f"Key {rec['name']} ({rec['id'][:16]}) removed from the trust store.")


@trust_app.command()
def revoke(name: str = _KEY_NAME,
           reason: str = typer.Option("", "--reason", help="Why.")) -> None:
    """Revoke the key NAME for good: its signatures are refused, it cannot be re-added."""
    where = remotes.locate(name, "key")
    if where is not None:
        rec = _api(where[0]).call("POST", f"{_key_path(where[1])}/revoke",
                                  json={"reason": reason})
    else:
        from popek.cli.ops import core
        from popek.core.requests import KeyRevoke

        rec = dict(core().handle(KeyRevoke(name, reason)).__dict__)
    print(f"Key {rec['name']} ({rec['id'][:16]}) revoked on {rec['revoked']}.")


@trust_app.command("allow-unsigned")
def allow_unsigned(
    remote: str | None = remote_argument(),
    project: str = typer.Option("default", "--project", help="Project to relax."),
    off: bool = typer.Option(False, "--off", help="Require signed images again."),
) -> None:
    """Let PROJECT launch unsigned images (audited); --off requires signatures again."""
    on = remotes.list_target(remote, "popek trust allow-unsigned")
    if on is not None:
        _api(on).call("PUT", f"/1.0/trust/unsigned/{quote(project, safe='')}",
                      json={"allow": not off})
    else:
        from popek.cli.ops import core
        from popek.core.requests import AllowUnsigned

        core().handle(AllowUnsigned(project, allow=not off))
    print(f"Project {project}: unsigned images are "
          f"{'refused' if off else 'ALLOWED (signatures are still checked when present)'}.")


# -- image sign (registered on the image group by main) -------------------------------
def image_sign(
    image: str = typer.Argument(..., metavar="[REMOTE:]IMAGE",
                                help="Image to sign (lab:IMAGE: on remote lab, with its "
                                     "host's key)."),
    key: str = typer.Option("", "--key", help="Private key name (default: this host's "
                                              "image key, made on first use)."),
    days: int = typer.Option(365, "--days", help="Days the signature is valid."),
    project: str | None = project_option(),
) -> None:
    """Sign IMAGE's manifest (an image of the project) with an image key."""
    where = remotes.locate(image, "image")
    if where is not None:
        got = _api(where[0]).call("POST", f"/1.0/images/{quote(where[1], safe='')}/sign",
                                  json={"key": key, "days": days},
                                  params={"project": project})
        print(f"Image {where[1]} signed by {got['signer']} (serial {got['serial']}).")
        return
    from popek.cli import scope
    from popek.cli.ops import core
    from popek.core.requests import ImageSign

    scope.use(project)
    v = core().handle(ImageSign(image, key, days))
    print(f"Image {image} signed by {v.signer} (serial {v.serial}).")


# -- policy -------------------------------------------------------------------------
@policy_app.command()
def show(remote: str | None = remote_argument(),
         fmt: str = typer.Option("text", "--format", "-f",
                                 click_type=click.Choice(("text", *FORMATS)),
                                 help="text (the policy file, with its version and signer "
                                      "as a comment), table, json, yaml or csv.")) -> None:
    """Print the policy in force, its version and signer."""
    on = remotes.list_target(remote, "popek policy show")
    if on is not None:
        show_policy(_api(on).call("GET", "/1.0/policy"), fmt)
        return
    from popek.core.views import policy_detail

    show_policy(policy_detail(_trust()), fmt)


def show_policy(data: dict[str, Any], fmt: str) -> None:
    """Print ``popek policy show``'s record (of this host or a remote) in ``fmt``."""
    if fmt == "text":
        print(f"# version {data['version']} ({data['source']}), mode {data['mode']}"
              + (f", applied {data['applied']}, signed by {data['signer']}" if data["applied"]
                 else ""))
        print(data["text"], end="")
        return
    rules = ([["label", "-", label] for label in data["labels"]]
             + [["conflict", c["name"], ",".join(c["labels"])] for c in data["conflicts"]]
             + [["share", s["kind"], ",".join(s["labels"])] for s in data["shares"]])
    details(data, [(k, data[k]) for k in ("version", "mode", "source", "applied", "signer")],
            fmt, [(("RULE", "NAME", "LABELS"), rules)])


@policy_app.command()
def apply(
    file: str = typer.Argument(..., help="Policy TOML ('-' reads stdin)."),
    remote: str | None = remote_argument(" to apply it on"),
    key: str = typer.Option("", "--key", help="Policy key name (default: the host's)."),
) -> None:
    """Check, sign and install a policy in one step (its version must increase)."""
    on = remotes.list_target(remote, "popek policy apply")
    if on is not None:
        now = _api(on).call("PUT", "/1.0/policy",
                            json={"text": _read(file, "policy"), "key": key})
        print(f"Policy version {now['version']} ({now['mode']}) is in force.")
        return
    from popek.cli.ops import core
    from popek.core.requests import PolicyApply

    pol = core().handle(PolicyApply(_read(file, "policy"), source=file, key=key))
    print(f"Policy version {pol.version} ({pol.mode}) is in force.")


@policy_app.command()
def check(file: str = typer.Argument(..., help="Policy TOML to check ('-' reads stdin)."),
          remote: str | None = remote_argument(" to check it with")) -> None:
    """Check a policy file without applying it; print what it declares."""
    on = remotes.list_target(remote, "popek policy check")
    if on is not None:
        got = _api(on).call("POST", "/1.0/policy/check", json={"text": _read(file, "policy")})
    else:
        from popek.trust.policy import parse

        pol = parse(_read(file, "policy"))
        got = {"version": pol.version, "mode": pol.mode, "labels": sorted(pol.labels),
               "conflicts": len(pol.conflicts), "shares": len(pol.shares)}
    print(f"Policy version {got['version']} ({got['mode']}) is valid: labels "
          f"{', '.join(got['labels'])}; {got['conflicts']} conflict set(s), "
          f"{got['shares']} share rule(s).")


# -- audit --------------------------------------------------------------------------
AUDIT_COLUMNS = (
    Column("SEQ", lambda r: r.get("seq")), Column("TIME", lambda r: r.get("time")),
    Column("ACTOR", lambda r: r.get("actor")),
    Column("IDENTITY", lambda r: r.get("identity", "")),
    Column("PROJECT", lambda r: r.get("project", "")),
    Column("OPERATION", lambda r: r.get("op")),
    Column("TARGET", lambda r: r.get("target")),
    Column("RESULT", lambda r: r.get("result"), width=80),
    Column("CHANGE", lambda r: r.get("change", ""), width=80),
)


@audit_app.command("log")
def audit_log(
    remote: str | None = remote_argument(),
    since: str = typer.Option("", "--since", help="Only records at or after this ISO time."),
    target: str = typer.Option("", "--target", help="Only records about this target."),
    fmt: str = format_option(),
    columns: str = columns_option(AUDIT_COLUMNS),
) -> None:
    """Show the audit log (a remote's: as far as its token may see)."""
    on = remotes.list_target(remote, "popek audit log")
    if on is not None:
        recs = _api(on).call("GET", "/1.0/audit", params={"since": since or None,
                                                          "target": target or None})
    else:
        from popek.core.views import audit_records

        recs = audit_records(_trust(), since, target, "--since")
    listing(recs, AUDIT_COLUMNS, fmt, select=columns, command="popek audit log")


@audit_app.command("verify")
def audit_verify(remote: str | None = remote_argument()) -> None:
    """Check the whole chain, the signed checkpoints and the stored head."""
    from popek.errors import TAMPERED

    on = remotes.list_target(remote, "popek audit verify")
    if on is not None:
        problems = list(_api(on).call("GET", "/1.0/audit/verify")["problems"])
    else:
        from popek.trust.audit import AuditLog

        problems = AuditLog(_trust()).verify()
    if problems:
        for p in problems:
            print(f"TAMPERED: {p}")
        raise typer.Exit(TAMPERED)
    print("Audit log intact.")


@audit_app.command("checkpoint")
def audit_checkpoint(remote: str | None = remote_argument()) -> None:
    """Sign the current head of the chain now."""
    on = remotes.list_target(remote, "popek audit checkpoint")
    if on is not None:
        cp = _api(on).call("POST", "/1.0/audit/checkpoint")["checkpoint"]
    else:
        from popek.cli.ops import core
        from popek.core.requests import AuditCheckpoint

        cp = core().handle(AuditCheckpoint())
    print("The log is empty." if cp is None else f"Checkpoint at seq {cp['seq']} signed.")


# -- attest ---------------------------------------------------------------------------
def attest(
    name: str = typer.Argument(..., help="Instance to attest (one called verify too); or "
                                          "'verify' followed by a QUOTE file to check it."),
    quote_file: str = typer.Argument("", metavar="[QUOTE]",
                                     help="With 'verify': the quote file ('-': stdin)."),
    remote: str | None = typer.Argument(None, metavar="[REMOTE:]",
                                        help="With 'verify': check it on a remote, with its "
                                             "keys (lab:; default: the default remote, else "
                                             "this host)."),
    nonce: str = typer.Option(..., "--nonce", help="The verifier's fresh nonce, hex."),
    expect: str = typer.Option("", "--expect", help="With 'verify': the expected measurement "
                                                    "(a measurement or quote JSON file)."),
    key_file: str = typer.Option("", "--key-file", help="With 'verify': the host's "
                                                        "attestation public key, when it is "
                                                        "not in this host's trust store."),
    project: str | None = project_option(),
) -> None:
    """Quote instance NAME's launch measurement over NONCE; or verify a quote.

    Two words make a verification (verify QUOTE), one word an instance's quote, so an
    instance may be called verify: popek attest verify --nonce HEX quotes it.
    """
    from popek.cli import remotes
    from popek.trust import measure as ms

    where = None if quote_file else remotes.locate(name)
    verify = "popek attest verify QUOTE [REMOTE:] --nonce HEX --expect FILE"
    if quote_file and name != "verify":
        raise InvalidInput(f"popek attest quotes one instance: {quote_file!r} is one argument "
                           f"too many; to check a quote: {verify}")
    on = remotes.list_target(remote, "popek attest verify") if quote_file else None
    if not quote_file and (expect or key_file):
        raise InvalidInput(f"--expect and --key-file check a quote and need its file: {verify} "
                           "('-' reads it from stdin); popek attest NAME --nonce HEX quotes "
                           "instance NAME, one called verify too")
    if where is not None:  # the remote host quotes its instance, signed with its key
        from popek.cli import remoteops

        print(json.dumps(remoteops.attest(where[0], where[1], nonce, project), indent=1))
        return
    if quote_file:
        if not expect:
            raise InvalidInput("attest verify needs --expect FILE (the expected measurement)")
        if on is not None:  # against the remote host's keys (its attestation key)
            body = _api(on).call("POST", "/1.0/attest/verify", json={
                "quote": _json_file(quote_file, "quote"), "nonce": nonce,
                "expect": _json_file(expect, "expect file"),
                "public_key": _read(key_file, "key file") if key_file else None})
        else:
            from popek.trust.keys import public_raw_from_text

            raw = public_raw_from_text(_read(key_file, "key file")) if key_file else None
            body = ms.verify_quote(_trust(), _json_file(quote_file, "quote"), nonce,
                                   _json_file(expect, "expect file"), raw)
        print(f"Quote verified: instance {body['instance']} on {body['host']}, "
              f"measurement {body['measurement']}.")
        return
    from popek.cli import scope
    from popek.cli.ops import core
    from popek.core.requests import Attest

    scope.use(project)
    print(json.dumps(core().handle(Attest(name, nonce=nonce)), indent=1))
