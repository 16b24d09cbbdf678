"""``popek network``: create, list, inspect and delete virtual networks.

Registered by :mod:`popek.cli.main` as ``app.add_typer(network_app, name="network")``
(``from popek.cli.network import app as network_app``).  The network service
(and through it pyroute2) is imported inside the commands.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any

import typer

from popek.cli import remotes, scope
from popek.cli.common import columns_option, format_option, project_option, remote_argument
from popek.cli.output import Column, details, listing

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Create, list, inspect and delete virtual networks.")


def _api(remote: str) -> Any:
    from popek.cli import remoteops

    return remoteops.client(remote)


def _path(name: str) -> str:
    from urllib.parse import quote

    return f"/1.0/networks/{quote(name, safe='')}"


@app.command()
def create(
    name: str = typer.Argument(..., metavar="[REMOTE:]NAME",
                               help="Network name: a-z, 0-9 and '-', 1-63 characters "
                                    "(lab:NAME: on remote lab)."),
    subnet: str | None = typer.Option(None, "--subnet",
                                      help="Private IPv4 CIDR, /8 to /29 (default: a free /24 "
                                           "in 10.200-250.x.0)."),
    nat: bool = typer.Option(False, "--nat", help="Let instances reach outside through NAT."),
    port_isolation: bool = typer.Option(False, "--port-isolation",
                                        help="Instances on it cannot reach each other."),
    project: str | None = project_option(),
) -> None:
    """Create a network of the project: a bridge, DHCP/DNS, and port security rules."""
    where = remotes.locate(name, "network")
    if where is not None:
        rec = _api(where[0]).call("POST", "/1.0/networks", params={"project": project},
                                  json={"name": where[1], "subnet": subnet, "nat": nat,
                                        "port_isolation": port_isolation})
        print(f"Network {rec['name']} created ({rec['subnet']}, gateway {rec['gateway']}, "
              f"bridge {rec['bridge']}).")
        return
    scope.use(project)
    from popek.cli.ops import core
    from popek.core.requests import NetworkCreate

    net = core().handle(NetworkCreate(name, subnet=subnet, nat=nat,
                                      port_isolation=port_isolation))
    print(f"Network {net.name} created ({net.subnet}, gateway {net.gateway}, "
          f"bridge {net.bridge}).")


COLUMNS = tuple(Column(title, itemgetter(key)) for title, key in (
    ("NAME", "name"), ("PROJECT", "project"), ("SUBNET", "subnet"), ("GATEWAY", "gateway"),
    ("BRIDGE", "bridge"),
    ("NAT", "nat"), ("ISOLATION", "port_isolation"), ("PORTS", "ports"), ("STATE", "state")))


@app.command("list")
def list_(remote: str | None = remote_argument(), fmt: str = format_option(),
          columns: str = columns_option(COLUMNS),
          project: str | None = project_option()) -> None:
    """List the project's networks, then the default project's (shared with every project)."""
    on = remotes.list_target(remote, "popek network list")
    if on is not None:
        rows = _api(on).call("GET", "/1.0/networks", params={"project": project})
    else:
        scope.use(project)
        from popek.cli.ops import core
        from popek.core.views import network_summaries

        rows = network_summaries(core())
    listing(rows, COLUMNS, fmt, select=columns, command="popek network list")


@app.command()
def info(name: str = typer.Argument(..., metavar="[REMOTE:]NAME",
                                   help="The network (lab:NAME: on remote lab)."),
         fmt: str = format_option(), project: str | None = project_option()) -> None:
    """Show a network (the project's own, else the default project's): its record, bridge,
    dnsmasq, ports and leases."""
    where = remotes.locate(name, "network")
    if where is not None:
        show(_api(where[0]).call("GET", _path(where[1]), params={"project": project}), fmt)
        return
    scope.use(project)
    from popek.cli.ops import core
    from popek.core.views import network_detail

    show(network_detail(core(), name), fmt)


def show(full: dict[str, Any], fmt: str) -> None:
    """Print ``popek network info``'s record (of this host or a remote) in ``fmt``."""
    data = dict(full)
    ports = data.pop("ports")
    data.pop("leases")
    dhcp = data.pop("dhcp_leases", [])
    data.pop("devices", None)
    bridge = data.pop("bridge")
    dns = data.pop("dnsmasq", {})
    if isinstance(bridge, dict):
        data["bridge"] = (f"{bridge['name']} ({'up' if bridge.get('up') else 'down'}, "
                          f"{', '.join(bridge.get('addresses', [])) or 'no address'})"
                          if bridge.get("exists") else f"{bridge['name']} (missing)")
    if dns:
        data["dnsmasq"] = f"pid {dns['pid']} ({'running' if dns['alive'] else 'not running'})"
    details(full, list(data.items()), fmt, [
        (("PORT", "INSTANCE", "KIND", "MAC", "IPV4", "STATE"),
         [[p["host_ifname"], p["instance"], p["kind"], p["mac"], p["ipv4"], p["state"]]
          for p in ports]),
        (("LEASE", "MAC", "HOSTNAME"), [[d["ipv4"], d["mac"], d["hostname"]] for d in dhcp])])


@app.command()
def delete(
    name: str = typer.Argument(..., metavar="[REMOTE:]NAME",
                               help="The network (lab:NAME: on remote lab)."),
    force: bool = typer.Option(False, "--force", help="Delete its ports too (detaches them)."),
    project: str | None = project_option(),
) -> None:
    """Delete a network of the project and everything it left on the host."""
    where = remotes.locate(name, "network")
    if where is not None:
        _api(where[0]).call("DELETE", _path(where[1]),
                            params={"project": project, "force": force or None})
        print(f"Network {where[1]} deleted.")
        return
    scope.use(project)
    from popek.cli.ops import core
    from popek.core.requests import NetworkDelete

    core().handle(NetworkDelete(name, force=force))
    print(f"Network {name} deleted.")


@app.command()
def attach(
    name: str = typer.Argument(..., help="The network."),
    instance: str = typer.Argument(..., help="The instance to attach (running or stopped)."),
    ip: str = typer.Option(None, "--ip", help="A static IPv4 address on the network."),
    project: str | None = project_option(),
) -> None:
    """Give an instance a port on a network; a running instance gets it at once."""
    from popek.cli import remotes

    where = remotes.locate(instance)
    if where is not None:
        from popek.cli import remoteops

        made = remoteops.attach(where[0], where[1], name, ip, project)
        print(f"Instance {instance} attached to {name}: {made['ipv4']} ({made['mac']}).")
        return
    scope.use(project)
    from popek.cli.ops import core
    from popek.core.requests import Attach

    port = core().handle(Attach(network=name, instance=instance, ipv4=ip))
    print(f"Instance {instance} attached to {name}: {port.ipv4} ({port.mac}).")


@app.command()
def detach(
    name: str = typer.Argument(..., help="The network."),
    instance: str = typer.Argument(..., help="The instance to detach."),
    project: str | None = project_option(),
) -> None:
    """Remove an instance's port on a network (unplugged first if it runs)."""
    from popek.cli import remotes

    where = remotes.locate(instance)
    if where is not None:
        from popek.cli import remoteops

        remoteops.detach(where[0], where[1], name, project)
        print(f"Instance {instance} detached from {name}.")
        return
    scope.use(project)
    from popek.cli.ops import core
    from popek.core.requests import Detach

    core().handle(Detach(network=name, instance=instance))
    print(f"Instance {instance} detached from {name}.")
