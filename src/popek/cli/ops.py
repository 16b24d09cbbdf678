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


def instances(*names: str) -> Instances:
    """The instance manager of this host (``POPEK_HOME``), with ``names`` reconciled.

    Reconcile is this command's one explicit step: the instances it names,
    or every instance when it names none (list, launch).
    """
    from popek.core.instances import Instances

    insts = Instances()
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
    """Print ``rows`` as a Rich table (Rich is imported only here, on use)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns, show_lines=False)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def launch(image: str, name: str, vcpus: int, memory: str, accel: str, container: bool,
           runtime: str, pids: int, mount: list[str], network: list[str], timeout: float,
           label: str, net_rate: str) -> None:
    """Create an instance from ``image`` and start it."""
    mem = size(memory, "memory size")
    engine = "container" if container else "qemu"
    limits: dict[str, int] = {"pids": pids} if container else {}
    if net_rate:
        from popek.network.shaping import parse_rate

        limits["net"] = parse_rate(net_rate)
    with progress(f"launching {name}") as step:
        inst = instances().launch(image, name, vcpus=vcpus, memory=mem, accel=accel,
                                  engine=engine, runtime=runtime, limits=limits,
                                  mounts=mount, networks=network,
                                  ready_timeout=timeout, progress=step, label=label)
    details = inst.runtime.details if inst.runtime else {}
    how = details.get("accel") or details.get("runtime") or "?"
    kind = "container" if container else "VM"
    print(f"Instance {name} is running ({kind}, {how}, {vcpus} vCPU, {memory}).")


def list_(fmt: str) -> None:
    """List instances as a table or JSON."""
    from popek.units import format_size

    insts = instances().all()
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
    print_table(["FIELD", "VALUE"], [[k, str(v)] for k, v in data.items()])
    print_table(["TIME", "EVENT"], [[h["time"], h["event"]] for h in history])


def start(name: str, timeout: float) -> None:
    """Start a stopped instance."""
    with progress(f"starting {name}") as step:
        instances(name).start(name, ready_timeout=timeout, progress=step)
    print(f"Instance {name} is running.")


def stop(name: str, force: bool, timeout: float) -> None:
    """Stop an instance: ACPI shutdown (SIGTERM) first, forced after ``timeout``."""
    with progress(f"stopping {name}"):
        how = instances(name).stop(name, force=force, timeout=timeout)
    print(f"Instance {name} stopped ({how}).")


def restart(name: str, force: bool, timeout: float) -> None:
    """Stop an instance and start it again."""
    with progress(f"restarting {name}") as step:
        instances(name).restart(name, force=force, timeout=timeout, progress=step)
    print(f"Instance {name} restarted.")


def pause(name: str) -> None:
    """Freeze a running instance."""
    instances(name).pause(name)
    print(f"Instance {name} paused.")


def resume(name: str) -> None:
    """Resume a paused instance."""
    instances(name).resume(name)
    print(f"Instance {name} resumed.")


def exec_(name: str, command: list[str], timeout: float, no_stdin: bool, no_tty: bool) -> int:
    """Run ``command`` in an instance with its stdio passed through; return its exit code."""
    insts = instances(name)
    tty = sys.stdin.isatty() and sys.stdout.isatty() and not no_tty
    code = insts.exec_stream(name, command, tty) if not no_stdin else None
    if code is not None:
        return code
    stdin = b""
    if not no_stdin and not sys.stdin.isatty():
        stdin = sys.stdin.buffer.read()
    result = insts.exec(name, command, stdin, timeout)
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr)
    sys.stderr.flush()
    return result.exit_code


def delete(name: str, force: bool) -> None:
    """Delete an instance and everything it left on the host."""
    instances(name).delete(name, force=force)
    print(f"Instance {name} deleted.")


def sandbox_run(command: list[str], profile: str, net: bool, ro: list[str] | None,
                rw: list[str] | None, memory: str | None, timeout: float | None) -> int:
    """Run ``command`` in a sandbox with its stdio passed through; return its exit code."""
    import os

    from popek.engines.sandbox import RunOptions, check_bind_path
    from popek.engines.sandbox import run as run_sandbox
    from popek.errors import InvalidInput

    if timeout is not None and timeout <= 0:
        raise InvalidInput(f"--timeout {timeout:g}: allowed: a number of seconds > 0")
    options = RunOptions(
        network=net,
        ro=tuple(check_bind_path(p, "--ro") for p in ro or []),
        rw=tuple(check_bind_path(p, "--rw") for p in rw or []),
        memory=None if memory is None else size(memory, "--memory size"), timeout=timeout,
        env={k: os.environ[k] for k in ("TERM", "LANG") if k in os.environ})
    return run_sandbox(profile, options, command)
