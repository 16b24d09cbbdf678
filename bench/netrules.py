"""Benchmark: time to build and apply popek's nftables rules for N ports.

The claim under test: **the rules for 500 ports are built and applied in
under 2 s, and the cost grows linearly with the number of ports.**

For N in 10, 100, 500, 1000 (``--sizes``): N ports spread over 4 networks
(two with NAT, one with port isolation), each port with an IPv4 lease and two
IPv6 addresses (link-local + global).  Each run builds the rule set from the
records (``build_ruleset``) and loads it (``apply``: ``nft -j -f -``, one
atomic transaction that replaces the tables, which already hold the rules of
the previous run, as on a live host).  The rules are loaded inside a private
network namespace created for the benchmark (``pktest-bench-*``) and deleted
at the end, so the host's own rules are never touched.  Run as root:

    .venv/bin/python bench/netrules.py [--runs 5] [--sizes 10,100,500,1000]

Output: a table on stdout, ``bench/results/netrules-latest.json`` plus a
timestamped copy, and ``bench/results/netrules-latest.png`` (time against N).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, BenchError, _ms, _summary
from popek.network import nft
from popek.network.model import Network, Port

TARGET_PORTS = 500
TARGET_MS = 2000.0


def records(n: int) -> tuple[list[Network], list[Port]]:
    """N ports over 4 networks, addresses as IPAM would hand them out."""
    nets = [Network(name=f"bn{i}", subnet=f"10.{200 + i}.0.0/16", gateway=f"10.{200 + i}.0.1",
                    bridge=f"pkb{i}", nat=i % 2 == 0, port_isolation=i == 1,
                    ipv6_subnet=f"fd42:{i}::/64") for i in range(4)]
    ports = []
    for j in range(n):
        i = j % 4
        host = j // 4 + 2
        mac = f"52:54:00:{i:02x}:{host >> 8:02x}:{host & 255:02x}"
        ll = f"fe80::5054:ff:fe{i:02x}:{host:04x}"
        ports.append(Port(network=f"bn{i}", instance=f"bench/i{j}", kind="tap",
                          host_ifname=f"pkt{j}", mac=mac,
                          ipv4=f"10.{200 + i}.{host >> 8}.{host & 255}",
                          ipv6=[ll, f"fd42:{i}::{host:x}"]))
    return nets, ports


def run(sizes: list[int], runs: int, netns: str) -> dict[str, Any]:
    """Samples and summaries per size."""
    out: dict[str, Any] = {}
    for n in sizes:
        nets, ports = records(n)
        build, apply_, total = [], [], []
        rs = nft.build_ruleset(nets, ports)
        nft.apply(rs, netns=netns)  # warm-up: the table holds N ports, as on a live host
        for _ in range(runs):
            t0 = time.perf_counter()
            rs = nft.build_ruleset(nets, ports)
            t1 = time.perf_counter()
            nft.apply(rs, netns=netns)
            t2 = time.perf_counter()
            build.append(_ms(t1 - t0))
            apply_.append(_ms(t2 - t1))
            total.append(_ms(t2 - t0))
        n_rules = sum(1 for c in rs if "rule" in c.get("add", {}))
        out[str(n)] = {
            "ports": n, "rules": n_rules, "json_bytes": len(nft.to_json(rs)),
            "build_ms": _summary(build), "apply_ms": _summary(apply_),
            "total_ms": _summary(total),
            "samples": {"build_ms": build, "apply_ms": apply_, "total_ms": total},
        }
        med = out[str(n)]["total_ms"]["median"]
        print(f"{n:>6} ports  {n_rules:>6} rules  build {out[str(n)]['build_ms']['median']:>8} ms"
              f"  apply {out[str(n)]['apply_ms']['median']:>8} ms  total {med:>8} ms",
              flush=True)
    return out


def growth(results: dict[str, Any]) -> dict[str, Any]:
    """Per-port cost at each size, and the least-squares slope/intercept of total vs N."""
    xs = [r["ports"] for r in results.values()]
    ys = [r["total_ms"]["median"] for r in results.values()]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return {
        "ms_per_port": {str(x): round(y / x, 3) for x, y in zip(xs, ys, strict=True)},
        "linear_fit": {"ms_per_port": round(slope, 3), "fixed_ms": round(my - slope * mx, 1)},
    }


def plot(results: dict[str, Any], path: Path) -> None:
    """Median build/apply/total time against the number of ports."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["ports"] for r in results.values()]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("total_ms", "build + apply"), ("apply_ms", "apply (nft -j -f -)"),
                       ("build_ms", "build_ruleset (Python)")):
        ax.plot(xs, [r[key]["median"] for r in results.values()], marker="o", label=label)
    ax.axhline(TARGET_MS, color="red", linestyle="--", linewidth=1,
               label=f"target: {TARGET_PORTS} ports < {TARGET_MS / 1000:.0f} s")
    ax.set_xlabel("ports")
    ax.set_ylabel("ms (median)")
    ax.set_title("popek port security: time to build and load the rules")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    """Run the benchmark; exit 1 when the 500-port target is missed."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sizes", default="10,100,500,1000")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise BenchError("run as root: nft needs CAP_NET_ADMIN")
    sizes = [int(s) for s in args.sizes.split(",")]
    netns = f"pktest-bench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        results = run(sizes, args.runs, netns)
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)
    g = growth(results)
    met = None
    if str(TARGET_PORTS) in results:
        met = results[str(TARGET_PORTS)]["total_ms"]["median"] < TARGET_MS
    doc = {
        "benchmark": "netrules", "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "runs": args.runs, "nft": subprocess.run(["nft", "-v"], capture_output=True,
                                                 text=True).stdout.strip(),
        "kernel": os.uname().release, "cpus": os.cpu_count(),
        "target": {"ports": TARGET_PORTS, "total_ms": TARGET_MS, "met": met},
        "growth": g, "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(doc, indent=2)
    (args.out / f"netrules-{stamp}.json").write_text(text)
    (args.out / "netrules-latest.json").write_text(text)
    plot(results, args.out / "netrules-latest.png")
    print(f"growth: {g['linear_fit']['ms_per_port']} ms/port + {g['linear_fit']['fixed_ms']} ms;"
          f" per port at each size {g['ms_per_port']}")
    print(f"target {TARGET_PORTS} ports < {TARGET_MS:.0f} ms: {'met' if met else 'MISSED'}")
    print(f"wrote {args.out / 'netrules-latest.json'} and netrules-latest.png")
    return 0 if met in (True, None) else 1


if __name__ == "__main__":
    sys.exit(main())
