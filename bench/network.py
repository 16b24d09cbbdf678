"""Network benchmark: two popek containers on a network with port security, against a plain bridge.

Checks the claims "traffic between two containers on one popek network with port
security on reaches at least 95 % of the throughput of the same pair on a plain
Linux bridge without rules" and "the port rules for 500 ports are applied in under
2 s".  Each round runs the host's iperf3 (TCP, ``-t 5 -J``) and busybox ping
between the two popek containers (inside their network namespaces, through the
veth + bridge + nftables path popek built) and between two plain namespaces on a
plain bridge, interleaved, in alternating order.  The rule timing reuses
``bench/netrules.py`` (10, 100, 500, 1000 ports).  Writes
``bench/results/network-<UTC>.json``, ``network-latest.{json,png}``.  See
bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from common import CACHE, POPEK, RESULTS, BenchError, _median, _mkdir_public, _summary

IMAGE = "minimal"
NETWORK = "benchnet"
NAMES = ("bench-a", "bench-b")  # client, server
SIDES = ("popek", "baseline")
#: diagnostic side: popek's containers, bridge and veths with popek's tables deleted
NORULES = "popek_norules"
TARGET_RATIO = 0.95
IPERF_PORT = 5201
#: the network namespace that plays "the host" for popek (bridge, nft tables, dnsmasq)
NS_POPEK = "pkbench-popek"
#: the baseline: a bridge in its own namespace and two plain "guest" namespaces
NS_HOST, NS_A, NS_B = "pkbench-host", "pkbench-a", "pkbench-b"
BRIDGE = "pkbench-br"
NETNS_DIR = Path("/run/netns")
DESCRIPTIONS = {
    "popek": f"two containers `popek launch {IMAGE} NAME --container --network {NETWORK}`: "
             "veth pairs on popek's bridge, port security (bridge popek + inet popek tables)",
    "baseline": f"two plain network namespaces, veth pairs on a plain bridge {BRIDGE} "
                "(STP off, learning on) in a namespace without any nftables rule",
    NORULES: "the same two popek containers with popek's tables (bridge popek, inet popek) "
             "deleted for the round, then reloaded by popek's reconcile (`popek network "
             "list`): splits popek's cost into rules and bridge/port set-up",
}


@dataclass
class Sample:
    """One side measured once: an iperf3 TCP run and a busybox ping run."""

    side: str
    round: int
    gbps: float  # end.sum_received.bits_per_second / 1e9
    sent_gbps: float
    retransmits: int
    tcp_mean_rtt_us: float  # end.streams[0].sender.mean_rtt (smoothed RTT under load)
    cpu_host_pct: float  # iperf3 client process, host_total
    cpu_remote_pct: float  # iperf3 server process, remote_total
    ping_avg_ms: float
    ping_median_ms: float
    ping_loss: int
    ping_ms: list[float] = field(default_factory=list)
    rules_in_place: bool | None = None  # popek side: both ports in the port_chains map


@dataclass
class Side:
    """How to reach one side: a namespace prefix per end, and the addresses."""

    client: list[str]
    server: list[str]
    client_ip: str
    server_ip: str


def _run(argv: list[str], what: str, timeout: float = 120.0,
         env: dict[str, str] | None = None) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                         stdin=subprocess.DEVNULL, env=env)
    if res.returncode != 0:
        raise BenchError(f"{what} exited {res.returncode}: "
                         f"{(res.stderr or res.stdout).strip()[-500:]}")
    return res.stdout


def _ns(name: str) -> list[str]:
    """Run in network namespace ``name`` only (no new mount namespace, unlike ip netns exec)."""
    return ["nsenter", f"--net={NETNS_DIR / name}"]


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else "?"


# -- environment -------------------------------------------------------------------------
class Env:
    """A private POPEK_HOME, the namespaces, and everything started in them."""

    def __init__(self) -> None:
        self.home = _mkdir_public("popek-bench-net-")
        self.env = {**os.environ, "POPEK_HOME": str(self.home), "POPEK_CACHE": str(CACHE)}
        for k in ("PYTHONPROFILEIMPORTTIME", "TERM", "LANG"):
            self.env.pop(k, None)
        self.netns: list[str] = []
        self.instances: set[str] = set()
        self.network = False
        self.procs: list[subprocess.Popen[bytes]] = []
        self.rules_netns: str | None = None

    def popek(self, *args: str, timeout: float = 300.0) -> str:
        """Run the popek CLI inside :data:`NS_POPEK`; raise :class:`BenchError` on failure."""
        return _run([*_ns(NS_POPEK), POPEK, *args], f"popek {' '.join(args)}", timeout,
                    self.env)

    def add_netns(self, name: str) -> None:
        """``ip netns add`` with loopback up; refuse a name that exists already."""
        if (NETNS_DIR / name).exists():
            raise BenchError(f"network namespace {name} exists (another run, or a left-over: "
                             f"check and `ip netns del {name}`)")
        _run(["ip", "netns", "add", name], f"ip netns add {name}")
        self.netns.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"], f"lo up in {name}")

    def cleanup(self) -> None:
        """Stop the servers, delete containers, network, namespaces and the home."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)
        for name in sorted(self.instances):
            with contextlib.suppress(BenchError, subprocess.SubprocessError, OSError):
                self.popek("delete", "--force", name, timeout=60)
        if self.network:
            with contextlib.suppress(BenchError, subprocess.SubprocessError, OSError):
                self.popek("network", "delete", "--force", NETWORK, timeout=60)
        if self.rules_netns is not None:
            self.netns.append(self.rules_netns)
        for name in reversed(self.netns):  # deleting a namespace takes its devices along
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        self._stop_strays()
        shutil.rmtree(self.home, ignore_errors=True)

    def _stop_strays(self) -> None:
        """A dnsmasq of this home left behind (network delete failed): stop it by its pid."""
        for pidfile in self.home.glob("networks/*/dnsmasq.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text().strip())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if str(self.home).encode() in cmdline:
                    os.kill(pid, signal.SIGTERM)


@contextlib.contextmanager
def _env() -> Iterator[Env]:
    env = Env()
    try:
        yield env
    finally:
        env.cleanup()


# -- setting up both sides ---------------------------------------------------------------
def setup_popek(env: Env) -> tuple[Side, dict[str, Any]]:
    """Image, network and the two containers, all from popek's CLI inside NS_POPEK."""
    env.add_netns(NS_POPEK)
    if not (env.home / "images" / IMAGE / "manifest.json").exists():
        print(f"building image {IMAGE} (cache {CACHE}) ...", flush=True)
        env.popek("image", "build", IMAGE, timeout=900)
    env.network = True
    env.popek("network", "create", NETWORK)
    net: dict[str, Any] = json.loads(env.popek("network", "info", NETWORK, "--format", "json"))
    info: dict[str, Any] = {"network": {k: net.get(k) for k in
                                        ("subnet", "gateway", "nat", "port_isolation")},
                            "bridge": net.get("bridge", {}).get("name")}
    pids, ips = [], []
    for name in NAMES:
        env.instances.add(name)
        env.popek("launch", IMAGE, name, "--container", "--network", NETWORK, timeout=300)
        data: dict[str, Any] = json.loads(env.popek("info", name, "--format", "json"))
        if not data.get("pid") or not data.get("ports"):
            raise BenchError(f"popek info {name}: no pid or no port: {data}")
        port = data["ports"][0]
        pids.append(int(data["pid"]))
        ips.append(str(port["ipv4"]))
        info[name] = {"pid": data["pid"], "ipv4": port["ipv4"], "mac": port["mac"],
                      "host_device": port["host_device"], "runtime": data.get("runtime")}
    side = Side(client=["nsenter", f"--target={pids[0]}", "--net"],
                server=["nsenter", f"--target={pids[1]}", "--net"],
                client_ip=ips[0], server_ip=ips[1])
    return side, info


def setup_baseline(env: Env, popek_info: dict[str, Any]) -> tuple[Side, dict[str, Any]]:
    """The same pair without popek: same addresses and MACs, plain bridge, no rules.

    The bridge lives in a namespace of its own (NS_HOST), like popek's bridge lives
    in NS_POPEK, so no nftables table (popek's or anyone's) sees these frames.
    """
    for name in (NS_HOST, NS_A, NS_B):
        env.add_netns(name)
    gw = popek_info["network"]["gateway"]
    prefix = popek_info["network"]["subnet"].split("/")[1]
    h = ["ip", "-n", NS_HOST]
    _run([*h, "link", "add", BRIDGE, "type", "bridge", "stp_state", "0", "forward_delay", "0"],
         "bridge add")
    _run([*h, "addr", "add", f"{gw}/{prefix}", "dev", BRIDGE], "bridge addr")
    _run([*h, "link", "set", BRIDGE, "up"], "bridge up")
    for ns, name, dev in ((NS_A, NAMES[0], "pkb-a"), (NS_B, NAMES[1], "pkb-b")):
        peer = popek_info[name]
        _run([*h, "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", ns],
             f"veth {dev}")
        _run([*h, "link", "set", dev, "master", BRIDGE, "up"], f"{dev} on bridge")
        g = ["ip", "-n", ns]
        _run([*g, "link", "set", "eth0", "address", peer["mac"], "up"], f"eth0 in {ns}")
        _run([*g, "addr", "add", f"{peer['ipv4']}/{prefix}", "dev", "eth0"], f"addr in {ns}")
        _run([*g, "route", "add", "default", "via", gw], f"route in {ns}")
    side = Side(client=_ns(NS_A), server=_ns(NS_B), client_ip=popek_info[NAMES[0]]["ipv4"],
                server_ip=popek_info[NAMES[1]]["ipv4"])
    return side, {"namespaces": [NS_HOST, NS_A, NS_B], "bridge": BRIDGE}


def _link(prefix: list[str], dev: str) -> dict[str, Any]:
    """What matters for speed about a guest's eth0: MTU, queues, offloads, qdisc."""
    out = json.loads(_run([*prefix, "ip", "-j", "-d", "link", "show", dev], f"ip link {dev}"))
    link = out[0] if out else {}
    return {k: link.get(k) for k in ("mtu", "qdisc", "num_tx_queues", "num_rx_queues",
                                     "gso_max_size", "gro_max_size", "tso_max_size")}


def _nft_summary(ns: str) -> dict[str, Any]:
    """Tables in a namespace and, for popek's, how many port chains the bridge table has."""
    out = _run([*_ns(ns), "nft", "-j", "list", "ruleset"], f"nft list ruleset in {ns}")
    items = json.loads(out).get("nftables", [])
    tables = [f"{i['table']['family']} {i['table']['name']}" for i in items if "table" in i]
    chains = [i["chain"] for i in items if "chain" in i]
    rules = sum(1 for i in items if "rule" in i)
    port_chains = [c["name"] for c in chains
                   if c.get("family") == "bridge" and c["name"].startswith("port-")]
    return {"tables": tables, "rules": rules, "port_chains": port_chains}


def _sysctl(ns: str, key: str) -> str:
    try:
        return _run([*_ns(ns), "sysctl", "-n", key], f"sysctl {key}").strip()
    except BenchError:
        return "absent"


def popek_tables(ns: str) -> list[tuple[str, str]]:
    """popek's tables in ``ns``: ``popek`` or ``popek-<hash of POPEK_HOME>``, bridge and inet."""
    out = _run([*_ns(ns), "nft", "-j", "list", "tables"], f"nft list tables in {ns}")
    return [(i["table"]["family"], i["table"]["name"])
            for i in json.loads(out).get("nftables", []) if "table" in i
            and re.fullmatch(r"popek(-[0-9a-f]+)?", i["table"]["name"])]


def rules_in_place(info: dict[str, Any]) -> bool:
    """Whether both containers' host veths are in popek's verdict map ``port_chains``."""
    bridge = [name for fam, name in popek_tables(NS_POPEK) if fam == "bridge"]
    if len(bridge) != 1:
        return False
    out = _run([*_ns(NS_POPEK), "nft", "-j", "list", "map", "bridge", bridge[0], "port_chains"],
               "nft list map port_chains")
    text = json.dumps(json.loads(out))
    return all(f'"{info[n]["host_device"]}"' in text for n in NAMES)


# -- measuring ---------------------------------------------------------------------------
def start_server(env: Env, side: Side) -> None:
    """A persistent iperf3 server in the server's namespace; wait until it listens."""
    proc = subprocess.Popen([*side.server, "iperf3", "-s", "-B", side.server_ip, "-p",
                             str(IPERF_PORT)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env.procs.append(proc)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"iperf3 server exited {proc.returncode}")
        out = subprocess.run([*side.server, "ss", "-Hltn", f"sport = :{IPERF_PORT}"],
                             capture_output=True, text=True, check=False).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise BenchError("iperf3 server did not listen within 10 s")


def iperf(side: Side, seconds: int) -> dict[str, Any]:
    """One TCP run client -> server; iperf3's JSON."""
    argv = [*side.client, "iperf3", "-c", side.server_ip, "-B", side.client_ip, "-p",
            str(IPERF_PORT), "-t", str(seconds), "-J"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    try:
        data: dict[str, Any] = json.loads(out.stdout)
    except json.JSONDecodeError as exc:
        raise BenchError(f"iperf3 client: no JSON (exit {out.returncode}): "
                         f"{out.stderr[-300:]}") from exc
    if out.returncode != 0 or "error" in data:
        raise BenchError(f"iperf3 client exited {out.returncode}: {data.get('error')}")
    return data


_PING_TIME = re.compile(r"time=([0-9.]+) ms")
_PING_LOSS = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")


def ping(side: Side, count: int, interval: float) -> tuple[list[float], int]:
    """The host's busybox ping in the client's namespace: per-packet RTTs (ms), lost count."""
    argv = [*side.client, "busybox", "ping", "-c", str(count), "-i", str(interval),
            side.server_ip]
    out = _run(argv, "busybox ping", timeout=count * interval + 30)
    rtts = [float(x) for x in _PING_TIME.findall(out)]
    m = _PING_LOSS.search(out)
    lost = int(m.group(1)) - int(m.group(2)) if m else count - len(rtts)
    if not rtts:
        raise BenchError(f"busybox ping: no reply: {out[-300:]}")
    return rtts, lost


def measure(name: str, side: Side, rnd: int, args: argparse.Namespace) -> Sample:
    """iperf3 then ping on one side."""
    data = iperf(side, args.seconds)
    end = data["end"]
    sender = end["streams"][0]["sender"]
    cpu = end.get("cpu_utilization_percent", {})
    rtts, lost = ping(side, args.ping_count, args.ping_interval)
    return Sample(
        side=name, round=rnd,
        gbps=round(end["sum_received"]["bits_per_second"] / 1e9, 3),
        sent_gbps=round(end["sum_sent"]["bits_per_second"] / 1e9, 3),
        retransmits=int(end["sum_sent"].get("retransmits", 0)),
        tcp_mean_rtt_us=float(sender.get("mean_rtt", 0)),
        cpu_host_pct=round(float(cpu.get("host_total", 0.0)), 1),
        cpu_remote_pct=round(float(cpu.get("remote_total", 0.0)), 1),
        ping_avg_ms=round(statistics.fmean(rtts), 4),
        ping_median_ms=round(statistics.median(rtts), 4),
        ping_loss=lost, ping_ms=rtts)


def measure_without_tables(env: Env, side: Side, rnd: int, args: argparse.Namespace) -> Sample:
    """Delete popek's two tables in NS_POPEK, measure, let popek reload them (reconcile)."""
    nft = [*_ns(NS_POPEK), "nft"]
    try:
        for family, name in popek_tables(NS_POPEK):
            _run([*nft, "delete", "table", family, name], f"nft delete table {family} {name}")
        left = _nft_summary(NS_POPEK)["tables"]
        if left:
            raise BenchError(f"tables left in {NS_POPEK}: {left}")
        return measure(NORULES, side, rnd, args)
    finally:
        env.popek("network", "list")  # Networks() reconciles: reloads the missing rules


# -- rules timing ------------------------------------------------------------------------
def rules_timing(env: Env, args: argparse.Namespace) -> dict[str, Any]:
    """bench/netrules.py's measurement: run it here, or read a results file of it."""
    if args.rules_json is not None:
        doc: dict[str, Any] = json.loads(Path(args.rules_json).read_text())
        doc["source"] = str(args.rules_json)
        return doc
    import netrules

    sizes = [int(s) for s in args.sizes.split(",")]
    ns = f"pktest-bench-{secrets.token_hex(3)}"
    _run(["ip", "netns", "add", ns], f"ip netns add {ns}")
    env.rules_netns = ns
    print(f"rule timing (bench/netrules.py, {args.rules_runs} runs per size):", flush=True)
    results = netrules.run(sizes, args.rules_runs, ns)
    _run(["ip", "netns", "del", ns], f"ip netns del {ns}")
    env.rules_netns = None
    met = None
    if str(netrules.TARGET_PORTS) in results:
        met = results[str(netrules.TARGET_PORTS)]["total_ms"]["median"] < netrules.TARGET_MS
    return {"source": "netrules.run in this process", "runs": args.rules_runs,
            "target": {"ports": netrules.TARGET_PORTS, "total_ms": netrules.TARGET_MS,
                       "met": met},
            "growth": netrules.growth(results), "results": results}


# -- analysis ------------------------------------------------------------------------------
def _by(samples: Sequence[Sample], side: str, key: str) -> dict[int, float]:
    return {s.round: float(getattr(s, key)) for s in samples if s.side == side}


def analyse(samples: list[Sample], rules: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The report as one JSON-able dict."""
    p, b = _by(samples, "popek", "gbps"), _by(samples, "baseline", "gbps")
    rounds = sorted(set(p) & set(b))
    per_round = [round(p[r] / b[r], 4) for r in rounds if b[r] > 0]
    mp, mb = _median(list(p.values())), _median(list(b.values()))
    ratio_medians = round(mp / mb, 4) if mp is not None and mb else None
    median_of_ratios = round(statistics.median(per_round), 4) if per_round else None
    met = (ratio_medians is not None and median_of_ratios is not None
           and ratio_medians >= TARGET_RATIO and median_of_ratios >= TARGET_RATIO)

    def side_summary(side: str) -> dict[str, Any]:
        ss = [s for s in samples if s.side == side]
        pings = [x for s in ss for x in s.ping_ms]
        return {
            "description": DESCRIPTIONS[side],
            "throughput_gbps": _summary([s.gbps for s in ss]),
            "retransmits": _summary([float(s.retransmits) for s in ss]),
            "tcp_mean_rtt_under_load_us": _summary([s.tcp_mean_rtt_us for s in ss]),
            "ping_avg_ms_per_round": {k: (round(v, 4) if isinstance(v, float) else v)
                                      for k, v in _summary([s.ping_avg_ms for s in ss]).items()},
            "ping_all_packets_ms": {
                "n": len(pings),
                "median": round(statistics.median(pings), 4) if pings else None,
                "p90": round(statistics.quantiles(pings, n=10)[-1], 4) if len(pings) > 1
                else None,
                "lost": sum(s.ping_loss for s in ss)},
            "cpu_client_pct": _summary([s.cpu_host_pct for s in ss]),
            "cpu_server_pct": _summary([s.cpu_remote_pct for s in ss]),
        }

    present = [s for s in (*SIDES, NORULES) if any(x.side == s for x in samples)]
    sides = {s: side_summary(s) for s in present}
    split: dict[str, Any] = {}
    if NORULES in present:
        n = _by(samples, NORULES, "gbps")
        mn = _median(list(n.values()))
        split = {
            "norules_over_baseline_ratio_of_medians":
                round(mn / mb, 4) if mn is not None and mb else None,
            "popek_over_norules_ratio_of_medians":
                round(mp / mn, 4) if mp is not None and mn else None,
            "popek_over_norules_median_of_round_ratios": round(statistics.median(
                [p[r] / n[r] for r in rounds if r in n and n[r] > 0]), 4) if n else None,
            "ping_median_ms": sides[NORULES]["ping_all_packets_ms"]["median"]}
    ping_p = sides["popek"]["ping_all_packets_ms"]["median"]
    ping_b = sides["baseline"]["ping_all_packets_ms"]["median"]
    rules_500 = rules.get("results", {}).get(str(rules.get("target", {}).get("ports", 500)), {})
    return {
        "benchmark": "network",
        "claim": f"throughput popek/baseline >= {TARGET_RATIO}; port rules for 500 ports "
                 "applied in under 2 s",
        "time_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **meta,
        "sides": sides,
        "throughput": {
            "ratio_of_medians": ratio_medians, "median_of_round_ratios": median_of_ratios,
            "round_ratios": per_round,
            "rounds_popek_at_least_target": sum(1 for x in per_round if x >= TARGET_RATIO),
            "target_ratio": TARGET_RATIO, "target_met": met},
        "latency": {
            "ping_median_ms": {"popek": ping_p, "baseline": ping_b},
            "ping_added_us": (round((ping_p - ping_b) * 1000, 1)
                              if ping_p is not None and ping_b is not None else None),
            "tcp_mean_rtt_under_load_us_median": {
                s: sides[s]["tcp_mean_rtt_under_load_us"]["median"] for s in present}},
        "diagnostic_rules_vs_setup": split,
        "rules": {
            "ports_500_total_ms": rules_500.get("total_ms", {}).get("median"),
            "ports_500_rules": rules_500.get("rules"),
            "target_ms": rules.get("target", {}).get("total_ms"),
            "target_met": rules.get("target", {}).get("met"),
            "total_ms_by_ports": {k: v["total_ms"]["median"]
                                  for k, v in rules.get("results", {}).items()},
            "growth": rules.get("growth"), "source": rules.get("source"),
            "full": rules.get("results")},
        "samples": [asdict(s) for s in samples],
    }


# -- output --------------------------------------------------------------------------------
def plot(rep: dict[str, Any], path: Path) -> None:
    """Throughput and ping per side, popek/baseline per round, rule time against ports."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax1, ax2, ax3, ax4 = axes.flat
    samples = rep["samples"]

    def box(ax: Any, key: str, ylabel: str, title: str, per_packet: bool = False) -> None:
        data = [[x for s in samples if s["side"] == side
                 for x in (s[key] if per_packet else [s[key]])] for side in rep["sides"]]
        ax.boxplot(data, tick_labels=list(rep["sides"]), widths=0.5)
        for i, ys in enumerate(data, start=1):
            ax.scatter([i + 0.05 * ((j % 7) - 3) for j in range(len(ys))], ys, s=10,
                       alpha=0.6, zorder=3)
        ax.set_ylabel(ylabel)
        ax.set_title(title)

    box(ax1, "gbps", "Gbit/s received", f"iperf3 TCP, {rep['args']['seconds']} s, "
        f"{rep['rounds']} rounds")
    ratios = rep["throughput"]["round_ratios"]
    ax2.plot(range(1, len(ratios) + 1), ratios, "o-",
             label=f"median {rep['throughput']['median_of_round_ratios']}")
    ax2.axhline(TARGET_RATIO, color="red", linestyle="--", label=f"target {TARGET_RATIO}")
    ax2.axhline(1.0, color="grey", linewidth=0.8)
    ax2.set_xlabel("round")
    ax2.set_ylabel("popek / baseline")
    ax2.set_title("throughput ratio per round")
    ax2.legend(fontsize=8)
    box(ax3, "ping_ms", "ms", "busybox ping RTT, every packet (rare outliers off-scale)",
        per_packet=True)
    pings = sorted(x for s in samples for x in s["ping_ms"])
    if len(pings) > 10:  # one multi-ms outlier would flatten every box
        ax3.set_ylim(0, 1.3 * pings[int(0.99 * (len(pings) - 1))])
    rules = rep["rules"]["full"] or {}
    xs = [r["ports"] for r in rules.values()]
    for key, label in (("total_ms", "build + apply"), ("apply_ms", "apply (nft)"),
                       ("build_ms", "build (Python)")):
        ax4.plot(xs, [r[key]["median"] for r in rules.values()], marker="o", label=label)
    if rep["rules"]["target_ms"]:
        ax4.axhline(rep["rules"]["target_ms"], color="red", linestyle="--",
                    label="target: 500 ports < 2 s")
    ax4.set_xlabel("ports")
    ax4.set_ylabel("ms (median)")
    ax4.set_title("port rules: build and load time")
    ax4.grid(alpha=0.3)
    ax4.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def print_summary(rep: dict[str, Any]) -> None:
    """A short human table on stdout."""
    lines = [f"network benchmark: {rep['rounds']} rounds, iperf3 -t {rep['args']['seconds']}, "
             f"nproc {rep['host']['nproc']}, kernel {rep['host']['kernel']}",
             f"{'':10}{'Gbit/s med':>11}{'min':>8}{'max':>8}{'retr med':>10}"
             f"{'tcp rtt us':>11}{'ping ms med':>12}{'ping p90':>10}"]
    for side, v in rep["sides"].items():
        t = v["throughput_gbps"]
        lines.append(f"{side:10}{_fmt(t['median']):>11}{_fmt(t['min']):>8}{_fmt(t['max']):>8}"
                     f"{_fmt(v['retransmits']['median']):>10}"
                     f"{_fmt(v['tcp_mean_rtt_under_load_us']['median']):>11}"
                     f"{_fmt(v['ping_all_packets_ms']['median']):>12}"
                     f"{_fmt(v['ping_all_packets_ms']['p90']):>10}")
    th = rep["throughput"]
    lines.append(f"throughput popek/baseline: ratio of medians {_fmt(th['ratio_of_medians'])}, "
                 f"median of round ratios {_fmt(th['median_of_round_ratios'])} "
                 f"({th['rounds_popek_at_least_target']}/{len(th['round_ratios'])} rounds >= "
                 f"{TARGET_RATIO}): {'MET' if th['target_met'] else 'NOT MET'}")
    lines.append(f"ping added by popek: {_fmt(rep['latency']['ping_added_us'])} us (median "
                 "per packet)")
    sp = rep["diagnostic_rules_vs_setup"]
    if sp:
        lines.append(f"diagnostic: popek without its tables / baseline "
                     f"{_fmt(sp['norules_over_baseline_ratio_of_medians'])}, popek / popek "
                     f"without tables {_fmt(sp['popek_over_norules_ratio_of_medians'])} "
                     f"(median of rounds {_fmt(sp['popek_over_norules_median_of_round_ratios'])})")
    r = rep["rules"]
    lines.append(f"port rules, 500 ports: {_fmt(r['ports_500_total_ms'])} ms "
                 f"({r['ports_500_rules']} rules), target < {_fmt(r['target_ms'])} ms: "
                 f"{'MET' if r['target_met'] else 'NOT MET'}")
    g = r["growth"] or {}
    fit = g.get("linear_fit", {})
    lines.append(f"growth: {r['total_ms_by_ports']} ms; fit {fit.get('ms_per_port')} ms/port "
                 f"+ {fit.get('fixed_ms')} ms; per port {g.get('ms_per_port')}")
    lines.append(f"popek rules in place in every popek round: "
                 f"{rep['checks']['rules_in_place_every_popek_round']}")
    print("\n".join(lines))


def write(rep: dict[str, Any], out: Path, stamp: str) -> None:
    """JSON with a timestamp, the -latest JSON and the -latest PNG."""
    text = json.dumps(rep, indent=2) + "\n"
    (out / f"network-{stamp}.json").write_text(text)
    (out / "network-latest.json").write_text(text)
    plot(rep, out / "network-latest.png")


# -- main ----------------------------------------------------------------------------------
def host_info() -> dict[str, Any]:
    """Versions and load, for reading the figures later."""
    return {"nproc": os.cpu_count(), "kernel": platform.release(),
            "iperf3": _first_line(["iperf3", "--version"]),
            "busybox": _first_line(["busybox"]), "nft": _first_line(["nft", "-v"]),
            "loadavg_end": list(os.getloadavg())}


def _on_term(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Set up both sides, run the interleaved rounds and the rule timing; return the report."""
    loadavg_start = list(os.getloadavg())
    samples: list[Sample] = []
    orders: list[list[str]] = []
    with _env() as env:
        popek_side, popek_info = setup_popek(env)
        base_side, base_info = setup_baseline(env, popek_info)
        sides = {"popek": popek_side, "baseline": base_side}
        names = [*SIDES, NORULES] if args.diagnose else list(SIDES)
        checks: dict[str, Any] = {
            "nft_popek_namespace": _nft_summary(NS_POPEK),
            "nft_baseline_namespace": _nft_summary(NS_HOST),
            "bridge_nf_call_iptables": {"popek": _sysctl(NS_POPEK,
                                                         "net.bridge.bridge-nf-call-iptables"),
                                        "baseline": _sysctl(NS_HOST,
                                                            "net.bridge.bridge-nf-call-iptables")},
            "guest_eth0": {"popek": _link(popek_side.client, "eth0"),
                           "baseline": _link(base_side.client, "eth0")},
        }
        if checks["nft_baseline_namespace"]["rules"]:
            raise BenchError(f"the baseline namespace has nftables rules: {checks}")
        sides[NORULES] = popek_side
        for sd in (popek_side, base_side):
            start_server(env, sd)
        print("warm-up round (not recorded) ...", flush=True)
        for name in SIDES:
            measure(name, sides[name], 0, args)
        in_place = []
        for rnd in range(1, args.runs + 1):
            k = (rnd - 1) % len(names)  # rotate: no side always follows the same one
            order = names[k:] + names[:k]
            orders.append(order)
            for name in order:
                if name == NORULES:
                    sample = measure_without_tables(env, sides[name], rnd, args)
                    if not rules_in_place(popek_info):
                        raise BenchError("popek's reconcile did not reload the rules")
                else:
                    sample = measure(name, sides[name], rnd, args)
                if name == "popek":
                    sample.rules_in_place = rules_in_place(popek_info)
                    in_place.append(sample.rules_in_place)
                samples.append(sample)
            got = {x.side: x for x in samples if x.round == rnd}
            line = " | ".join(f"{n} {got[n].gbps:6.2f} Gbit/s ping {got[n].ping_median_ms:.3f} ms"
                              for n in names)
            print(f"round {rnd:2}: {line} | popek/baseline "
                  f"{got['popek'].gbps / got['baseline'].gbps:.3f}", flush=True)
        checks["rules_in_place_every_popek_round"] = all(in_place)
        checks["popek_port_chains_after"] = _nft_summary(NS_POPEK)["port_chains"]
        rules = rules_timing(env, args)
    meta = {
        "rounds": args.runs, "orders": orders, "image": IMAGE, "checks": checks,
        "args": {"seconds": args.seconds, "ping_count": args.ping_count,
                 "ping_interval": args.ping_interval},
        "setup": {"popek": popek_info, "baseline": base_info,
                  "popek_host_namespace": NS_POPEK},
        "argv": {
            "server": ["<ns>", "iperf3", "-s", "-B", "<server ip>", "-p", str(IPERF_PORT)],
            "client": ["<ns>", "iperf3", "-c", "<server ip>", "-B", "<client ip>", "-p",
                       str(IPERF_PORT), "-t", str(args.seconds), "-J"],
            "ping": ["<ns>", "busybox", "ping", "-c", str(args.ping_count), "-i",
                     str(args.ping_interval), "<server ip>"],
            "ns_popek": "nsenter --target=<container init pid> --net",
            "ns_baseline": f"nsenter --net={NETNS_DIR}/{NS_A} (or {NS_B})"},
        "host": {**host_info(), "loadavg_start": loadavg_start},
    }
    if not checks["rules_in_place_every_popek_round"]:
        print("warning: popek's port rules were missing in some popek round", file=sys.stderr)
    return analyse(samples, rules, meta)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, write results, print the summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=7, help="interleaved rounds; default 7")
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 -t; default 5")
    ap.add_argument("--ping-count", type=int, default=20, help="pings per round; default 20")
    ap.add_argument("--ping-interval", type=float, default=0.2, help="ping -i; default 0.2")
    ap.add_argument("--sizes", default="10,100,500,1000", help="port counts for the rules")
    ap.add_argument("--rules-runs", type=int, default=5, help="runs per port count; default 5")
    ap.add_argument("--rules-json", type=Path,
                    help="take the rule timing from this netrules.py results file instead "
                         "(e.g. bench/results/netrules-latest.json)")
    ap.add_argument("--no-diagnose", dest="diagnose", action="store_false",
                    help="skip the third side (popek's containers with popek's tables deleted)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.runs < 1 or args.seconds < 1 or args.ping_count < 2 or args.rules_runs < 1:
        ap.error("--runs, --seconds, --rules-runs must be >= 1 and --ping-count >= 2")
    if os.geteuid() != 0:
        print("network.py: needs root (namespaces, bridges, nftables)", file=sys.stderr)
        return 2
    for tool in ("iperf3", "busybox", "nsenter", "nft", "ip"):
        if shutil.which(tool) is None:
            print(f"network.py: {tool} not found", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)
    try:
        rep = run(args)
    except BenchError as exc:
        print(f"network.py: {exc}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    write(rep, args.out, stamp)
    print_summary(rep)
    print(f"results: {args.out / f'network-{stamp}.json'}, network-latest.json, "
          "network-latest.png")
    ok = rep["throughput"]["target_met"] and rep["rules"]["target_met"] in (True, None)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
