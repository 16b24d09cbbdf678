"""The host side of networks, over netlink (pyroute2): bridges, taps, veths, FDB, addresses.

Nothing here parses the output of ``ip`` or ``bridge``.  pyroute2 is imported
on first use.  Every device popek creates is named ``pk-...`` and carries an
interface alias ``popek:<home tag>`` so that reconcile only ever removes
devices of its own ``POPEK_HOME``.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popek.errors import PopekError

PREFIX = "pk-"
NUD_NOARP = 0x40  # "static" in bridge(8) terms (NUD_PERMANENT would mean "local")
NTF_MASTER = 0x04
AF_BRIDGE = 7
AF_INET = 2
LOCAL_TABLE = 255
MAIN_TABLE = 254


class NetlinkError(PopekError):
    """A netlink request failed: says which device and what the kernel answered."""


@dataclass
class Link:
    """One network device as seen in a link dump."""

    index: int
    name: str
    kind: str
    master: int
    up: bool
    alias: str
    address: str


@dataclass(frozen=True)
class PortFlags:
    """Bridge port settings popek requires on every port."""

    isolated: bool = False
    neigh_suppress: bool = False


def _attr(msg: Any, name: str, default: Any = None) -> Any:
    value = msg.get_attr(name)
    return default if value is None else value


def _route_text(net: ipaddress.IPv4Network, gateway: str | None, dev: str, table: int) -> str:
    """Describe one host route as ``ip route`` does: ``host route 10.0.0.0/8 via 192.0.2.1``."""
    text = f"host route {net}"
    if gateway:
        text += f" via {gateway}"
    if dev:
        text += f" dev {dev}"
    if table != MAIN_TABLE:
        text += f" table {table}"
    return text


class NetlinkHost:
    """One rtnetlink socket and the operations popek needs on the root network namespace."""

    def __init__(self) -> None:
        """Create the host handle; the socket opens on first use."""
        self._ipr: Any = None

    @property
    def ipr(self) -> Any:
        """The pyroute2 ``IPRoute`` socket (opened on first use)."""
        if self._ipr is None:
            from pyroute2 import IPRoute

            self._ipr = IPRoute()
        return self._ipr

    def close(self) -> None:
        """Close the netlink socket."""
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from pyroute2.netlink.exceptions import NetlinkError as PyNetlinkError

        try:
            return fn(*args, **kwargs)
        except PyNetlinkError as exc:
            raise NetlinkError(f"{what} failed: {exc.args[-1] if exc.args else exc} "
                               f"(errno {exc.code})") from exc
        except OSError as exc:
            raise NetlinkError(f"{what} failed: {exc}") from exc

    # -- reads -----------------------------------------------------------------
    def links(self) -> dict[str, Link]:
        """Return every device of the root namespace by name (one netlink dump)."""
        out: dict[str, Link] = {}
        for msg in self._call("listing network devices", self.ipr.get_links):
            info = msg.get_attr("IFLA_LINKINFO")
            kind = (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or ""
            name = _attr(msg, "IFLA_IFNAME", "")
            out[name] = Link(index=msg["index"], name=name, kind=kind,
                             master=_attr(msg, "IFLA_MASTER", 0), up=bool(msg["flags"] & 1),
                             alias=_attr(msg, "IFLA_IFALIAS", ""),
                             address=_attr(msg, "IFLA_ADDRESS", ""))
        return out

    def ipv4_in_use(self) -> list[tuple[ipaddress.IPv4Network, str]]:
        """Return the IPv4 subnets the host uses: its addresses and routes, with their devices."""
        names = {link.index: link.name for link in self.links().values()}
        used: list[tuple[ipaddress.IPv4Network, str]] = []
        for msg in self._call("listing addresses", self.ipr.get_addr, family=AF_INET):
            addr = msg.get_attr("IFA_ADDRESS")
            if addr:
                net = ipaddress.IPv4Network(f"{addr}/{msg['prefixlen']}", strict=False)
                dev = names.get(msg["index"], str(msg["index"]))
                used.append((net, f"address {addr}/{msg['prefixlen']} on host device {dev}"))
        # every table: no ``table`` argument (pyroute2 0.9 compares ``table=0`` literally
        # and then returns nothing); a table above 255 is only in RTA_TABLE
        for msg in self._call("listing routes", self.ipr.get_routes, family=AF_INET):
            table = _attr(msg, "RTA_TABLE", msg["table"])
            if msg["dst_len"] == 0 or table == LOCAL_TABLE:
                continue
            dst = msg.get_attr("RTA_DST")
            if not dst:
                continue
            net = ipaddress.IPv4Network(f"{dst}/{msg['dst_len']}", strict=False)
            used.append((net, _route_text(net, msg.get_attr("RTA_GATEWAY"),
                                          names.get(msg.get_attr("RTA_OIF") or 0, ""), table)))
        return used

    def addresses(self, index: int) -> list[str]:
        """Return the IPv4 addresses (``a.b.c.d/n``) of one device."""
        return [f"{m.get_attr('IFA_ADDRESS')}/{m['prefixlen']}" for m in
                self._call("listing addresses", self.ipr.get_addr, family=AF_INET, index=index)]

    def brport(self, index: int) -> dict[str, int]:
        """Return the bridge port settings of device ``index`` (lower-case names)."""
        res = self._call("reading bridge port flags", self.ipr.brport, "show", index=index)
        for msg in res:
            if msg["index"] != index:
                continue
            info = msg.get_attr("IFLA_PROTINFO")
            if info is None:
                return {}
            return {k[len("IFLA_BRPORT_"):].lower(): v for k, v in info["attrs"]
                    if k.startswith("IFLA_BRPORT_") and isinstance(v, int)}
        return {}

    def fdb_static(self, index: int) -> set[str]:
        """Return the MACs with a static (``master``, NOARP) FDB entry on port ``index``."""
        out: set[str] = set()
        for msg in self._call("listing FDB entries", self.ipr.fdb, "dump", ifindex=index):
            if msg["ifindex"] == index and msg["state"] & NUD_NOARP and \
                    msg.get_attr("NDA_MASTER"):
                out.add(str(msg.get_attr("NDA_LLADDR")))
        return out

    # -- devices ---------------------------------------------------------------
    def _index(self, name: str) -> int:
        found = self._call(f"looking up {name}", self.ipr.link_lookup, ifname=name)
        if not found:
            raise NetlinkError(f"network device {name} does not exist")
        return int(found[0])

    def set_alias(self, name: str, alias: str) -> None:
        """Tag device ``name`` with ``alias`` (how reconcile knows popek's devices)."""
        self._call(f"tagging {name}", self.ipr.link, "set", index=self._index(name),
                   ifalias=alias)

    def create_bridge(self, name: str, mac: str, gateway: str, prefixlen: int,
                      alias: str) -> None:
        """Create bridge ``name`` (STP off, forward delay 0, fixed MAC), address it, bring it up."""
        self._call(f"creating bridge {name}", self.ipr.link, "add", ifname=name, kind="bridge",
                   br_stp_state=0, br_forward_delay=0, address=mac)
        self.set_alias(name, alias)
        self.ensure_bridge(name, mac, gateway, prefixlen)

    def ensure_bridge(self, name: str, mac: str, gateway: str, prefixlen: int) -> list[str]:
        """Make an existing bridge match: MAC, gateway address, up.  Return what changed."""
        changes: list[str] = []
        idx = self._index(name)
        link = self._call(f"reading {name}", self.ipr.link, "get", index=idx)[0]
        if _attr(link, "IFLA_ADDRESS", "") != mac:
            self._call(f"setting the MAC of {name}", self.ipr.link, "set", index=idx,
                       address=mac)
            changes.append("MAC")
        want = f"{gateway}/{prefixlen}"
        if want not in self.addresses(idx):
            self._call(f"adding {want} to {name}", self.ipr.addr, "add", index=idx,
                       address=gateway, prefixlen=prefixlen)
            changes.append(f"address {want}")
        if not link["flags"] & 1:
            self._call(f"bringing {name} up", self.ipr.link, "set", index=idx, state="up")
            changes.append("up")
        return changes

    def create_tap(self, name: str, uid: int, alias: str) -> None:
        """Create a persistent tap owned by ``uid`` (vnet_hdr on, single queue), up."""
        self._call(f"creating tap {name}", self.ipr.link, "add", ifname=name, kind="tuntap",
                   mode="tap", uid=uid,
                   ifr={"no_pi": 1, "vnet_hdr": 1, "multi_queue": 0, "one_queue": 0})
        self.set_alias(name, alias)

    def create_veth(self, name: str, peer: str, peer_mac: str, alias: str) -> None:
        """Create a veth pair: ``name`` on the host, ``peer`` (MAC ``peer_mac``) for the guest."""
        self._call(f"creating veth pair {name}/{peer}", self.ipr.link, "add", ifname=name,
                   kind="veth", peer={"ifname": peer, "address": peer_mac})
        self.set_alias(name, alias)
        self.set_alias(peer, alias)

    def attach(self, port: str, bridge: str, flags: PortFlags) -> list[str]:
        """Attach ``port`` to ``bridge`` with popek's port flags and bring it up.

        Learning and unicast flooding off (the FDB is static), multicast and
        broadcast flooding on (ARP, DHCP, IPv6 ND).  Returns what changed.
        """
        changes: list[str] = []
        idx = self._index(port)
        br = self._index(bridge)
        link = self._call(f"reading {port}", self.ipr.link, "get", index=idx)[0]
        if _attr(link, "IFLA_MASTER", 0) != br:
            self._call(f"attaching {port} to {bridge}", self.ipr.link, "set", index=idx,
                       master=br)
            changes.append(f"attached to {bridge}")
        want = {"learning": 0, "unicast_flood": 0, "mcast_flood": 1, "bcast_flood": 1,
                "isolated": int(flags.isolated), "neigh_suppress": int(flags.neigh_suppress)}
        have = self.brport(idx)
        diff = {k: v for k, v in want.items() if have.get(k) != v}
        if diff:
            self._call(f"setting bridge port flags of {port}", self.ipr.brport, "set",
                       index=idx, **diff)
            changes.append("port flags " + ",".join(sorted(diff)))
        if not link["flags"] & 1:
            self._call(f"bringing {port} up", self.ipr.link, "set", index=idx, state="up")
            changes.append("up")
        return changes

    def ensure_fdb(self, port: str, mac: str) -> bool:
        """Add the static FDB entry ``mac`` → ``port`` on its bridge; return whether it was new."""
        idx = self._index(port)
        if mac in self.fdb_static(idx):
            return False
        self._call(f"adding FDB entry {mac} on {port}", self.ipr.fdb, "replace", ifindex=idx,
                   lladdr=mac, flags=NTF_MASTER, state=NUD_NOARP)
        return True

    def delete(self, name: str) -> bool:
        """Delete device ``name`` (a veth takes its peer along); return whether it existed."""
        from pyroute2.netlink.exceptions import NetlinkError as PyNetlinkError

        found = self.ipr.link_lookup(ifname=name)
        if not found:
            return False
        try:
            self.ipr.link("del", index=found[0])
        except PyNetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False
            raise NetlinkError(f"deleting {name} failed: {exc}") from exc
        return True


def set_forwarding(bridge: str, on: bool) -> None:
    """Turn IPv4 forwarding from ``bridge`` on (NAT networks) or off (isolated ones)."""
    path = Path(f"/proc/sys/net/ipv4/conf/{bridge}/forwarding")
    with contextlib.suppress(FileNotFoundError):
        path.write_text("1\n" if on else "0\n")
