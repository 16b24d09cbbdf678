"""``popek trust``, ``popek policy``, ``popek audit`` and ``popek attest``.

Registered by :mod:`popek.cli.main`.  The trust package (and through it the
cryptography library) is imported inside the commands.
"""

from __future__ import annotations

import json
import sys
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import typer

from popek.cli.common import FORMATS, columns_option, format_option, project_option
from popek.cli.output import Column, details, listing
from popek.errors import InvalidInput

if TYPE_CHECKING:
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
    name: str = typer.Argument(..., help="Key name: a-z, 0-9, '.', '_', '-'."),
    role: str = typer.Option(..., "--role", help="image, policy, audit or attestation."),
    days: int = typer.Option(3650, "--days", help="Days the key is valid."),
) -> None:
    """Make an Ed25519 key pair; its public key is trusted for ROLE at once."""
    from popek.cli.ops import core
    from popek.core.requests import KeyGen
    from popek.trust.keys import private_key_path

    key = core().handle(KeyGen(name, role, days))
    print(f"Key {key.name} ({key.role}) id {key.id}; private key {private_key_path(name)}.")


@trust_app.command()
def add(
    file: str = typer.Argument(..., help="Public key: PEM, or base64 of the 32 raw bytes "
                                         "('-' reads stdin)."),
    name: str = typer.Option(..., "--name", help="Name to know the key by."),
    role: str = typer.Option(..., "--role", help="image, policy, audit or attestation."),
    days: int = typer.Option(3650, "--days", help="Days the key is trusted."),
) -> None:
    """Trust a public key made elsewhere."""
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
def list_(fmt: str = format_option(), columns: str = columns_option(KEY_COLUMNS)) -> None:
    """List the keys of the trust store, revoked ones included."""
    listing([dict(k.__dict__) for k in _trust().all()], KEY_COLUMNS, fmt, select=columns,
            command="popek trust list")


@trust_app.command()
def export(name: str) -> None:
    """Print the public key NAME as PEM (to trust it on another host)."""
    from popek.trust.keys import public_pem

    print(public_pem(_trust().by_name(name).raw()), end="")


@trust_app.command()
def remove(name: str) -> None:
    """Stop trusting the key NAME (what it signed is refused from now on)."""
    from popek.cli.ops import core
    from popek.core.requests import KeyRemove

    key = core().handle(KeyRemove(name))
    print(f"Key {key.name} ({key.id[:16]}) removed from the trust store.")


@trust_app.command()
def revoke(name: str, reason: str = typer.Option("", "--reason", help="Why.")) -> None:
    """Revoke the key NAME for good: its signatures are refused, it cannot be re-added."""
    from popek.cli.ops import core
    from popek.core.requests import KeyRevoke

    key = core().handle(KeyRevoke(name, reason))
    print(f"Key {key.name} ({key.id[:16]}) revoked on {key.revoked}.")


@trust_app.command("allow-unsigned")
def allow_unsigned(
    project: str = typer.Option("default", "--project", help="Project to relax."),
    off: bool = typer.Option(False, "--off", help="Require signed images again."),
) -> None:
    """Let PROJECT launch unsigned images (audited); --off requires signatures again."""
    from popek.cli.ops import core
    from popek.core.requests import AllowUnsigned

    core().handle(AllowUnsigned(project, allow=not off))
    print(f"Project {project}: unsigned images are "
          f"{'refused' if off else 'ALLOWED (signatures are still checked when present)'}.")


# -- image sign (registered on the image group by main) -------------------------------
def image_sign(
    image: str = typer.Argument(..., help="Image to sign."),
    key: str = typer.Option("", "--key", help="Private key name (default: this host's "
                                              "image key, made on first use)."),
    days: int = typer.Option(365, "--days", help="Days the signature is valid."),
    project: str | None = project_option(),
) -> None:
    """Sign IMAGE's manifest (an image of the project) with an image key."""
    from popek.cli import scope
    from popek.cli.ops import core
    from popek.core.requests import ImageSign

    scope.use(project)
    v = core().handle(ImageSign(image, key, days))
    print(f"Image {image} signed by {v.signer} (serial {v.serial}).")


# -- policy -------------------------------------------------------------------------
@policy_app.command()
def show(fmt: str = typer.Option("text", "--format", "-f",
                                 click_type=click.Choice(("text", *FORMATS)),
                                 help="text (the policy file, with its version and signer "
                                      "as a comment), table, json, yaml or csv.")) -> None:
    """Print the policy in force, its version and signer."""
    from popek.core.views import policy_detail

    data = policy_detail(_trust())
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
    key: str = typer.Option("", "--key", help="Policy key name (default: this host's)."),
) -> None:
    """Check, sign and install a policy in one step (its version must increase)."""
    from popek.cli.ops import core
    from popek.core.requests import PolicyApply

    pol = core().handle(PolicyApply(_read(file, "policy"), source=file, key=key))
    print(f"Policy version {pol.version} ({pol.mode}) is in force.")


@policy_app.command()
def check(file: str = typer.Argument(..., help="Policy TOML to check ('-' reads stdin).")) -> None:
    """Check a policy file without applying it; print what it declares."""
    from popek.trust.policy import parse

    pol = parse(_read(file, "policy"))
    print(f"Policy version {pol.version} ({pol.mode}) is valid: labels "
          f"{', '.join(sorted(pol.labels))}; {len(pol.conflicts)} conflict set(s), "
          f"{len(pol.shares)} share rule(s).")


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
    since: str = typer.Option("", "--since", help="Only records at or after this ISO time."),
    target: str = typer.Option("", "--target", help="Only records about this target."),
    fmt: str = format_option(),
    columns: str = columns_option(AUDIT_COLUMNS),
) -> None:
    """Show the audit log."""
    from popek.core.views import audit_records

    recs = audit_records(_trust(), since, target, "--since")
    listing(recs, AUDIT_COLUMNS, fmt, select=columns, command="popek audit log")


@audit_app.command("verify")
def audit_verify() -> None:
    """Check the whole chain, the signed checkpoints and the stored head."""
    from popek.errors import TAMPERED
    from popek.trust.audit import AuditLog

    problems = AuditLog(_trust()).verify()
    if problems:
        for p in problems:
            print(f"TAMPERED: {p}")
        raise typer.Exit(TAMPERED)
    print("Audit log intact.")


@audit_app.command("checkpoint")
def audit_checkpoint() -> None:
    """Sign the current head of the chain now."""
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
    verify = "popek attest verify QUOTE --nonce HEX --expect FILE"
    if quote_file and name != "verify":
        raise InvalidInput(f"popek attest quotes one instance: {quote_file!r} is one argument "
                           f"too many; to check a quote: {verify}")
    if not quote_file and (expect or key_file):
        raise InvalidInput(f"--expect and --key-file check a quote and need its file: {verify} "
                           "('-' reads it from stdin); popek attest NAME --nonce HEX quotes "
                           "instance NAME, one called verify too")
    if where is not None:  # the remote host quotes its instance, signed with its key
        from popek.cli import remoteops

        print(json.dumps(remoteops.attest(where[0], where[1], nonce, project), indent=1))
        return
    trust = _trust()
    if quote_file:
        if not expect:
            raise InvalidInput("attest verify needs --expect FILE (the expected measurement)")
        from popek.trust.keys import public_raw_from_text

        raw = public_raw_from_text(_read(key_file, "key file")) if key_file else None
        body = ms.verify_quote(trust, _json_file(quote_file, "quote"), nonce,
                               _json_file(expect, "expect file"), raw)
        print(f"Quote verified: instance {body['instance']} on {body['host']}, "
              f"measurement {body['measurement']}.")
        return
    from popek.cli import scope
    from popek.cli.ops import core
    from popek.core.requests import Attest

    scope.use(project)
    print(json.dumps(core().handle(Attest(name, nonce=nonce)), indent=1))
