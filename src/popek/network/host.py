"""What a network is on the host: bridge, port devices, dnsmasq, nftables rules.

:class:`HostBackend` turns records into host state and back (reconcile).
The service (:mod:`popek.network.service`) owns the records and intents and
calls this class only after the intent is written.  Unit tests replace it
with a fake of the same shape (:class:`Backend`).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from popek import paths, proc
from popek.errors import PopekError
from popek.network import dnsmasq
from popek.network.ipam import Used, bridge_mac
from popek.network.model import Network, Port
from popek.network.netlink import PREFIX, NetlinkHost, PortFlags, set_forwarding


def networks_dir() -> Path:
    """Return ``$POPEK_HOME/networks`` (one directory per network)."""
    return paths.home() / "networks"


def home_tag() -> str:
    """Return the interface alias that marks devices of this ``POPEK_HOME``."""
    digest = hashlib.sha256(str(paths.home().resolve()).encode()).hexdigest()[:12]
    return f"popek:{digest}"


@dataclass
class Reconciled:
    """What :meth:`Backend.reconcile` did: lines for humans, new dnsmasq runtimes."""

    changes: list[str] = field(default_factory=list)
    dnsmasq: dict[str, tuple[int, int]] = field(default_factory=dict)


class Backend(Protocol):
    """The host operations the network service needs."""

    def used_subnets(self, own_bridges: set[str]) -> list[Used]:
        """Host addresses and routes, except those on ``own_bridges``."""
        ...

    def setup_network(self, net: Network) -> tuple[int, int]:
        """Create the bridge and start dnsmasq; return dnsmasq's pid and start time."""
        ...

    def teardown_network(self, net: Network) -> None:
        """Stop dnsmasq, delete the bridge and the network directory (idempotent)."""
        ...

    def setup_port(self, net: Network, port: Port) -> None:
        """Create the port's device, attach it to the bridge, add its static FDB entry."""
        ...

    def teardown_port(self, port: Port) -> None:
        """Delete the port's device (idempotent)."""
        ...

    def ensure_port(self, net: Network, port: Port) -> bool:
        """Create the port's device if it is missing, attach it; return whether it was created."""
        ...

    def dhcp_reload(self, net: Network, ports: Sequence[Port], restart: bool) -> tuple[int, int]:
        """Rewrite the DHCP/DNS host files; SIGHUP dnsmasq (restart when asked or dead)."""
        ...

    def apply_rules(self, networks: Sequence[Network], ports: Sequence[Port]) -> None:
        """Load the nftables rules for exactly these records (none: remove popek's tables)."""
        ...

    def reconcile(self, networks: Sequence[Network], ports: Sequence[Port],
                  active: set[str], keep: set[str]) -> Reconciled:
        """Make the host match the records; remove popek devices and dnsmasqs nobody explains."""
        ...

    def status(self, net: Network, ports: Sequence[Port]) -> dict[str, Any]:
        """Live state of a network for ``info``: bridge, dnsmasq, leases."""
        ...

    def shape_port(self, port: Port, rate: int | None, guest_pid: int | None) -> None:
        """Limit ``port`` to ``rate`` bit/s both ways (``None``: no limit).

        ``guest_pid``: a process in the network namespace that holds the
        port's other end (a container's veth), shaped there too.
        """
        ...


class HostBackend:
    """The real host: netlink (pyroute2), dnsmasq processes, nftables."""

    def __init__(self, netlink: NetlinkHost | None = None) -> None:
        """Use ``netlink`` (default: a new :class:`NetlinkHost`)."""
        self.nl = netlink or NetlinkHost()
        self.tag = home_tag()
        self.root = networks_dir()

    def netdir(self, net: Network) -> Path:
        """Return (creating it) the directory of ``net``: readable by dnsmasq's group only."""
        import grp
        import os

        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o711)
        d = self.root / net.name
        d.mkdir(exist_ok=True)
        with contextlib.suppress(KeyError):
            os.chown(d, 0, grp.getgrnam(dnsmasq.GROUP).gr_gid)
        d.chmod(0o750)
        return d

    # -- networks --------------------------------------------------------------
    def used_subnets(self, own_bridges: set[str]) -> list[Used]:
        """Return host addresses and routes as :class:`Used`, except on ``own_bridges``."""
        return [Used(net, what) for net, what in self.nl.ipv4_in_use()
                if not any(what.endswith(f" {b}") for b in own_bridges)]

    def _bridge(self, net: Network) -> list[str]:
        subnet = ipaddress.IPv4Network(net.subnet)
        links = self.nl.links()
        if net.bridge not in links:
            self.nl.create_bridge(net.bridge, bridge_mac(net.bridge), net.gateway,
                                  subnet.prefixlen, self.tag)
            changes = ["bridge created"]
        else:
            changes = self.nl.ensure_bridge(net.bridge, bridge_mac(net.bridge), net.gateway,
                                            subnet.prefixlen)
        set_forwarding(net.bridge, net.nat)
        return changes

    def setup_network(self, net: Network) -> tuple[int, int]:
        """Create the bridge (gateway address, up, STP off) and start dnsmasq."""
        self._bridge(net)
        return dnsmasq.start(net, self.netdir(net), [])

    def teardown_network(self, net: Network) -> None:
        """Stop dnsmasq, delete the bridge and the directory of ``net``."""
        d = self.root / net.name
        if net.dnsmasq_pid:
            dnsmasq.stop(net.dnsmasq_pid, net.dnsmasq_start)
        for pid, where in dnsmasq.running(self.root).items():
            if where == d:
                dnsmasq.stop(pid, proc.start_time(pid) or 0)
        self.nl.delete(net.bridge)
        shutil.rmtree(d, ignore_errors=True)

    # -- ports -----------------------------------------------------------------
    def _flags(self, net: Network, port: Port) -> PortFlags:
        return PortFlags(isolated=net.port_isolation, neigh_suppress=port.neigh_suppress)

    def setup_port(self, net: Network, port: Port) -> None:
        """Create the device of ``port``, attach it with popek's flags, add the FDB entry."""
        if port.kind == "tap":
            self.nl.create_tap(port.host_ifname, port.uid, self.tag)
        else:
            self.nl.create_veth(port.host_ifname, port.peer_ifname, port.mac, self.tag)
        self.nl.attach(port.host_ifname, net.bridge, self._flags(net, port))
        self.nl.ensure_fdb(port.host_ifname, port.mac)

    def ensure_port(self, net: Network, port: Port) -> bool:
        """Create the device of ``port`` if missing; fix its attachment and FDB entry."""
        if port.host_ifname not in self.nl.links():
            if port.peer_ifname:
                self.nl.delete(port.peer_ifname)
            self.setup_port(net, port)
            return True
        self.nl.attach(port.host_ifname, net.bridge, self._flags(net, port))
        self.nl.ensure_fdb(port.host_ifname, port.mac)
        return False

    def teardown_port(self, port: Port) -> None:
        """Delete the device of ``port`` (and the veth peer if still in this namespace)."""
        self.nl.delete(port.host_ifname)
        if port.peer_ifname:
            self.nl.delete(port.peer_ifname)

    def dhcp_reload(self, net: Network, ports: Sequence[Port], restart: bool) -> tuple[int, int]:
        """Rewrite the hosts files and SIGHUP dnsmasq; restart it when asked or dead."""
        d = self.netdir(net)
        if not restart and proc.alive(net.dnsmasq_pid, net.dnsmasq_start):
            dnsmasq.write_hosts(d, ports)
            if dnsmasq.reload(net.dnsmasq_pid, net.dnsmasq_start):
                return net.dnsmasq_pid, net.dnsmasq_start
        dnsmasq.stop(net.dnsmasq_pid, net.dnsmasq_start)
        return dnsmasq.start(net, d, ports)

    # -- rules -----------------------------------------------------------------
    def apply_rules(self, networks: Sequence[Network], ports: Sequence[Port]) -> None:
        """Load popek's nftables tables for exactly ``networks`` and ``ports``."""
        from popek.network import nft

        if networks:
            nft.apply(nft.build_ruleset(list(networks), list(ports)))
        else:
            nft.remove_all()

    def _rules_current(self, networks: Sequence[Network], ports: Sequence[Port]) -> bool:
        """Whether the rules in force have one chain per port of ``ports`` (one nft list)."""
        from popek.network import nft

        try:
            data = nft.current("bridge")
        except nft.NftTableMissing:
            return not networks
        if not networks:
            return False
        chains = {item["chain"]["name"] for item in data.get("nftables", [])
                  if "chain" in item and item["chain"]["name"].startswith(nft.PORT_CHAIN_PREFIX)}
        return chains == {nft.port_chain(p.host_ifname) for p in ports}

    # -- reconcile -------------------------------------------------------------
    def reconcile(self, networks: Sequence[Network], ports: Sequence[Port],
                  active: set[str], keep: set[str]) -> Reconciled:
        """Make the host match the records.

        ``active`` holds the instances (``project/name``) whose engine runs:
        only their missing veths are recreated (a tap is always recreated, a
        stopped VM needs it to start).  ``keep`` names devices that an
        operation in progress elsewhere owns.  Devices named ``pk-*`` tagged
        with this home (or untagged) and dnsmasqs of this home that no record
        explains are removed.
        """
        out = Reconciled()
        by_net = {n.name: n for n in networks}
        for net in networks:
            try:
                changes = self._bridge(net)
            except PopekError as exc:
                out.changes.append(f"network {net.name}: bridge {net.bridge}: {exc}")
                continue
            if changes:
                out.changes.append(f"network {net.name}: bridge {net.bridge}: "
                                   + ", ".join(changes))
        links = self.nl.links()
        for port in ports:
            pnet = by_net.get(port.network)
            if pnet is None or pnet.bridge not in links:
                continue
            net = pnet
            what = f"port {port.host_ifname} ({port.instance} on {port.network})"
            try:
                if port.host_ifname not in links:
                    if port.kind == "veth" and port.instance not in active:
                        continue  # the container is not running: its veth comes with it
                    self.setup_port(net, port)
                    out.changes.append(f"{what}: device recreated")
                    continue
                changes = self.nl.attach(port.host_ifname, net.bridge, self._flags(net, port))
                if self.nl.ensure_fdb(port.host_ifname, port.mac):
                    changes.append("static FDB entry")
            except PopekError as exc:
                out.changes.append(f"{what}: {exc}")
                continue
            if changes:
                out.changes.append(f"{what}: " + ", ".join(changes))
        explained = set(keep) | {n.bridge for n in networks}
        for port in ports:
            explained |= {port.host_ifname, port.peer_ifname}
        for name, link in self.nl.links().items():
            if name.startswith(PREFIX) and name not in explained and \
                    link.alias in ("", self.tag) and self.nl.delete(name):
                out.changes.append(f"removed stray device {name}")
        self._reconcile_dnsmasq(networks, ports, out)
        try:
            if not self._rules_current(networks, ports):
                self.apply_rules(networks, ports)
                out.changes.append("nftables rules reloaded")
        except PopekError as exc:
            out.changes.append(f"nftables rules: {exc}")
        return out

    def _reconcile_dnsmasq(self, networks: Sequence[Network], ports: Sequence[Port],
                           out: Reconciled) -> None:
        wanted = {self.root / n.name: n for n in networks}
        for pid, where in dnsmasq.running(self.root).items():
            owner = wanted.get(where)
            if owner is None or pid != owner.dnsmasq_pid:
                dnsmasq.stop(pid, proc.start_time(pid) or 0)
                out.changes.append(f"stopped stray dnsmasq {pid} ({where.name})")
        for net in networks:
            if proc.alive(net.dnsmasq_pid, net.dnsmasq_start):
                continue
            mine = [p for p in ports if p.network == net.name]
            try:
                out.dnsmasq[net.name] = dnsmasq.start(net, self.netdir(net), mine)
            except PopekError as exc:
                out.changes.append(f"network {net.name}: dnsmasq: {exc}")
                continue
            out.changes.append(f"network {net.name}: dnsmasq restarted "
                               f"(pid {out.dnsmasq[net.name][0]})")
        if self.root.is_dir():
            for d in self.root.iterdir():
                if d.is_dir() and d not in wanted:
                    shutil.rmtree(d, ignore_errors=True)
                    out.changes.append(f"removed stray network directory {d.name}")

    # -- info ------------------------------------------------------------------
    def shape_port(self, port: Port, rate: int | None, guest_pid: int | None) -> None:
        """Limit ``port`` to ``rate`` bit/s with tc (see :mod:`popek.network.shaping`)."""
        from popek.network import shaping

        guest = None
        if guest_pid is not None:
            guest = (guest_pid, shaping.guest_ifname(guest_pid, port.mac))
        shaping.apply(port.host_ifname, rate, guest)

    def status(self, net: Network, ports: Sequence[Port]) -> dict[str, Any]:
        """Return the live state of ``net``: bridge, addresses, attached ports, dnsmasq, leases."""
        links = self.nl.links()
        br = links.get(net.bridge)
        bridge: dict[str, Any] = {"name": net.bridge, "exists": br is not None}
        if br is not None:
            bridge.update(up=br.up, mac=br.address, addresses=self.nl.addresses(br.index),
                          ports=sorted(n for n, link in links.items()
                                       if link.master == br.index))
        return {
            "bridge": bridge,
            "dnsmasq": {"pid": net.dnsmasq_pid,
                        "alive": proc.alive(net.dnsmasq_pid, net.dnsmasq_start),
                        "log": str(dnsmasq.files(self.root / net.name)["log"])},
            "dhcp_leases": dnsmasq.read_leases(self.root / net.name),
            "devices": {p.host_ifname: p.host_ifname in links for p in ports},
        }
