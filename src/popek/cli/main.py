"""The ``popek`` command line.

Heavy modules (rich, the QMP library) are imported inside the commands that
need them, so that ``popek launch`` adds as little as possible to a boot.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import typer

from popek.cli.common import check_format, print_table
from popek.cli.network import app as network_app
from popek.cli.sandbox import app as sandbox_app
from popek.cli.trust import attest, audit_app, image_sign, policy_app, sign_built, trust_app
from popek.errors import PopekError

if TYPE_CHECKING:
    from popek.core.instances import Instances

app = typer.Typer(
    name="popek", no_args_is_help=True, pretty_exceptions_enable=False,
    help="popek: virtual machines, containers and sandboxes, secure by default.",
)
image_app = typer.Typer(no_args_is_help=True, help="Build, list, inspect and delete images.")
app.add_typer(image_app, name="image")
app.add_typer(sandbox_app, name="sandbox")
app.add_typer(network_app, name="network")
app.add_typer(trust_app, name="trust")
app.add_typer(policy_app, name="policy")
app.add_typer(audit_app, name="audit")
app.command("attest")(attest)
image_app.command("sign")(image_sign)

def _instances() -> Instances:
    from popek.core.instances import Instances

    return Instances()


@contextmanager
def _progress(initial: str) -> Iterator[Callable[[str], None]]:
    """Show progress of a long step: a spinner on a terminal, plain lines otherwise."""
    if sys.stderr.isatty():
        from rich.console import Console

        with Console(stderr=True).status(initial) as status:
            yield lambda msg: status.update(msg)
    else:
        def plain(msg: str) -> None:
            print(f"popek: {msg}", file=sys.stderr, flush=True)

        yield plain


def _size(text: str, what: str) -> int:
    from popek.units import parse_size

    return parse_size(text, what)


# -- instances ----------------------------------------------------------------
@app.command()
def launch(
    image: str = typer.Argument(..., help="Image to launch (see popek image list)."),
    name: str = typer.Argument(..., help="Instance name: a-z, 0-9 and '-', 1-63 characters."),
    vcpus: int = typer.Option(1, "--vcpus", help="Number of virtual CPUs."),
    memory: str = typer.Option("512MiB", "--memory", help="Memory, e.g. 512MiB or 2GiB."),
    accel: str = typer.Option("auto", "--accel", help="VMs: auto (detect), kvm or tcg."),
    container: bool = typer.Option(False, "--container", help="A system container, not a VM."),
    runtime: str = typer.Option("auto", "--runtime",
                                help="Containers: auto, runc or crun (auto: crun on cgroup v2)."),
    pids: int = typer.Option(1024, "--pids", help="Containers: most processes at once."),
    mount: list[str] = typer.Option([], "--mount",
                                    help="Containers: share a host directory, SRC:DST[:ro]."),
    network: list[str] = typer.Option([], "--network",
                                      help="Attach to popek network NAME, or NAME=IP for a "
                                           "static address (repeatable)."),
    timeout: float = typer.Option(180.0, "--timeout", help="Seconds to wait for the guest."),
    label: str = typer.Option("default", "--label",
                              help="Access control label (see popek policy show)."),
    net_rate: str = typer.Option("", "--net-rate",
                                 help="Limit each network port, both ways, e.g. 100Mbit."),
) -> None:
    """Create an instance (a VM, or a container with --container) from IMAGE and start it."""
    mem = _size(memory, "memory size")
    engine = "container" if container else "qemu"
    limits: dict[str, int] = {"pids": pids} if container else {}
    if net_rate:
        from popek.network.shaping import parse_rate

        limits["net"] = parse_rate(net_rate)
    with _progress(f"launching {name}") as progress:
        inst = _instances().launch(image, name, vcpus=vcpus, memory=mem, accel=accel,
                                   engine=engine, runtime=runtime,
                                   limits=limits,
                                   mounts=mount, networks=network,
                                   ready_timeout=timeout, progress=progress, label=label)
    details = inst.runtime.details if inst.runtime else {}
    how = details.get("accel") or details.get("runtime") or "?"
    kind = "container" if container else "VM"
    print(f"Instance {name} is running ({kind}, {how}, {vcpus} vCPU, {memory}).")


@app.command("list")
def list_(fmt: str = typer.Option("table", "--format", help="table or json.")) -> None:
    """List instances."""
    check_format(fmt)
    from popek.units import format_size

    insts = _instances().all()
    if fmt == "json":
        print(json.dumps([{
            "name": i.name, "state": i.state.value, "reason": i.reason, "engine": i.spec.engine,
            "image": i.spec.image, "vcpus": i.spec.vcpus, "memory": i.spec.memory,
            "pid": i.runtime.pid if i.runtime else None,
        } for i in insts], indent=2))
        return
    print_table(["NAME", "STATE", "ENGINE", "IMAGE", "VCPUS", "MEMORY", "REASON"], [
        [i.name, i.state.value, i.spec.engine, i.spec.image, str(i.spec.vcpus),
         format_size(i.spec.memory), i.reason] for i in insts])


@app.command()
def info(name: str, fmt: str = typer.Option("table", "--format", help="table or json.")) -> None:
    """Show the details of an instance."""
    check_format(fmt)
    data = _instances().info(name)
    if fmt == "json":
        print(json.dumps(data, indent=2))
        return
    from popek.units import format_size

    history = data.pop("history")
    ports = data.pop("ports", [])
    for p in ports:
        data[f"network {p['network']}"] = f"{p['ipv4']} {p['mac']} ({p['host_device']})"
    data["memory"] = format_size(data["memory"])
    trust = data.pop("image_trust", None)
    if trust:
        data["image_trust"] = trust["note"]
    usage = data.pop("usage", None)
    if usage:
        def _of(used: Any, limit: Any, fmt: Callable[[Any], str] = str) -> str:
            return f"{fmt(used) if used is not None else '?'} of " + (
                fmt(limit) if limit is not None else "no limit")

        mib = lambda n: f"{n / (1 << 20):.1f}MiB"  # noqa: E731
        data["memory used"] = _of(usage["memory"], usage["memory_limit"], mib)
        data["processes"] = _of(usage["pids"], usage["pids_limit"])
        data["cpu time"] = f"{usage['cpu_seconds'] or 0:.2f}s"
    print_table(["FIELD", "VALUE"], [[k, str(v)] for k, v in data.items()])
    print_table(["TIME", "EVENT"], [[h["time"], h["event"]] for h in history])


@app.command()
def start(name: str, timeout: float = typer.Option(180.0, "--timeout")) -> None:
    """Start a stopped instance."""
    with _progress(f"starting {name}") as progress:
        _instances().start(name, ready_timeout=timeout, progress=progress)
    print(f"Instance {name} is running.")


@app.command()
def stop(
    name: str,
    force: bool = typer.Option(False, "--force", help="Power off at once, no ACPI shutdown."),
    timeout: float = typer.Option(30.0, "--timeout", help="Seconds before forcing."),
) -> None:
    """Stop an instance: ACPI shutdown first, forced after --timeout seconds."""
    with _progress(f"stopping {name}"):
        how = _instances().stop(name, force=force, timeout=timeout)
    print(f"Instance {name} stopped ({how}).")


@app.command()
def restart(
    name: str,
    force: bool = typer.Option(False, "--force"),
    timeout: float = typer.Option(30.0, "--timeout"),
) -> None:
    """Stop an instance and start it again."""
    with _progress(f"restarting {name}") as progress:
        _instances().restart(name, force=force, timeout=timeout, progress=progress)
    print(f"Instance {name} restarted.")


@app.command()
def pause(name: str) -> None:
    """Freeze a running instance."""
    _instances().pause(name)
    print(f"Instance {name} paused.")


@app.command()
def resume(name: str) -> None:
    """Resume a paused instance."""
    _instances().resume(name)
    print(f"Instance {name} resumed.")


@app.command()
def console(
    name: str,
    log: bool = typer.Option(False, "--log", help="Print what the console wrote, then exit."),
) -> None:
    """Attach to an instance's console (detach with Ctrl-]), or print its log."""
    insts = _instances()
    if log:
        sys.stdout.buffer.write(insts.console_log(name))
        sys.stdout.flush()
        return
    print(f"Attached to {name}'s console; press Ctrl-] to detach.", file=sys.stderr)
    insts.console(name)
    print("\nDetached.", file=sys.stderr)


@app.command(context_settings={"ignore_unknown_options": True})
def exec(
    name: str,
    command: list[str] = typer.Argument(..., help="Command and arguments, after --."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds to wait for the command."),
    no_stdin: bool = typer.Option(False, "--no-stdin", "-n", help="Do not forward stdin."),
    no_tty: bool = typer.Option(False, "--no-tty", "-T", help="Never allocate a terminal."),
) -> None:
    """Run a command inside an instance: its stdout, stderr and exit code pass through.

    Containers run it on this terminal (interactive with a TTY when stdin and
    stdout are terminals); VMs return its whole output through the guest agent.
    """
    insts = _instances()
    tty = sys.stdin.isatty() and sys.stdout.isatty() and not no_tty
    code = insts.exec_stream(name, command, tty) if not no_stdin else None
    if code is not None:
        raise typer.Exit(code)
    stdin = b""
    if not no_stdin and not sys.stdin.isatty():
        stdin = sys.stdin.buffer.read()
    result = insts.exec(name, command, stdin, timeout)
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr)
    sys.stderr.flush()
    raise typer.Exit(result.exit_code)


@app.command()
def delete(
    name: str,
    force: bool = typer.Option(False, "--force", help="Stop the instance first if it runs."),
) -> None:
    """Delete an instance and everything it left on the host."""
    _instances().delete(name, force=force)
    print(f"Instance {name} deleted.")


config_app = typer.Typer(no_args_is_help=True, help="Show and change instance settings.")
app.add_typer(config_app, name="config")


@config_app.command("set")
def config_set(
    name: str,
    key: str = typer.Argument(..., help="limits.memory, limits.cpu, limits.pids, limits.net "
                                        "(e.g. 100Mbit, or none) or label (only while "
                                        "stopped)."),
    value: str = typer.Argument(..., help="e.g. 256MiB, 2, 512."),
) -> None:
    """Change a limit; a running container gets it at once."""
    _instances().config_set(name, key, value)
    print(f"Instance {name}: {key} = {value}.")


@config_app.command("show")
def config_show(name: str) -> None:
    """Show an instance's limits."""
    from popek.network.shaping import format_rate
    from popek.units import format_size

    inst = _instances().get(name)
    extra: dict[str, Any] = {f"limits.{k}": v for k, v in inst.spec.limits.items()}
    if "limits.net" in extra:
        extra["limits.net"] = format_rate(int(extra["limits.net"]))
    print(json.dumps({"limits.memory": format_size(inst.spec.memory),
                      "limits.cpu": inst.spec.vcpus, "label": inst.spec.label, **extra},
                     indent=2))


# -- images -------------------------------------------------------------------
@image_app.command("build")
def image_build(
    name: str = typer.Argument(..., help="Builder to run: minimal (VM + container) or debian."),
    force: bool = typer.Option(False, "--force", help="Rebuild an existing image."),
    sign: bool = typer.Option(True, "--sign/--no-sign", help="Sign the new image."),
    key: str = typer.Option("", "--key", help="Image key to sign with (default: this "
                                              "host's image key)."),
) -> None:
    """Build an image from Debian packages (and sign it)."""
    from popek.images import ImageStore

    with _progress(f"building image {name}") as progress:
        image = ImageStore().build(name, progress=progress, force=force)
    signed = sign_built(image.name, key) if sign else "not signed"
    print(f"Image {image.name} {image.manifest.version} built at {image.path}, {signed}.")


@image_app.command("import")
def image_import(
    file: str = typer.Argument(..., help="A rootfs tarball (.tar[.gz|.xz|.zst]) or an OCI "
                                          "image layout (directory or .tar)."),
    name: str = typer.Argument(..., help="Name of the new image."),
    force: bool = typer.Option(False, "--force", help="Replace an existing image."),
    sign: bool = typer.Option(True, "--sign/--no-sign",
                              help="Sign the imported image: you vouch for its content."),
    key: str = typer.Option("", "--key", help="Image key to sign with (default: this "
                                              "host's image key)."),
) -> None:
    """Import a root filesystem or an OCI image as a container image (and sign it)."""
    from pathlib import Path

    from popek.images import ImageStore

    with _progress(f"importing {file}") as progress:
        image = ImageStore().import_file(Path(file), name, progress=progress, force=force)
    signed = sign_built(image.name, key) if sign else "not signed"
    print(f"Image {image.name} imported at {image.path} ({', '.join(image.kinds())}), "
          f"{signed}.")


@image_app.command("list")
def image_list(fmt: str = typer.Option("table", "--format", help="table or json.")) -> None:
    """List images."""
    check_format(fmt)
    from popek.images import ImageStore
    from popek.units import format_size

    images = ImageStore().list()
    rows: list[dict[str, Any]] = [
        {"name": i.name, "version": i.manifest.version, "created": i.manifest.created,
         "kernel": i.manifest.kernel_version, "kinds": i.kinds(),
         "size": sum(f.size for f in i.manifest.files.values()),
         "signature": _signature_summary(i.path)} for i in images]
    if fmt == "json":
        print(json.dumps(rows, indent=2))
        return
    print_table(["NAME", "KINDS", "VERSION", "CREATED", "KERNEL", "SIZE", "SIGNED"],
                 [[r["name"], ",".join(r["kinds"]), r["version"], r["created"], r["kernel"],
                   format_size(r["size"]),
                   (f"key {r['signature']['signer'][:16]}, serial {r['signature']['serial']}"
                    if r["signature"] else "no")] for r in rows])


def _signature_summary(path: Any) -> dict[str, Any] | None:
    """Who signed an image, as its manifest.sig says (checked at each start, not here)."""
    try:
        st = json.loads((path / "manifest.sig").read_text())["statement"]
        return {"signer": str(st["signer"]), "serial": int(st["serial"]),
                "expires": str(st["expires"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


@image_app.command("info")
def image_info(name: str) -> None:
    """Show an image's manifest."""
    from popek.images import ImageStore

    print(ImageStore().get(name).manifest.to_json())


@image_app.command("delete")
def image_delete(name: str) -> None:
    """Delete an image (refused while instances use it)."""
    from popek.images import ImageStore

    users = _instances().image_in_use(name)
    if users:
        raise PopekError(f"image {name!r} is used by instance(s) {', '.join(users)}; "
                         "delete them first")
    ImageStore().delete(name)
    print(f"Image {name} deleted.")


def _audit(command: Any, args: list[str], code: int, error: str) -> None:
    """Append the command to the audit log unless it is read-only (see cli.auditing)."""
    from popek.cli.auditing import describe

    what = describe(command, args)
    if what is None:
        return
    try:
        from popek import paths
        from popek.core.store import SQLiteStore
        from popek.trust.audit import AuditLog
        from popek.trust.keys import TrustStore

        result = "ok" if code == 0 else (f"error: {error}" if error else f"exit {code}")
        AuditLog(TrustStore(SQLiteStore(paths.state_db()))).append(
            what[0], what[1], {"argv": args}, result[:500])
    except (OSError, PopekError) as exc:
        print(f"popek: warning: the audit log was not written: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> Any:
    """Entry point of the ``popek`` console script."""
    if os.geteuid() != 0 and "--help" not in sys.argv:
        print("popek: warning: not running as root; instances need root to drop to their "
              "own uid", file=sys.stderr)
    code, error = 0, ""
    args = list(sys.argv[1:] if argv is None else argv)
    # what app() does (pretty exceptions are off), keeping the command tree for the audit
    command = typer.main.get_command(app)
    try:
        command(args=args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
            error = str(exc.code)
    except PopekError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        code, error = exc.exit_code, f"{type(exc).__name__}: {exc}"
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        code, error = 130, "interrupted"
    _audit(command, args, code, error)
    # Every store write is committed and every file closed by now: skip the
    # interpreter's teardown (tens of milliseconds) so commands return at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
