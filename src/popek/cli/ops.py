"""What the instance commands and ``sandbox run`` do, apart from how their arguments are parsed.

``popek.cli.main`` declares these commands with Typer (help, completion,
usage errors); ``popek.cli.fastpath`` runs the same functions for a command
line it can parse without Typer, which costs a launch over 100 ms of imports
here.  So this module imports neither Typer nor Click, and each function takes
exactly the parameters its Typer command declares (a unit test holds them
equal).  Arguments arrive checked by one of the two parsers: ``fmt`` is one
of :data:`popek.cli.output.FORMATS`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from popek.cli import remotes, scope
from popek.cli.output import Column, details, listing
from popek.names import DEFAULT_PROJECT

if TYPE_CHECKING:
    from popek.core.instances import Instances
    from popek.core.service import Core

#: the cores this command made: the CLI audits on its own only what reached none of them
CORES: list[Core] = []
#: the remotes this command went to (see cli.remoteops): each audits what it is sent
REMOTES: list[str] = []


def core(check: bool = True) -> Core:
    """popek on this host (``POPEK_HOME``), in the command's project (see cli.scope):
    every mutating command runs through it.  With ``check``, NotFound when that
    project does not exist."""
    from popek.core.service import Core

    project = scope.current()
    made = Core(project=project)
    CORES.append(made)
    if check and project != DEFAULT_PROJECT:
        from popek.core.projects import Projects

        Projects(made.store).require(project)
    return made


def audited() -> bool:
    """Whether the core audited a request of this command (a remote's core: there)."""
    return bool(REMOTES) or any(c.audited for c in CORES)


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


def launch(image: str, name: str, vcpus: int | None, memory: str | None, accel: str,
           container: bool, runtime: str, pids: int | None, mount: list[str],
           network: list[str], timeout: float, label: str | None, net_rate: str,
           disk: list[str], config: list[str], profile: list[str],
           project: str | None = None) -> None:
    """Create an instance from ``image`` and start it.

    The shorthand options not given are ``None``: the core then takes the value from
    the profiles (``profile``) or its defaults, and ``config`` (``-c KEY=VALUE``) wins
    over both (see :mod:`popek.core.profiles`).
    """
    where = remotes.locate(name)
    if where is not None:
        from popek.cli import remoteops

        params = {"image": image, "vcpus": vcpus, "memory": memory, "accel": accel,
                  "container": container, "runtime": runtime, "pids": pids, "mount": mount,
                  "network": network, "timeout": timeout, "label": label,
                  "net_rate": net_rate, "disk": disk, "config": config, "profile": profile}
        remoteops.launch(where[0], where[1], params, project)
        return
    scope.use(project)
    from popek.core.config import parse_pairs

    values = parse_pairs(config)
    mem = None if memory is None else size(memory, "memory size")
    engine = "container" if container else "qemu"
    limits: dict[str, int] = {} if pids is None else {"pids": pids}
    volumes, sizes = split_disks(disk)
    if sizes:
        limits["disk"] = size(sizes[0], "limits.disk")
    if net_rate:
        from popek.network.shaping import parse_rate

        limits["net"] = parse_rate(net_rate)
    from popek.core.requests import Launch
    from popek.units import format_size

    with progress(f"launching {name}") as step:
        inst = core().handle(Launch(
            image=image, name=name, vcpus=vcpus, memory=mem, accel=accel, engine=engine,
            runtime=runtime, limits=limits, mounts=tuple(mount), networks=tuple(network),
            label=label, ready_timeout=timeout, progress=step, profiles=tuple(profile),
            config=values, volumes=tuple(volumes)))
    started = inst.runtime.details if inst.runtime else {}
    how = started.get("accel") or started.get("runtime") or "?"
    kind = "container" if container else "VM"
    print(f"Instance {name} is running ({kind}, {how}, {inst.spec.vcpus} vCPU, "
          f"{format_size(inst.spec.memory)}).")


def split_disks(disks: list[str]) -> tuple[list[str], list[str]]:
    """``--disk`` values: the volumes (``POOL/VOLUME``, with a slash) and the sizes (a
    container's writable layer: one at most)."""
    from popek.errors import InvalidInput

    volumes = [d for d in disks if "/" in d]
    sizes = [d for d in disks if "/" not in d]
    if len(sizes) > 1:
        raise InvalidInput(f"--disk gives one size at most (the writable layer), not "
                           f"{', '.join(sizes)}; a volume is POOL/VOLUME")
    return volumes, sizes


def _ipv4(record: dict[str, Any]) -> str:
    return ",".join(p["ipv4"] for p in record["ports"] if p["ipv4"])


def _ipv6(record: dict[str, Any]) -> str:
    return ",".join(a for p in record["ports"] for a in p["ipv6"])


def _memory(record: dict[str, Any]) -> str:
    from popek.units import format_size

    return format_size(record["memory"])


#: the columns of ``popek list`` (the letters are incus's where it has the column)
INSTANCE_COLUMNS = (
    Column("NAME", itemgetter("name"), "n"), Column("STATE", itemgetter("state"), "s"),
    Column("ENGINE", itemgetter("engine"), "t"), Column("IMAGE", itemgetter("image"), "i"),
    Column("IPV4", _ipv4, "4"), Column("IPV6", _ipv6, "6", default=False),
    Column("VCPUS", itemgetter("vcpus"), "v"), Column("MEMORY", _memory, "m"),
    Column("LABEL", itemgetter("label"), "l", default=False),
    Column("PROJECT", itemgetter("project"), "e", default=False),
    Column("PID", itemgetter("pid"), "p", default=False),
    Column("CREATED", itemgetter("created"), "c", default=False),
    Column("REASON", itemgetter("reason"), "r", width=60),
)


def list_(remote: str | None, fmt: str, columns: str, project: str | None = None,
          all_projects: bool = False) -> None:
    """List the instances of the project (of every one with ``all_projects``) in ``fmt``,
    of this host or of ``remote`` (``lab:``); ``columns`` chooses the columns (see cli.output)."""
    on = remotes.list_target(remote)
    if on is not None:
        from popek.cli import remoteops

        remoteops.list_(on, fmt, columns, project, all_projects)
        return
    from popek.core.records import MINE

    scope.use(project)
    show_list(core().instances.summaries(None if all_projects else MINE), fmt, columns,
              all_projects)


def show_list(summaries: list[dict[str, Any]], fmt: str, columns: str,
              all_projects: bool) -> None:
    """Print ``popek list``'s records (of this host or a remote)."""
    if all_projects and not columns:  # the project column too
        columns = ",".join(c.name.lower() for c in INSTANCE_COLUMNS
                           if c.default or c.title == "PROJECT")
    listing(summaries, INSTANCE_COLUMNS, fmt, select=columns)


def info(name: str, fmt: str, project: str | None = None) -> None:
    """Show the details of an instance."""
    where = remotes.locate(name)
    if where is not None:
        from popek.cli import remoteops

        remoteops.info(where[0], where[1], fmt, project)
        return
    scope.use(project)
    show_info(instances(name).info(name), fmt)


def show_info(data: dict[str, Any], fmt: str) -> None:
    """Print ``popek info``'s record (of this host or a remote) in ``fmt``."""
    if fmt != "table" and fmt != "csv":
        details(data, [], fmt)
        return
    from popek.units import format_size

    shown = dict(data)
    history = shown.pop("history")
    for p in shown.pop("ports", []):
        for key in ("ipv4", "mac", "host_device"):
            shown[f"network.{p['network']}.{key}"] = p[key]
    shown["memory"] = format_size(shown["memory"])
    shown["volumes"] = ", ".join(shown.get("volumes", [])) or "-"
    trust = shown.pop("image_trust", None)
    if trust:
        shown["image_trust"] = trust["note"]
    usage = shown.pop("usage", None)
    if usage:
        def _of(used: Any, limit: Any, fmt: Callable[[Any], str] = str) -> str:
            return f"{fmt(used) if used is not None else '?'}/" + (
                fmt(limit) if limit is not None else "unlimited")

        mib = lambda n: f"{n / (1 << 20):.1f}MiB"  # noqa: E731
        shown["usage.memory"] = _of(usage["memory"], usage["memory_limit"], mib)
        shown["usage.processes"] = _of(usage["pids"], usage["pids_limit"])
        shown["usage.cpu_time"] = f"{usage['cpu_seconds'] or 0:.2f}s"
        if "disk_limit" in usage:
            shown["usage.disk"] = _of(usage.get("disk_used"), usage["disk_limit"], mib)
    limits = shown.pop("limits", {})
    for key, value in limits.items():
        shown[f"limits.{key}"] = format_size(value) if key == "disk" else value
    details(data, list(shown.items()), fmt,
            [(("TIME", "EVENT"), [[h["time"], h["event"]] for h in history])])


def start(name: str, timeout: float, project: str | None = None) -> None:
    """Start a stopped instance."""
    where = remotes.locate(name)
    if where is not None:
        from popek.cli import remoteops

        remoteops.change(where[0], where[1], "start", project, timeout)
        print(f"Instance {where[1]} is running.")
        return
    scope.use(project)
    from popek.core.requests import Start

    with progress(f"starting {name}") as step:
        core().handle(Start(name, ready_timeout=timeout, progress=step))
    print(f"Instance {name} is running.")


def stop(name: str, force: bool, timeout: float, project: str | None = None) -> None:
    """Stop an instance: ACPI shutdown (SIGTERM) first, forced after ``timeout``."""
    from popek.core.instances import ALREADY_STOPPED

    where = remotes.locate(name)
    if where is not None:
        from popek.cli import remoteops

        name = where[1]
        how = (remoteops.change(where[0], name, "stop", project, timeout, force)
               or {}).get("stopped")
    else:
        scope.use(project)
        from popek.core.requests import Stop

        with progress(f"stopping {name}"):
            how = core().handle(Stop(name, force=force, timeout=timeout))
    if how == ALREADY_STOPPED:  # a success, as podman's: the note goes to stderr
        print(f"popek: instance {name} is already stopped", file=sys.stderr)
        return
    print(f"Instance {name} stopped ({how}).")


def restart(name: str, force: bool, timeout: float, project: str | None = None) -> None:
    """Stop an instance and start it again."""
    where = remotes.locate(name)
    if where is not None:
        from popek.cli import remoteops

        remoteops.change(where[0], where[1], "restart", project, timeout, force)
        print(f"Instance {where[1]} restarted.")
        return
    scope.use(project)
    from popek.core.requests import Restart

    with progress(f"restarting {name}") as step:
        core().handle(Restart(name, force=force, timeout=timeout, progress=step))
    print(f"Instance {name} restarted.")


def pause(name: str, project: str | None = None) -> None:
    """Freeze a running instance."""
    where = remotes.locate(name)
    if where is not None:
        from popek.cli import remoteops

        remoteops.change(where[0], where[1], "pause", project)
        print(f"Instance {where[1]} paused.")
        return
    scope.use(project)
    from popek.core.requests import Pause

    core().handle(Pause(name))
    print(f"Instance {name} paused.")


def resume(name: str, project: str | None = None) -> None:
    """Resume a paused instance."""
    where = remotes.locate(name)
    if where is not None:
        from popek.cli import remoteops

        remoteops.change(where[0], where[1], "resume", project)
        print(f"Instance {where[1]} resumed.")
        return
    scope.use(project)
    from popek.core.requests import Resume

    core().handle(Resume(name))
    print(f"Instance {name} resumed.")


def exec_(name: str, command: list[str], timeout: float, no_stdin: bool, no_tty: bool,
          project: str | None = None) -> int:
    """Run ``command`` in an instance with its stdio passed through; return its exit code.

    On a remote (``lab:web``) with a terminal: on the remote's exec websocket
    (:mod:`popek.cli.remoteterm`); without one: its input is read first, its
    output comes back whole (text).
    """
    where = remotes.locate(name)
    if where is not None:
        if sys.stdin.isatty() and sys.stdout.isatty() and not no_tty and not no_stdin:
            from popek.cli import remoteterm

            return remoteterm.exec_tty(where[0], where[1], command, True, project)
        from popek.cli import remoteops

        return remoteops.exec_(where[0], where[1], command, timeout, no_stdin, project)
    scope.use(project)
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


def delete(name: str, force: bool, project: str | None = None) -> None:
    """Delete an instance and everything it left on the host."""
    where = remotes.locate(name)
    if where is not None:
        from popek.cli import remoteops

        remoteops.delete(where[0], where[1], force, project)
        print(f"Instance {where[1]} deleted.")
        return
    scope.use(project)
    from popek.core.requests import Delete

    core().handle(Delete(name, force=force))
    print(f"Instance {name} deleted.")


def sandbox_run(command: list[str], profile: str, net: bool, ro: list[str] | None,
                rw: list[str] | None, memory: str | None, timeout: float | None) -> int:
    """Run ``command`` in a sandbox with its stdio passed through; return its exit code.

    A first word ``REMOTE:`` (``lab:``; ``local:`` for this host), else the default
    remote of ``popek remote switch``, runs it on that remote (:mod:`popek.cli.remoteops`).
    """
    explicit = bool(command) and command[0].endswith(":")
    on = remotes.list_target(command[0] if explicit else None, "popek sandbox run")
    if explicit:
        command = command[1:]
        if not command:
            from popek.errors import InvalidInput

            raise InvalidInput("popek sandbox run: no command after the remote: "
                               "popek sandbox run REMOTE: -- COMMAND [ARG...]")
    if on is not None:
        from popek.cli import remoteops

        return remoteops.sandbox_run(on, command, profile, net, ro or [], rw or [], memory,
                                     timeout)
    from popek.core.requests import SandboxRun

    return core().handle(SandboxRun(
        command=tuple(command), profile=profile, network=net, ro=tuple(ro or ()),
        rw=tuple(rw or ()), memory=None if memory is None else size(memory, "--memory size"),
        timeout=timeout))
