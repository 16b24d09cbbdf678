"""The ``popek`` command line.

Heavy modules (rich, the QMP library) are imported inside the commands that
need them, so that ``popek launch`` adds as little as possible to a boot.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import typer

from popek.cli import completion, exitcodes, ops, remotes, scope
from popek.cli.admin import app as admin_app
from popek.cli.certificate import app as certificate_app
from popek.cli.common import columns_option, format_option, project_option, remote_argument
from popek.cli.config import app as config_app
from popek.cli.network import app as network_app
from popek.cli.output import Column, details, listing
from popek.cli.profile import app as profile_app
from popek.cli.project import app as project_app
from popek.cli.project import token_app
from popek.cli.remote import app as remote_app
from popek.cli.sandbox import app as sandbox_app
from popek.cli.serve import monitor, serve
from popek.cli.storage import app as storage_app
from popek.cli.trust import attest, audit_app, image_sign, policy_app, trust_app

app = typer.Typer(
    name="popek", no_args_is_help=True, pretty_exceptions_enable=False,
    help="popek: virtual machines, containers and sandboxes, secure by default.",
    epilog=exitcodes.epilog(), add_completion=False,
)
image_app = typer.Typer(no_args_is_help=True, help="Build, list, inspect and delete images.")
app.add_typer(image_app, name="image")
app.add_typer(sandbox_app, name="sandbox")
app.add_typer(network_app, name="network")
app.add_typer(storage_app, name="storage")
app.add_typer(trust_app, name="trust")
app.add_typer(policy_app, name="policy")
app.add_typer(audit_app, name="audit")
app.add_typer(admin_app, name="admin")
app.add_typer(project_app, name="project")
app.add_typer(token_app, name="token")
app.add_typer(certificate_app, name="certificate")
app.add_typer(remote_app, name="remote")
app.command("attest")(attest)
app.command("serve")(serve)
app.command("monitor")(monitor)
image_app.command("sign")(image_sign)


def version_text() -> str:
    """``popek VERSION``, the version from the installed package's metadata."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"popek {version('popek')}"
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "popek (version unknown: the package is not installed)"


def _print_version(asked: bool) -> None:
    if asked:
        print(version_text())
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print popek's version and exit."),
) -> None:
    """popek: virtual machines, containers and sandboxes, secure by default."""


@app.command("version")
def version_() -> None:
    """Print popek's version (as popek --version)."""
    print(version_text())


# -- instances ----------------------------------------------------------------
# The bodies live in cli.ops, which cli.fastpath also runs: each command passes
# exactly its parameters on (tests/unit/test_cli_fastpath.py holds them equal).
@app.command()
def launch(
    image: str = typer.Argument(..., help="Image to launch (see popek image list)."),
    name: str = typer.Argument(..., help="Instance name: a-z, 0-9 and '-', 1-63 characters."),
    vcpus: int | None = typer.Option(None, "--vcpus",
                                     help="Number of virtual CPUs (limits.cpu; default 1)."),
    memory: str | None = typer.Option(None, "--memory", help="Memory, e.g. 512MiB or 2GiB "
                                      "(limits.memory; default 512MiB)."),
    accel: str = typer.Option("auto", "--accel", help="VMs: auto (detect), kvm or tcg."),
    container: bool = typer.Option(False, "--container", help="A system container, not a VM."),
    runtime: str = typer.Option("auto", "--runtime",
                                help="Containers: auto, runc or crun (auto: crun on cgroup v2)."),
    pids: int | None = typer.Option(None, "--pids", help="Most processes at once "
                                    "(limits.pids; containers' default 1024)."),
    mount: list[str] = typer.Option([], "--mount",
                                    help="Containers: share a host directory, SRC:DST[:ro]."),
    network: list[str] = typer.Option([], "--network",
                                      help="Attach to popek network NAME, or NAME=IP for a "
                                           "static address (repeatable)."),
    timeout: float = typer.Option(180.0, "--timeout", help="Seconds to wait for the guest."),
    label: str | None = typer.Option(None, "--label", help="Access control label (see popek "
                                     "policy show; default: default)."),
    net_rate: str = typer.Option("", "--net-rate",
                                 help="Limit each network port, both ways, e.g. 100Mbit."),
    disk: list[str] = typer.Option([], "--disk",
                                   help="VMs: attach block volume POOL/VOLUME (repeatable; "
                                        "popek storage volume create). Containers: the size "
                                        "of the writable layer (limits.disk), e.g. 20GiB; "
                                        "default: the project's (popek project show)."),
    config: list[str] = typer.Option([], "--config", "-c", metavar="KEY=VALUE",
                                     help="A config key (repeatable; popek config set lists "
                                          "them); wins over a shorthand option such as "
                                          "--memory for the same key."),
    profile: list[str] = typer.Option([], "--profile", "-p",
                                      help="Apply a profile's keys and networks (repeatable, "
                                           "in order; then the options, then -c)."),
    project: str | None = project_option(),
) -> None:
    """Create an instance (a VM, or a container with --container) from IMAGE and start it."""
    ops.launch(**locals())


@app.command("list")
def list_(remote: str | None = typer.Argument(
              None, metavar="[REMOTE:]",
              help="A remote's instances (lab:; popek remote list); default: the default "
                   "remote (popek remote switch), else this host."),
          fmt: str = format_option(),
          columns: str = columns_option(ops.INSTANCE_COLUMNS),
          project: str | None = project_option(),
          all_projects: bool = typer.Option(False, "--all-projects",
                                            help="The instances of every project.")) -> None:
    """List a project's instances, with their IPv4 addresses (json and yaml: their network
    ports too)."""
    ops.list_(**locals())


@app.command()
def info(name: str, fmt: str = format_option(),
         project: str | None = project_option()) -> None:
    """Show the details of an instance."""
    ops.info(**locals())


@app.command()
def start(name: str, timeout: float = typer.Option(180.0, "--timeout"),
          project: str | None = project_option()) -> None:
    """Start a stopped instance."""
    ops.start(**locals())


@app.command()
def stop(
    name: str,
    force: bool = typer.Option(False, "--force", help="Power off at once, no ACPI shutdown."),
    timeout: float = typer.Option(30.0, "--timeout", help="Seconds before forcing."),
    project: str | None = project_option(),
) -> None:
    """Stop an instance: ACPI shutdown first, forced after --timeout seconds."""
    ops.stop(**locals())


@app.command()
def restart(
    name: str,
    force: bool = typer.Option(False, "--force"),
    timeout: float = typer.Option(30.0, "--timeout"),
    project: str | None = project_option(),
) -> None:
    """Stop an instance and start it again."""
    ops.restart(**locals())


@app.command()
def pause(name: str, project: str | None = project_option()) -> None:
    """Freeze a running instance."""
    ops.pause(**locals())


@app.command()
def resume(name: str, project: str | None = project_option()) -> None:
    """Resume a paused instance."""
    ops.resume(**locals())


@app.command()
def console(
    name: str,
    log: bool = typer.Option(False, "--log", help="Print the end of what the console wrote "
                             "(a VM's last 4 MiB at most), then exit."),
    project: str | None = project_option(),
) -> None:
    """Attach to an instance's console (detach with Ctrl-]), or print its log."""
    from popek.cli import remotes, scope

    where = remotes.locate(name)
    if where is not None:  # through the remote's console websocket
        if log:
            from popek.cli import remoteops

            sys.stdout.buffer.write(remoteops.console_log(where[0], where[1], project))
            sys.stdout.flush()
            return
        from popek.cli import remoteterm

        remoteterm.console(where[0], where[1], project)
        return
    scope.use(project)
    if log:
        sys.stdout.buffer.write(ops.instances(name).console_log(name))
        sys.stdout.flush()
        return
    from popek.core.requests import Console

    if sys.stdin.isatty():
        note = f"Attached to {name}'s console; press Ctrl-] to detach."
    else:  # a pipe, a file or /dev/null: sent, then the output until the console closes
        note = (f"Attached to {name}'s console without a terminal: input is sent, then its "
                f"output shows until it closes (Ctrl-C ends; popek console {name} --log "
                "prints what it wrote so far).")
    ops.core().handle(Console(name, attached=lambda _: print(note, file=sys.stderr)))
    print("\nDetached.", file=sys.stderr)


@app.command(context_settings={"ignore_unknown_options": True})
def exec(
    name: str,
    command: list[str] = typer.Argument(..., help="Command and arguments, after --."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds to wait for the command."),
    no_stdin: bool = typer.Option(False, "--no-stdin", "-n", help="Do not forward stdin."),
    no_tty: bool = typer.Option(False, "--no-tty", "-T", help="Never allocate a terminal."),
    project: str | None = project_option(),
) -> None:
    """Run a command inside an instance: its stdout, stderr and exit code pass through.

    When stdin and stdout are terminals it runs on a terminal in the instance
    (a VM's through its guest agent; -T: none).  Otherwise containers pass
    the streams through; VMs read the input first (4 MiB at most) and stream
    the output (with --no-stdin it comes back whole, 16 MiB at most, within
    --timeout).
    """
    raise typer.Exit(ops.exec_(**locals()))


@app.command()
def delete(
    name: str,
    force: bool = typer.Option(False, "--force", help="Stop the instance first if it runs."),
    project: str | None = project_option(),
) -> None:
    """Delete an instance and everything it left on the host."""
    ops.delete(**locals())


app.add_typer(config_app, name="config")
app.add_typer(profile_app, name="profile")


server_app = typer.Typer(no_args_is_help=True,
                         help="The warm command server that runs popek commands (see "
                              "docs/ARCHITECTURE.md).")
app.add_typer(server_app, name="command-server")


@server_app.command("status")
def server_status() -> None:
    """Say whether a command server runs, and its pid."""
    from popek.cli import cmdserver
    from popek.errors import NOT_FOUND

    status = cmdserver.parse_status(cmdserver.control("status"))
    if status is None and cmdserver.starting():
        print("A command server is starting (popek serve starts its own again after a stop "
              "or a change of popek's sources).")
        raise typer.Exit(NOT_FOUND)
    if status is None:
        print("No command server runs (the next root command starts one).")
        raise typer.Exit(NOT_FOUND)
    pid, owner = status
    if owner:
        print(f"The command server runs as pid {pid}, part of popek serve (pid {owner}).")
    else:
        print(f"The command server runs as pid {pid}.")


@server_app.command("stop")
def server_stop() -> None:
    """Stop the command server (commands run in their own process until one starts).

    The command server of ``popek serve`` is part of it: stopping it makes
    ``popek serve`` start a fresh one (from the sources on disk), and
    ``popek serve`` goes on serving.
    """
    from popek.cli import cmdserver

    status = cmdserver.parse_status(cmdserver.control("status"))
    if not cmdserver.stop():
        print("No command server runs.")
    elif status is not None and status[1]:
        print(f"The command server is part of popek serve (pid {status[1]}): stopped; "
              "popek serve starts a fresh one (stop popek serve to end both).")
    else:
        print("Command server stopped.")


@app.command("completion")
def completion_script(
    shell: str = typer.Argument(..., click_type=completion.SHELL_CHOICE,
                                help="bash, zsh or fish."),
) -> None:
    """Print the completion script of SHELL for popek (make setup installs them).

    Load it for this shell with: source <(popek completion bash)
    """
    print(completion.script(shell), end="")


# -- images -------------------------------------------------------------------
@image_app.command("build")
def image_build(
    name: str = typer.Argument(..., metavar="[REMOTE:]NAME",
                               help="Builder to run: minimal (VM + container) or debian "
                                    "(lab:NAME: on remote lab)."),
    force: bool = typer.Option(False, "--force", help="Rebuild an existing image."),
    sign: bool = typer.Option(True, "--sign/--no-sign", help="Sign the new image."),
    key: str = typer.Option("", "--key", help="Image key to sign with (default: this "
                                              "host's image key)."),
    project: str | None = project_option(),
) -> None:
    """Build an image of the project from Debian packages (and sign it)."""
    from popek.core.requests import ImageBuild

    where = remotes.locate(name, "image")
    if where is not None:
        from popek.cli import remoteops

        rec = remoteops.image_build(where[0], where[1], force, sign, key, project)
        print(f"Image {rec['name']} {rec['version']} built on remote {where[0]}, "
              f"{_signed_record(rec)}.")
        return
    scope.use(project)
    with ops.progress(f"building image {name}") as progress:
        built = ops.core().handle(ImageBuild(name, force=force, sign=sign, key=key,
                                             progress=progress))
    image, signed = built.image, _signed(built.signature)
    print(f"Image {image.name} {image.manifest.version} built at {image.path}, {signed}.")


@image_app.command("import")
def image_import(
    file: str = typer.Argument(..., help="A rootfs tarball (.tar[.gz|.xz|.zst]) or an OCI "
                                          "image layout (directory or .tar)."),
    name: str = typer.Argument(..., metavar="[REMOTE:]NAME",
                               help="Name of the new image (lab:NAME: on remote lab: the "
                                    "file is sent there)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing image."),
    sign: bool = typer.Option(True, "--sign/--no-sign",
                              help="Sign the imported image: you vouch for its content."),
    key: str = typer.Option("", "--key", help="Image key to sign with (default: this "
                                              "host's image key)."),
    project: str | None = project_option(),
) -> None:
    """Import a root filesystem or an OCI image as a container image of the project (and
    sign it)."""
    from popek.core.requests import ImageImport

    where = remotes.locate(name, "image")
    if where is not None:
        from popek.cli import remoteops

        rec = remoteops.image_import(where[0], file, where[1], force, sign, key, project)
        print(f"Image {rec['name']} imported on remote {where[0]} "
              f"({', '.join(rec['kinds'])}), {_signed_record(rec)}.")
        return
    scope.use(project)
    with ops.progress(f"importing {file}") as progress:
        built = ops.core().handle(ImageImport(file, name, force=force, sign=sign, key=key,
                                              progress=progress))
    image, signed = built.image, _signed(built.signature)
    print(f"Image {image.name} imported at {image.path} ({', '.join(image.kinds())}), "
          f"{signed}.")


def _size(record: dict[str, Any]) -> str:
    from popek.units import format_size

    return format_size(record["size"])


def _signer(record: dict[str, Any]) -> str:
    return record["signature"]["signer"][:16] if record["signature"] else "no"


IMAGE_COLUMNS = (
    Column("NAME", lambda r: r["name"]), Column("PROJECT", lambda r: r["project"]),
    Column("KINDS", lambda r: ",".join(r["kinds"])),
    Column("VERSION", lambda r: r["version"]), Column("CREATED", lambda r: r["created"]),
    Column("KERNEL", lambda r: r["kernel"]), Column("SIZE", _size),
    Column("SIGNER", _signer),
    Column("SERIAL", lambda r: r["signature"]["serial"] if r["signature"] else ""),
    Column("EXPIRES", lambda r: r["signature"]["expires"] if r["signature"] else "",
           default=False),
)


@image_app.command("list")
def image_list(remote: str | None = remote_argument(), fmt: str = format_option(),
               columns: str = columns_option(IMAGE_COLUMNS),
               project: str | None = project_option()) -> None:
    """List the project's images, then the default project's (shared with every project),
    and who signed them (the signature is checked at each start, not here)."""
    on = remotes.list_target(remote, "popek image list")
    if on is not None:
        from popek.cli import remoteops

        rows = remoteops.client(on).call("GET", "/1.0/images", params={"project": project})
    else:
        from popek.core.views import image_summaries

        scope.use(project)
        rows = image_summaries(ops.core())
    listing(rows, IMAGE_COLUMNS, fmt, select=columns, command="popek image list")


@image_app.command("info")
def image_info(name: str = typer.Argument(..., metavar="[REMOTE:]NAME",
                                         help="The image (lab:NAME: on remote lab)."),
               fmt: str = format_option(),
               project: str | None = project_option()) -> None:
    """Show an image's manifest (the project's own, else the default project's; the table
    lists its files)."""
    where = remotes.locate(name, "image")
    if where is not None:
        from urllib.parse import quote

        from popek.cli import remoteops

        show_image(remoteops.client(where[0]).call(
            "GET", f"/1.0/images/{quote(where[1], safe='')}", params={"project": project}),
            fmt)
        return
    from popek.core.views import image_detail

    scope.use(project)
    core = ops.core()
    owner, image = core.images.resolve(name, core.project)
    show_image(image_detail(image, owner), fmt)


def show_image(data: dict[str, Any], fmt: str) -> None:
    """Print ``popek image info``'s record (of this host or a remote) in ``fmt``."""
    from popek.units import format_size

    fields = [(k, v) for k, v in data.items() if not isinstance(v, dict | list)]
    signature = data["signature"] or {}
    fields += [(f"signature.{k}", v) for k, v in signature.items()] or [("signature", "no")]
    files = [[path, format_size(f["size"]), f["sha256"]]
             for path, f in sorted(data["files"].items())]
    details(data, fields, fmt, [(("FILE", "SIZE", "SHA256"), files)])


@image_app.command("delete")
def image_delete(name: str = typer.Argument(..., metavar="[REMOTE:]NAME",
                                           help="The image (lab:NAME: on remote lab)."),
                 project: str | None = project_option()) -> None:
    """Delete an image of the project (refused while instances use it)."""
    from popek.core.requests import ImageDelete

    where = remotes.locate(name, "image")
    if where is not None:
        from urllib.parse import quote

        from popek.cli import remoteops

        remoteops.client(where[0]).call("DELETE", f"/1.0/images/{quote(where[1], safe='')}",
                                        params={"project": project})
        print(f"Image {where[1]} deleted.")
        return
    scope.use(project)
    ops.core().handle(ImageDelete(name))  # its container base goes too, unless still used
    print(f"Image {name} deleted.")


def _signed_record(record: dict[str, Any]) -> str:
    """How an image a remote built or imported was signed (its ``image list`` record)."""
    sig = record.get("signature")
    return f"signed by {sig['signer']} (serial {sig['serial']})" if sig else "not signed"


def _signed(signature: Any) -> str:
    """How a built or imported image was signed, for the user."""
    if signature is None:
        return "not signed"
    return f"signed by {signature.signer} (serial {signature.serial})"


def _audit(command: Any, args: list[str], code: int, error: str) -> None:
    """Audit a command that never reached the core (a usage error, a bad value).

    A request that reached the core was audited there (see popek.core.service).
    """
    from popek.cli.auditing import describe, record

    if ops.audited():
        return
    what = describe(command, args)
    if what is not None:
        record(what[0], what[1], args, code, error)


def main(argv: list[str] | None = None) -> NoReturn:
    """Run ``popek ARGV...`` through Typer (the console script tries cli.fastpath first)."""
    from popek.cli.entry import PROG_NAME, finish, warn_unless_root

    args = list(sys.argv[1:] if argv is None else argv)
    warn_unless_root(args)
    # what app() does (pretty exceptions are off), keeping the command tree for the audit.
    # The program is `popek` whatever ran it: Click would otherwise take its name from
    # sys.argv[0] and __main__ ("-c" under the native client's Python fallback, "python -m
    # popek.cli.popek" in the command server) for usage lines, errors and shell completion
    # (its variable is _POPEK_COMPLETE from this name).
    command = typer.main.get_command(app)
    completion.prepare(command)
    finish(lambda: _run(command, args, PROG_NAME),
           lambda code, error: _audit(command, args, code, error))


def _one_suggestion(exc: Any, ctx: Any) -> None:
    """Say "Did you mean" once, and only for a slip (Click and Typer each add one)."""
    from popek.cli.suggest import message

    group = ctx.command
    names = group.list_commands(ctx) if hasattr(group, "list_commands") else []
    vars(exc)["message"] = message(exc.command_name, names)
    exc.possibilities = None


def _run(command: Any, args: list[str], prog: str) -> int:
    """Typer's standalone run, with its usage errors bounded as popek's own (errors.bounded).

    Click echoes a bad value whole (``--vcpus`` with 5000 digits); here it is shown
    by its ends.  Commands give their exit code with ``typer.Exit``.
    """
    import click
    from typer import rich_utils

    from popek.errors import bounded

    try:
        code = command.main(args=args, prog_name=prog, standalone_mode=False)
    except click.ClickException as exc:
        if isinstance(exc, click.exceptions.NoSuchCommand) and exc.ctx is not None:
            _one_suggestion(exc, exc.ctx)
        vars(exc)["message"] = bounded(exc.message)  # Final in Click's stubs, a plain attribute
        rich_utils.rich_format_error(exc)
        return exc.exit_code
    except click.exceptions.Abort:
        print("Aborted!", file=sys.stderr)
        return 1
    return code if isinstance(code, int) else 0
