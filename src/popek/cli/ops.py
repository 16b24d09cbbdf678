"""What the instance commands and ``sandbox run`` do, apart from how their arguments are parsed.

``popek.cli.main`` declares these commands with Typer (help, completion,
usage errors); ``popek.cli.fastpath`` runs the same functions for a command
line it can parse without Typer, which costs a launch over 100 ms of imports
here.  So this module imports neither Typer nor Click, and each function takes
exactly the parameters its Typer command declares (a unit test holds them
equal).  Arguments arrive checked by one of the two parsers: ``fmt`` is
``table`` or ``json``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from popek.core.instances import Instances
    from popek.core.service import Core

#: the cores this command made: the CLI audits on its own only what reached none of them
CORES: list[Core] = []


def core() -> Core:
    """popek on this host (``POPEK_HOME``): every mutating command runs through it."""
    from popek.core.service import Core

    made = Core()
    CORES.append(made)
    return made


def audited() -> bool:
    """Whether the core audited a request of this command."""
    return any(c.audited for c in CORES)


def instances(*names: str) -> Instances:
    """The instances of this host, for a command that only reads, with ``names`` reconciled.

    Reconcile is the command's one explicit step: the instances it names,
    or every instance when it names none (list).
    """
    insts = core().instances
    insts.reconcile(names or None)
    return insts


@contextmanager
def progress(initial: str) -> Iterator[Callable[[str], None]]:
    """Show progress of a long step: a spinner on a terminal, plain lines otherwise."""
    if sys.stderr.isatty():
        from rich.console import Console

        with Console(stderr=True).status(initial) as status:
            yield lambda msg: status.update(msg)
    else:
        def plain(msg: str) -> None:
            print(f"popek: {msg}", file=sys.stderr, flush=True)

        yield plain


def size(text: str, what: str) -> int:
    """Parse a size such as ``512MiB`` (InvalidInput names ``what`` when it is not one)."""
    from popek.units import parse_size

    return parse_size(text, what)


def print_table(columns: list[str], rows: list[list[str]]) -> None:
    """Print ``rows``: boxed on a terminal, plain columns for scripts (see cli.table)."""
    from popek.cli.table import print_table as _print

    _print(columns, rows)


def launch(image: str, name: str, vcpus: int, memory: str, accel: str, container: bool,
           runtime: str, pids: int, mount: list[str], network: list[str], timeout: float,
           label: str, net_rate: str, disk: str) -> None:
    """Create an instance from ``image`` and start it."""
    mem = size(memory, "memory size")
    engine = "container" if container else "qemu"
    limits: dict[str, int] = {"pids": pids} if container else {}
    if disk:
        limits["disk"] = size(disk, "limits.disk")
    if net_rate:
        from popek.network.shaping import parse_rate

        limits["net"] = parse_rate(net_rate)
    from popek.core.requests import Launch

    with progress(f"launching {name}") as step:
        inst = core().handle(Launch(
            image=image, name=name, vcpus=vcpus, memory=mem, accel=accel, engine=engine,
            runtime=runtime, limits=limits, mounts=tuple(mount), networks=tuple(network),
            label=label, ready_timeout=timeout, progress=step))
    details = inst.runtime.details if inst.runtime else {}
    how = details.get("accel") or details.get("runtime") or "?"
    kind = "container" if container else "VM"
    print(f"Instance {name} is running ({kind}, {how}, {vcpus} vCPU, {memory}).")


def list_(fmt: str) -> None:
    """List instances as a table or JSON."""
    from popek.units import format_size

    insts = core().instances.settled()
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


def info(name: str, fmt: str) -> None:
    """Show the details of an instance."""
    data = instances(name).info(name)
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
        if "disk_limit" in usage:
            data["disk used"] = _of(usage.get("disk_used"), usage["disk_limit"], mib)
    limits = data.pop("limits", {})
    for key, value in limits.items():
        data[f"limits.{key}"] = format_size(value) if key == "disk" else value
    print_table(["FIELD", "VALUE"], [[k, str(v)] for k, v in data.items()])
    print_table(["TIME", "EVENT"], [[h["time"], h["event"]] for h in history])


def start(name: str, timeout: float) -> None:
    """Start a stopped instance."""
    from popek.core.requests import Start

    with progress(f"starting {name}") as step:
        core().handle(Start(name, ready_timeout=timeout, progress=step))
    print(f"Instance {name} is running.")


def stop(name: str, force: bool, timeout: float) -> None:
    """Stop an instance: ACPI shutdown (SIGTERM) first, forced after ``timeout``."""
    from popek.core.requests import Stop

    with progress(f"stopping {name}"):
        how = core().handle(Stop(name, force=force, timeout=timeout))
    print(f"Instance {name} stopped ({how}).")


def restart(name: str, force: bool, timeout: float) -> None:
    """Stop an instance and start it again."""
    from popek.core.requests import Restart

    with progress(f"restarting {name}") as step:
        core().handle(Restart(name, force=force, timeout=timeout, progress=step))
    print(f"Instance {name} restarted.")


def pause(name: str) -> None:
    """Freeze a running instance."""
    from popek.core.requests import Pause

    core().handle(Pause(name))
    print(f"Instance {name} paused.")


def resume(name: str) -> None:
    """Resume a paused instance."""
    from popek.core.requests import Resume

    core().handle(Resume(name))
    print(f"Instance {name} resumed.")


def exec_(name: str, command: list[str], timeout: float, no_stdin: bool, no_tty: bool) -> int:
    """Run ``command`` in an instance with its stdio passed through; return its exit code."""
    from popek.core.requests import Exec

    tty = sys.stdin.isatty() and sys.stdout.isatty() and not no_tty

    def read_stdin() -> bytes:
        return b"" if no_stdin or sys.stdin.isatty() else sys.stdin.buffer.read()

    result = core().handle(Exec(name, argv=tuple(command), timeout=timeout,
                                stream=not no_stdin, tty=tty, stdin=read_stdin))
    if isinstance(result, int):
        return result
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr)
    sys.stderr.flush()
    return result.exit_code


def delete(name: str, force: bool) -> None:
    """Delete an instance and everything it left on the host."""
    from popek.core.requests import Delete

    core().handle(Delete(name, force=force))
    print(f"Instance {name} deleted.")


def sandbox_run(command: list[str], profile: str, net: bool, ro: list[str] | None,
                rw: list[str] | None, memory: str | None, timeout: float | None) -> int:
    """Run ``command`` in a sandbox with its stdio passed through; return its exit code."""
    from popek.core.requests import SandboxRun

    return core().handle(SandboxRun(
        command=tuple(command), profile=profile, network=net, ro=tuple(ro or ()),
        rw=tuple(rw or ()), memory=None if memory is None else size(memory, "--memory size"),
        timeout=timeout))
