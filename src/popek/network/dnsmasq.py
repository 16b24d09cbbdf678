"""One confined dnsmasq per network: DHCP from popek's leases only, DNS for its instances.

dnsmasq runs in its own daemon mode (it forks, writes ``dnsmasq.pid`` and
drops to ``nobody:nogroup``), so it outlives the CLI.  It reads no system
configuration (``--conf-file=/dev/null``, ``--no-hosts``, ``--no-resolv``
unless the network has NAT), listens only on the bridge's gateway address,
and hands out only the addresses listed in its ``dhcp-hosts`` file
(``dhcp-range=NET,static``).  Adding a port rewrites that file and sends
SIGHUP (no restart); removing one restarts dnsmasq with the port's lease
dropped, since dnsmasq never gives an address that another MAC still leases.
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import os
import signal
import subprocess
from collections.abc import Iterable
from pathlib import Path

from popek import proc
from popek.errors import EngineError
from popek.network.model import Network, Port

USER = "nobody"
GROUP = "nogroup"
LEASE_TIME = "1h"


def files(netdir: Path) -> dict[str, Path]:
    """Return the files dnsmasq uses in the network directory ``netdir``."""
    return {"hostsfile": netdir / "dhcp-hosts", "addn_hosts": netdir / "hosts",
            "leases": netdir / "leases", "pid": netdir / "dnsmasq.pid",
            "log": netdir / "dnsmasq.log"}


def binary() -> str:
    """Return the path of dnsmasq; raise :class:`EngineError` when it is not installed."""
    found = proc.tool("dnsmasq") or next(
        (p for p in ("/usr/sbin/dnsmasq", "/sbin/dnsmasq") if os.access(p, os.X_OK)), None)
    if not found:
        raise EngineError("dnsmasq is not installed; install the Debian package dnsmasq-base")
    return found


def argv(net: Network, netdir: Path) -> list[str]:
    """Return the dnsmasq command line for ``net`` (files under ``netdir``)."""
    f = files(netdir)
    subnet = ipaddress.IPv4Network(net.subnet)
    args = [
        binary(),
        "--conf-file=/dev/null",
        "--strict-order",
        "--bind-interfaces",
        f"--interface={net.bridge}",
        "--except-interface=lo",
        f"--listen-address={net.gateway}",
        f"--dhcp-range={subnet.network_address},static,{subnet.netmask},{LEASE_TIME}",
        f"--dhcp-hostsfile={f['hostsfile']}",
        f"--dhcp-leasefile={f['leases']}",
        "--dhcp-authoritative",
        f"--pid-file={f['pid']}",
        f"--user={USER}",
        f"--group={GROUP}",
        "--no-hosts",
        f"--addn-hosts={f['addn_hosts']}",
        "--expand-hosts",
        f"--domain={net.name}.popek",
        f"--local=/{net.name}.popek/",
        "--domain-needed",
        "--bogus-priv",
        f"--log-facility={f['log']}",
        "--log-dhcp",
    ]
    if not net.nat:
        args.append("--no-resolv")  # answers its own names only: forwards nothing
    return args


def _write(path: Path, text: str) -> None:
    """Write ``text`` atomically, readable by dnsmasq's group only."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    with contextlib.suppress(KeyError):
        os.chown(tmp, 0, grp.getgrnam(GROUP).gr_gid)
    tmp.chmod(0o640)
    tmp.replace(path)


def write_hosts(netdir: Path, ports: Iterable[Port]) -> None:
    """Write the DHCP static hosts (MAC → IP) and DNS names (IP → instance name)."""
    f = files(netdir)
    ordered = sorted(ports, key=lambda p: ipaddress.IPv4Address(p.ipv4))
    _write(f["hostsfile"], "".join(f"{p.mac},{p.ipv4}\n" for p in ordered))
    _write(f["addn_hosts"], "".join(f"{p.ipv4} {p.instance.split('/')[-1]}\n"
                                    for p in ordered))


def prune_leases(netdir: Path, ports: Iterable[Port]) -> None:
    """Drop leases from the lease file that no port (same MAC and IP) explains."""
    path = files(netdir)["leases"]
    if not path.exists():
        return
    keep = {(p.mac, p.ipv4) for p in ports}
    lines = [line for line in path.read_text().splitlines()
             if len(line.split()) >= 3 and (line.split()[1].lower(), line.split()[2]) in keep]
    text = "".join(f"{line}\n" for line in lines)
    if text != path.read_text():
        path.write_text(text)


def read_leases(netdir: Path) -> list[dict[str, str]]:
    """Return the leases dnsmasq handed out: expiry, MAC, IP, hostname."""
    path = files(netdir)["leases"]
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 4:
                out.append({"expires": parts[0], "mac": parts[1], "ipv4": parts[2],
                            "hostname": parts[3]})
    return out


def start(net: Network, netdir: Path, ports: Iterable[Port]) -> tuple[int, int]:
    """Start dnsmasq for ``net`` detached; return its pid and start time.

    Raises :class:`EngineError` with dnsmasq's own message when it fails.
    """
    port_list = list(ports)
    f = files(netdir)
    write_hosts(netdir, port_list)
    prune_leases(netdir, port_list)
    f["pid"].unlink(missing_ok=True)
    res = subprocess.run(argv(net, netdir), capture_output=True, text=True, timeout=30,
                         check=False, stdin=subprocess.DEVNULL, close_fds=True)
    if res.returncode != 0:
        raise EngineError(f"dnsmasq for network {net.name} failed to start "
                          f"(exit {res.returncode}): {(res.stderr or res.stdout).strip()}")
    try:
        pid = int(f["pid"].read_text().strip())
    except (OSError, ValueError) as exc:
        raise EngineError(f"dnsmasq for network {net.name} started but wrote no pid file "
                          f"{f['pid']}: {exc}") from exc
    started = proc.start_time(pid)
    if started is None:
        raise EngineError(f"dnsmasq for network {net.name} exited right after it started; "
                          f"see {f['log']}")
    return pid, started


def stop(pid: int, started: int) -> None:
    """Stop the dnsmasq ``pid`` (if it is still the one that started at ``started``)."""
    if not proc.alive(pid, started):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not proc.wait_until(lambda: not proc.alive(pid, started), 3.0):
        proc.kill(pid, started)


def reload(pid: int, started: int) -> bool:
    """Make dnsmasq reread its hosts files (SIGHUP); return whether it was alive."""
    if not proc.alive(pid, started):
        return False
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return False
    return True


def running(home_networks: Path) -> dict[int, Path]:
    """Return every dnsmasq of this POPEK_HOME: pid → its network directory.

    Found by their ``--pid-file`` under ``home_networks``; dnsmasqs of other
    homes or of the system are never listed.
    """
    marker = f"--pid-file={home_networks}/".encode()
    out: dict[int, Path] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if (d / "comm").read_text().strip() != "dnsmasq":
                continue
            for arg in (d / "cmdline").read_bytes().split(b"\0"):
                if arg.startswith(marker):
                    out[int(d.name)] = Path(arg[len(b"--pid-file="):].decode()).parent
        except OSError:
            continue
    return out
