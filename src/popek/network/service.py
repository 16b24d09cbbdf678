"""Network operations: create, list, info, delete networks; create and delete ports; reconcile.

Every mutating operation follows the pattern of ``popek.core.instances``:
validate, write the intent (the record in state ``creating`` or
``deleting`` with the pid and start time of the popek process that owns it)
in one compare-and-swap transaction, act on the host, then write the
outcome.  :meth:`Networks.reconcile` runs whenever a :class:`Networks` is
created: it finishes or rolls back intents whose owner died, and makes the
host match the records (bridges, addresses, port devices, FDB entries,
dnsmasq, nftables), removing popek devices and dnsmasqs no record explains.

Host actions of one ``POPEK_HOME`` are serialised by a file lock
(``networks/.lock``); the store's transactions keep the records consistent.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import ipaddress
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from popek.errors import (
    AlreadyExists,
    ConflictError,
    InvalidInput,
    NotFound,
    PopekError,
    StateError,
    StoreError,
)
from popek.names import DEFAULT_PROJECT
from popek.network import ipam
from popek.network.host import Backend, HostBackend, networks_dir
from popek.network.model import (
    Network,
    Port,
    PortKind,
    host_name,
    lease_key,
    mac_key,
    network_key,
    port_key,
)
from popek.state import open_store
from popek.state.owners import Owner
from popek.state.schema import (
    GENERATION_KEY,
    INSTANCES_PREFIX,
    LEASES_PREFIX,
    NETWORKS_PREFIX,
    PORTS_PREFIX,
)
from popek.state.store import Compare, Delete, Put, StateStore

ACTIVE_INSTANCE_STATES = ("starting", "running", "paused", "stopping")
KINDS = ("tap", "veth")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _me() -> str:
    """This process as a network or port record's ``owner`` (the intent owner's format)."""
    return Owner.me().to_bytes().decode()


def _owner_alive(owner: str) -> bool:
    found = Owner.from_bytes(owner.encode())
    return found is not None and found.alive()


R = TypeVar("R")


class Networks:
    """The network service over one state store and the host."""

    def __init__(self, store: StateStore | None = None, reconcile: bool = True,
                 backend: Backend | None = None) -> None:
        """Open the store (default: ``$POPEK_HOME/state.db``) and reconcile the host with it."""
        if store is None:
            store = open_store()
        self.store: StateStore = store
        self.backend: Backend = backend or HostBackend()
        if reconcile:
            self.reconcile()

    # -- lock ------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the host lock of this POPEK_HOME's networks."""
        d = networks_dir()
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- records ---------------------------------------------------------------
    def _records(self, prefix: str, parse: Callable[[bytes], R],
                 what: str) -> builtins.list[tuple[R, int]]:
        """Every record under ``prefix`` with its mod revision; a broken one is an error."""
        out: builtins.list[tuple[R, int]] = []
        for kv in self.store.range(prefix):
            try:
                out.append((parse(kv.value), kv.mod_revision))
            except (ValueError, TypeError) as exc:
                raise StoreError(f"broken {what} record {kv.key}: {exc}") from exc
        return out

    def _all_networks(self) -> builtins.list[tuple[Network, int]]:
        return self._records(NETWORKS_PREFIX, Network.from_json, "network")

    def _all_ports(self) -> builtins.list[tuple[Port, int]]:
        return self._records(PORTS_PREFIX, Port.from_json, "port")

    def list(self) -> builtins.list[Network]:
        """Return every network, sorted by name."""
        return [n for n, _ in self._all_networks()]

    def _load(self, name: str) -> tuple[Network, int]:
        kv = self.store.get(network_key(name))
        if kv is None:
            names = [n.name for n in self.list()]
            raise NotFound(f"network {name!r} not found; existing networks: "
                           f"{', '.join(names) if names else 'none'}")
        return Network.from_json(kv.value), kv.mod_revision

    def get(self, name: str) -> Network:
        """Return network ``name``; raise :class:`NotFound` listing the existing ones."""
        return self._load(name)[0]

    # -- projects --------------------------------------------------------------
    def visible(self, project: str) -> builtins.list[Network]:
        """The networks ``project`` sees: its own, then ``default``'s (shared, read-only)."""
        nets = self.list()
        own = [n for n in nets if n.project == project]
        shared = [n for n in nets if n.project == DEFAULT_PROJECT] if project != DEFAULT_PROJECT \
            else []
        return sorted(own, key=lambda n: n.short) + sorted(shared, key=lambda n: n.short)

    def resolve(self, name: str, project: str, own: bool = False) -> Network:
        """Network ``name`` as ``project`` names it: its own, else ``default``'s (not with
        ``own``: a change touches only the project's own networks).  NotFound lists the
        ones it may name."""
        plain = isinstance(name, str) and "." not in name and "/" not in name
        if plain:
            shared = project != DEFAULT_PROJECT and not own
            for full in [host_name(project, name), *([name] if shared else [])]:
                kv = self.store.get(network_key(full))
                if kv is not None:
                    return Network.from_json(kv.value)
        seen = [n for n in self.visible(project) if not own or n.project == project]
        names = ", ".join(n.short if n.project == project else f"{n.short} (default)"
                          for n in seen)
        where = "" if project == DEFAULT_PROJECT else f" in project {project!r}"
        hint = ""
        if plain and own and project != DEFAULT_PROJECT and self.store.get(network_key(name)):
            hint = ("; the default project's networks are shared read-only: only the host "
                    "admin changes them")
        raise NotFound(f"network {name!r} not found{where}; existing networks: "
                       f"{names or 'none'}{hint}")

    def ports(self, instance: str | None = None,
              network: str | None = None) -> builtins.list[Port]:
        """Return the ports, optionally only those of ``instance`` and/or ``network``."""
        inst = ipam.validate_instance_ref(instance) if instance is not None else None
        prefix = PORTS_PREFIX + (f"{network}/" if network is not None else "")
        out: builtins.list[Any] = []
        for kv in self.store.range(prefix):
            port = Port.from_json(kv.value)
            if inst is None or port.instance == inst:
                out.append(port)
        return out

    def _save(self, key: str, value: bytes, rev: int, what: str) -> int:
        res = self.store.txn([_cmp_rev(key, rev)], [Put(key, value)])
        if not res.succeeded:
            raise ConflictError(f"{what} was changed by another operation at the same time; "
                             "look at popek network info and retry")
        return res.revision

    def _ready(self) -> tuple[builtins.list[Network], builtins.list[Port]]:
        nets = [n for n, _ in self._all_networks() if n.state == "ready"]
        names = {n.name for n in nets}
        ports = [p for p, _ in self._all_ports() if p.state == "ready" and p.network in names]
        return nets, ports

    def _apply_rules(self) -> None:
        nets, ports = self._ready()
        self.backend.apply_rules(nets, ports)

    # -- networks --------------------------------------------------------------
    def _used_subnets(self, nets: Sequence[Network]) -> builtins.list[ipam.Used]:
        used = [ipam.Used(ipaddress.IPv4Network(n.subnet), f"popek network {n.name}")
                for n in nets]
        return used + self.backend.used_subnets({n.bridge for n in nets})

    def create(self, name: str, subnet: str | None = None, nat: bool = False,
               port_isolation: bool = False, project: str = DEFAULT_PROJECT) -> Network:
        """Create network ``name`` of ``project``: a bridge holding the gateway address,
        dnsmasq, rules (its host-wide name: :func:`~popek.network.model.host_name`).

        ``subnet`` defaults to the first free /24 in 10.200-250.x.0.  Raises
        :class:`InvalidInput` (bad name or subnet), :class:`AlreadyExists`
        (name in use, subnet overlapping a network or a host address/route);
        on any failure nothing is left behind.
        """
        ipam.validate_network_name(name)
        net_in = ipam.parse_subnet(subnet) if subnet is not None else None
        full = host_name(project, name)
        with self._locked():
            gen = self.store.get(GENERATION_KEY)
            gen_rev = gen.mod_revision if gen else 0
            existing = self.list()
            if any(n.name == full for n in existing):
                where = "" if project == DEFAULT_PROJECT else f" in project {project!r}"
                raise AlreadyExists(f"network {name!r} already exists{where}; pick another "
                                    "name or delete it first")
            used = self._used_subnets(existing)
            if net_in is not None:
                ipam.check_overlap(net_in, used)
                chosen = net_in
            else:
                chosen = ipam.pick_subnet(used)
            bridges = {n.bridge for n in existing}
            bridge = next(b for b in (f"pk-{secrets.token_hex(4)}" for _ in range(100))
                          if b not in bridges)
            net = Network(name=full, subnet=str(chosen), gateway=str(ipam.gateway_of(chosen)),
                          bridge=bridge, nat=nat, port_isolation=port_isolation,
                          created=_now(), state="creating", owner=_me(), project=project)
            key = network_key(full)
            res = self.store.txn(
                [_cmp_version(key, 0), _cmp_rev(GENERATION_KEY, gen_rev)],
                [Put(key, net.to_json()), Put(GENERATION_KEY, key.encode())])
            if not res.succeeded:
                raise ConflictError("networks were changed by another operation at the same "
                                 "time; retry")
            try:
                net.dnsmasq_pid, net.dnsmasq_start = self.backend.setup_network(net)
                net.state, net.owner = "ready", ""
                self._save(key, net.to_json(), res.revision, f"network {full!r}")
                self._apply_rules()
            except BaseException:
                self._purge_network(net)
                with contextlib.suppress(PopekError):
                    self._apply_rules()
                raise
        return net

    def _purge_network(self, net: Network) -> None:
        """Remove everything of ``net`` from the host and the store (ports included)."""
        for port in self.ports(network=net.name):
            self.backend.teardown_port(port)
            self._delete_port_keys(port)
        self.backend.teardown_network(net)
        self.store.txn([], [Delete(network_key(net.name)),
                            Delete(f"{LEASES_PREFIX}{net.name}/", prefix=True),
                            Delete(f"{PORTS_PREFIX}{net.name}/", prefix=True),
                            Put(GENERATION_KEY, network_key(net.name).encode())])

    def delete(self, name: str, force: bool = False) -> None:
        """Delete network ``name``: bridge, dnsmasq, leases, files, rules and the record.

        Refused (:class:`StateError`) while ports exist, unless ``force``,
        which deletes the ports (devices and records) first.
        """
        with self._locked():
            net, rev = self._load(name)
            ports = self.ports(network=name)
            if ports and not force:
                listed = ", ".join(f"{p.host_ifname} ({p.instance})" for p in ports)
                raise StateError(f"network {name!r}", "delete", f"in use by {len(ports)} "
                                 f"port(s): {listed}",
                                 ("without ports (detach them, or use --force)",))
            net.state, net.owner = "deleting", _me()
            self._save(network_key(name), net.to_json(), rev, f"network {name!r}")
            self._purge_network(net)
            self._apply_rules()

    def info(self, name: str) -> dict[str, Any]:
        """Return the record of ``name`` with its ports, leases, dnsmasq and bridge state."""
        net = self.get(name)
        ports = self.ports(network=name)
        data: dict[str, Any] = {
            "name": net.short, "project": net.project, "subnet": net.subnet, "gateway": net.gateway,
            "bridge": net.bridge, "nat": net.nat, "port_isolation": net.port_isolation,
            "state": net.state, "created": net.created,
            "ports": [{"host_ifname": p.host_ifname, "instance": p.instance, "kind": p.kind,
                       "mac": p.mac, "ipv4": p.ipv4, "ipv6": p.ipv6, "state": p.state}
                      for p in ports],
            "leases": {kv.key.rsplit("/", 1)[-1]: kv.value.decode()
                       for kv in self.store.range(f"{LEASES_PREFIX}{name}/")},
        }
        try:
            data.update(self.backend.status(net, ports))
        except PopekError as exc:
            data["host_error"] = str(exc)
        return data

    # -- ports -----------------------------------------------------------------
    def create_port(self, network: str, instance: str, kind: PortKind | str, uid: int,
                    ipv4: str | None = None, mac: str | None = None,
                    neigh_suppress: bool = False) -> Port:
        """Create a port of ``instance`` on ``network`` and return it.

        ``kind`` ``tap`` makes a persistent tap owned by ``uid`` (for an
        unprivileged QEMU); ``veth`` makes a pair whose peer
        (``port.peer_ifname``) stays in the root namespace for the caller to
        move into the container.  The IPv4 lease is ``ipv4`` (inside the
        subnet and free) or the lowest free address; the MAC is ``mac``
        (unicast, unused) or a new one.  Raises :class:`InvalidInput`,
        :class:`AlreadyExists`, :class:`ResourceError` or :class:`NotFound`;
        on any failure nothing is left behind.
        """
        inst = ipam.validate_instance_ref(instance)
        if kind not in KINDS:
            raise InvalidInput(f"invalid port kind {kind!r}; allowed: {', '.join(KINDS)}")
        if isinstance(uid, bool) or not isinstance(uid, int) or not 0 <= uid < 2**32 - 1:
            raise InvalidInput(f"invalid uid {uid!r}: expected a whole number from 0 to "
                               f"{2**32 - 2}")
        want_mac = ipam.normalize_mac(mac) if mac is not None else None
        with self._locked():
            net, _ = self._load(network)
            if net.state != "ready":
                raise StateError(f"network {network!r}", "add a port to", net.state, ("ready",))
            subnet = ipaddress.IPv4Network(net.subnet)
            leases = [kv.key.rsplit("/", 1)[-1]
                      for kv in self.store.range(f"{LEASES_PREFIX}{network}/")]
            addr = ipam.allocate_ipv4(subnet, leases, ipv4)
            all_ports = [p for p, _ in self._all_ports()]
            macs = {p.mac for p in all_ports}
            if want_mac is not None and want_mac in macs:
                raise AlreadyExists(f"MAC address {want_mac} is already used by another port; "
                                    "pick another or omit it to get a new one")
            the_mac = want_mac or ipam.generate_mac(kind, macs)
            names = {p.host_ifname for p in all_ports}
            letter = "t" if kind == "tap" else "v"
            ifname = next(n for n in (f"pk-{letter}{secrets.token_hex(4)}" for _ in range(100))
                          if n not in names)
            port = Port(network=network, instance=inst,
                        kind="tap" if kind == "tap" else "veth", host_ifname=ifname,
                        mac=the_mac, ipv4=addr, ipv6=[ipam.link_local(the_mac)],
                        uid=uid if kind == "tap" else -1,
                        peer_ifname=ifname + "p" if kind == "veth" else "",
                        neigh_suppress=neigh_suppress, state="creating", owner=_me(),
                        created=_now())
            pkey = port_key(network, ifname)
            res = self.store.txn(
                [_cmp_version(pkey, 0), _cmp_version(lease_key(network, addr), 0),
                 _cmp_version(mac_key(the_mac), 0), _cmp_exists(network_key(network))],
                [Put(pkey, port.to_json()), Put(lease_key(network, addr), inst.encode()),
                 Put(mac_key(the_mac), pkey.encode())])
            if not res.succeeded:
                raise ConflictError("the address, MAC or port was taken by another operation "
                                 "at the same time; retry")
            try:
                self.backend.setup_port(net, port)
                port.state, port.owner = "ready", ""
                self._save(pkey, port.to_json(), res.revision, f"port {ifname}")
                self._dhcp_reload(network, restart=False)
                self._apply_rules()
            except BaseException:
                self.backend.teardown_port(port)
                self._delete_port_keys(port)
                with contextlib.suppress(PopekError):
                    self._dhcp_reload(network, restart=False)
                    self._apply_rules()
                raise
        return port

    def _dhcp_reload(self, network: str, restart: bool) -> None:
        net, rev = self._load(network)
        ports = [p for p in self.ports(network=network) if p.state == "ready"]
        pid, started = self.backend.dhcp_reload(net, ports, restart)
        if (pid, started) != (net.dnsmasq_pid, net.dnsmasq_start):
            net.dnsmasq_pid, net.dnsmasq_start = pid, started
            self._save(network_key(network), net.to_json(), rev, f"network {network!r}")

    def _delete_port_keys(self, port: Port) -> None:
        self.store.txn([], [Delete(port_key(port.network, port.host_ifname)),
                            Delete(lease_key(port.network, port.ipv4)),
                            Delete(mac_key(port.mac))])

    def delete_port(self, port: Port | str) -> None:
        """Delete a port (a :class:`Port` or its ``host_ifname``).

        Removes its device, lease, MAC reservation, DHCP entry and rules.
        """
        ifname = port.host_ifname if isinstance(port, Port) else port
        with self._locked():
            found = [(p, rev) for p, rev in self._all_ports() if p.host_ifname == ifname]
            if not found:
                known = ", ".join(p.host_ifname for p, _ in self._all_ports()) or "none"
                raise NotFound(f"port {ifname!r} not found; existing ports: {known}")
            record, rev = found[0]
            record.state, record.owner = "deleting", _me()
            self._save(port_key(record.network, ifname), record.to_json(), rev,
                       f"port {ifname}")
            self.backend.teardown_port(record)
            self._delete_port_keys(record)
            # dnsmasq never gives an address another MAC still leases: restart it
            # with this port's lease dropped, so the address can be reused at once.
            self._dhcp_reload(record.network, restart=True)
            self._apply_rules()

    def shape_port(self, port: Port, rate: int | None, guest_pid: int | None = None) -> None:
        """Limit ``port`` to ``rate`` bit/s both ways (``None`` lifts the limit)."""
        self.backend.shape_port(port, rate, guest_pid)

    def ensure_port_device(self, port: Port) -> Port:
        """Make sure the host device of ``port`` exists, attached, with its FDB entry.

        For an instance about to start: a container's veth pair dies with its
        network namespace, so it is created again here (the peer
        ``port.peer_ifname`` in the root namespace, for the engine to move).
        Returns the port record as stored.  Raises :class:`NotFound` when the
        port has no record.
        """
        with self._locked():
            kv = self.store.get(port_key(port.network, port.host_ifname))
            if kv is None:
                raise NotFound(f"port {port.host_ifname!r} of {port.instance} on network "
                               f"{port.network!r} has no record; create it with create_port")
            record = Port.from_json(kv.value)
            net = self.get(record.network)
            self.backend.ensure_port(net, record)
        return record

    # -- reconcile -------------------------------------------------------------
    def _active_instances(self) -> set[str]:
        active = set()
        for kv in self.store.range(INSTANCES_PREFIX):
            try:
                import json

                rec = json.loads(kv.value)
                if rec.get("state") in ACTIVE_INSTANCE_STATES:
                    active.add(f"{rec.get('project', 'default')}/{rec['name']}")
            except (ValueError, KeyError, TypeError):
                continue
        return active

    def reconcile(self) -> builtins.list[str]:
        """Settle records with the host; return a line per change made.

        Intents whose popek process died are finished (``deleting``) or
        rolled back (``creating``).  Then missing bridges, addresses, port
        devices, FDB entries, dnsmasqs and nftables rules are restored, and
        ``pk-*`` devices and dnsmasqs of this home that no record explains
        are removed.
        """
        changes: list[str] = []
        with self._locked():
            keep: set[str] = set()
            for net, _ in self._all_networks():
                if net.state == "ready":
                    continue
                if _owner_alive(net.owner):
                    keep.add(net.bridge)
                    continue
                self._purge_network(net)
                what = ("create rolled back" if net.state == "creating"
                        else "delete finished")
                changes.append(f"network {net.name}: interrupted {what}")
            for port, _ in self._all_ports():
                if port.state == "ready":
                    continue
                if _owner_alive(port.owner):
                    keep |= {port.host_ifname, port.peer_ifname}
                    continue
                self.backend.teardown_port(port)
                self._delete_port_keys(port)
                changes.append(f"port {port.host_ifname}: interrupted {port.state} cleaned up")
            nets, ports = self._ready()
            done = self.backend.reconcile(nets, ports, self._active_instances(), keep)
            changes += done.changes
            for name, (pid, started) in done.dnsmasq.items():
                with contextlib.suppress(PopekError):
                    net, rev = self._load(name)
                    net.dnsmasq_pid, net.dnsmasq_start = pid, started
                    self._save(network_key(name), net.to_json(), rev, f"network {name!r}")
        return changes


# -- small store helpers -----------------------------------------------------------
def _cmp_rev(key: str, rev: int) -> Compare:
    return Compare(key, "mod_revision", "==", rev)


def _cmp_version(key: str, version: int) -> Compare:
    return Compare(key, "version", "==", version)


def _cmp_exists(key: str) -> Compare:
    """The network record still exists (a port is never left on a deleted network)."""
    return Compare(key, "version", ">", 0)
