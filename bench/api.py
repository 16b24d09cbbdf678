"""API read benchmark: popek's REST API against podman's, the same containers behind each.

Issue 14, "Benchmark": "With 200 containers recorded, concurrent clients doing
list and info against popek's API and against podman's REST service (``podman
system service``, Debian's podman, the same 200 containers) in the same run:
requests per second and p50/p99, as ratios.  Targets: popek at least 500 read
requests per second with p99 under 50 ms on this 2-core machine, and ahead of
podman."

In a private ``POPEK_HOME`` this launches ``--count`` (default 200) containers
(``popek launch minimal aNNNN --container --memory 64MiB --pids 64``), and in a
private podman store (the image made of the same rootfs.tar, runc, cgroupfs, as
bench/containers.py) as many with ``podman run -d`` (``/sbin/init``, no
network, the same memory and pids limits); all run during the measurement.
Then ``popek serve`` and ``podman system service`` each listen on a private
Unix socket, and in interleaved rounds (the order alternating) ``--clients``
keep-alive connections (default 8, one asyncio client process) send
requests one after another for ``--seconds`` per round and server: a list
(``GET /1.0/instances``; podman ``GET /v4.0.0/libpod/containers/json?all=true``)
and an info of a random container (``GET /1.0/instances/NAME``; podman
``GET /v4.0.0/libpod/containers/NAME/json``), alternately.  Each answer is
checked (status 200, the count of a list, the name of an info).
Writes ``bench/results/api-<UTC>.json``, ``api-latest.{json,png}``.  Every
container, process and directory is removed at the end, also on failure or
SIGTERM.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Any

from common import CACHE, POPEK, PYTHON, RESULTS, BenchError, _mkdir_public
from containers import PODMAN_IMAGE, PODMAN_ULIMITS, SIDE_CGROUPS, SIDE_PATHS, _umount_under

IMAGE = "minimal"
MEMORY = "64MiB"  # the smallest the CLI accepts (popek.core.model.MIN_MEMORY)
PIDS = "64"
TARGET_RPS = 500.0
TARGET_P99_MS = 50.0
#: podman's REST API version in the paths (any v4 the service accepts)
PODMAN_API = "/v4.0.0/libpod"
WARMUP_S = 2.0
CREATE_WORKERS = 4


def _on_term(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _run(argv: list[str], what: str, env: dict[str, str] | None = None,
         timeout: float = 300.0) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                         stdin=subprocess.DEVNULL, env=env)
    if res.returncode != 0:
        raise BenchError(f"{what} exited {res.returncode}: {(res.stderr or res.stdout)[-500:]}")
    return res.stdout


class Env:
    """The private popek home, the private podman store, their servers and containers."""

    def __init__(self) -> None:
        self.home = _mkdir_public("popek-bench-api-")
        self.scratch = _mkdir_public("popek-bench-api-raw-")
        self.env = {**os.environ, "POPEK_HOME": str(self.home), "POPEK_CACHE": str(CACHE)}
        for k in ("PYTHONPROFILEIMPORTTIME", "TERM", "LANG"):
            self.env.pop(k, None)
        self.podman_dir = self.scratch / "podman"
        self.instances: list[str] = []
        self.podman_names: list[str] = []
        self.servers: dict[str, subprocess.Popen[bytes]] = {}
        self.new_paths = [p for p in SIDE_PATHS if not p.exists()]
        self.new_cgroups = [n for n in SIDE_CGROUPS if not any(
            (h / n).exists() for h in Path("/sys/fs/cgroup").iterdir())]

    def popek(self, *args: str, timeout: float = 300.0) -> str:
        """Run the popek CLI in the private home."""
        return _run([POPEK, *args], f"popek {' '.join(args[:3])}", self.env, timeout)

    def podman(self) -> list[str]:
        """podman with the private store, runc, cgroupfs and file events (no systemd here)."""
        d = self.podman_dir
        return ["podman", "--root", str(d / "root"), "--runroot", str(d / "run"),
                "--tmpdir", str(d / "tmp"), "--storage-driver", "overlay", "--runtime", "runc",
                "--cgroup-manager", "cgroupfs", "--events-backend", "file"]

    def socket(self, name: str) -> Path:
        """The Unix socket of server ``name``."""
        return self.scratch / f"{name}.sock"

    def cleanup(self) -> None:
        """Stop the servers, remove every container, the stores and the directories."""
        for proc in self.servers.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        with ThreadPoolExecutor(CREATE_WORKERS) as pool:
            list(pool.map(self._delete, self.instances))
        left = json.loads(self.popek("list", "--format", "json") or "[]") \
            if self.home.exists() else []
        if self.podman_dir.exists():
            for args in (["rm", "--all", "--force", "--time", "0"], ["rmi", "--all", "--force"]):
                with contextlib.suppress(subprocess.SubprocessError, OSError):
                    subprocess.run([*self.podman(), *args], capture_output=True, timeout=300,
                                   check=False)
        _umount_under(self.scratch)
        for path in self.new_paths:
            shutil.rmtree(path, ignore_errors=True)
        for hier in Path("/sys/fs/cgroup").iterdir():
            for name in self.new_cgroups:
                with contextlib.suppress(OSError):
                    (hier / name).rmdir()
        shutil.rmtree(self.scratch, ignore_errors=True)
        if left:
            print(f"api.py: {len(left)} instances remain in {self.home}, kept so that they can "
                  f"be deleted (POPEK_HOME={self.home} popek delete --force NAME)",
                  file=sys.stderr, flush=True)
        else:
            shutil.rmtree(self.home, ignore_errors=True)

    def _delete(self, name: str) -> None:
        with contextlib.suppress(BenchError, subprocess.SubprocessError, OSError):
            self.popek("delete", "--force", name, timeout=120)


# -- the containers ---------------------------------------------------------------------------
def make_containers(env: Env, count: int) -> dict[str, float]:
    """Launch ``count`` popek containers and ``count`` podman ones; seconds each side took."""
    if not (env.home / "images" / IMAGE / "manifest.json").exists():
        print(f"building image {IMAGE} (cache {CACHE}) ...", flush=True)
        env.popek("image", "build", IMAGE, timeout=900)
    for sub in ("root", "run", "tmp"):
        (env.podman_dir / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    _run([*env.podman(), "import", str(env.home / "images" / IMAGE / "rootfs.tar"),
          PODMAN_IMAGE], "podman import")
    names = [f"a{i:04d}" for i in range(count)]
    took: dict[str, float] = {}

    def popek_one(name: str) -> None:
        env.instances.append(name)
        env.popek("launch", IMAGE, name, "--container", "--memory", MEMORY, "--pids", PIDS)

    def podman_one(name: str) -> None:
        env.podman_names.append(name)
        _run([*env.podman(), "run", "--detach", "--name", name, "--network", "none",
              *PODMAN_ULIMITS, "--memory", "64m", "--memory-swap", "64m", "--pids-limit", PIDS,
              "--hostname", name, PODMAN_IMAGE, "/sbin/init"], f"podman run {name}")

    for side, one in (("popek", popek_one), ("podman", podman_one)):
        print(f"creating {count} {side} containers ...", flush=True)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(CREATE_WORKERS) as pool:
            list(pool.map(one, names))
        took[side] = round(time.perf_counter() - t0, 1)
    return took


# -- the servers --------------------------------------------------------------------------------
def start_servers(env: Env, baseline: Path | None) -> dict[str, dict[str, Any]]:
    """``popek serve`` (and the baseline's, when given) and ``podman system service``."""
    argvs: dict[str, tuple[list[str], dict[str, str]]] = {
        "popek": ([PYTHON, "-m", "popek.api", "--socket", str(env.socket("popek"))], env.env),
        "podman": ([*env.podman(), "system", "service", "--time", "0",
                    f"unix://{env.socket('podman')}"], env.env),
    }
    if baseline is not None:
        argvs["popek_baseline"] = (
            [PYTHON, "-m", "popek.api", "--socket", str(env.socket("popek_baseline"))],
            {**env.env, "PYTHONPATH": str(baseline)})
    info: dict[str, dict[str, Any]] = {}
    for name, (argv, penv) in argvs.items():
        log = (env.scratch / f"{name}.log").open("wb")
        env.servers[name] = subprocess.Popen(argv, env=penv, stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT)
        log.close()
        _wait_listening(env.socket(name), env.servers[name], env.scratch / f"{name}.log")
        info[name] = {"pid": env.servers[name].pid, "argv": argv}
    return info


def _wait_listening(path: Path, proc: subprocess.Popen[bytes], log: Path,
                    timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{path.stem} exited {proc.returncode}: {log.read_text()[-500:]}")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
            return
        time.sleep(0.05)
    raise BenchError(f"{path.stem} did not listen on {path} within {timeout:.0f}s")


def cpu_ms(pid: int) -> float:
    """CPU time (user + system) of process ``pid`` and its reaped children, in ms."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(f) for f in fields[11:15])
    return ticks * 1000.0 / os.sysconf("SC_CLK_TCK")


# -- the client ---------------------------------------------------------------------------------
class Target:
    """The two reads of one server, and how to check their answers."""

    def __init__(self, name: str, sock: Path, names: Sequence[str]) -> None:
        self.name, self.sock, self.names = name, sock, list(names)
        podman = name == "podman"
        self.list_path = f"{PODMAN_API}/containers/json?all=true" if podman else "/1.0/instances"
        self.info_fmt = f"{PODMAN_API}/containers/{{}}/json" if podman else "/1.0/instances/{}"

    def check(self, kind: str, name: str, body: bytes) -> None:
        """Raise :class:`BenchError` unless ``body`` is the answer asked for."""
        data = json.loads(body)
        if kind == "list":
            if len(data) != len(self.names):
                raise BenchError(f"{self.name}: a list of {len(data)}, not {len(self.names)}")
            return
        got = data.get("Name", data.get("name", "")).lstrip("/")
        if got != name:
            raise BenchError(f"{self.name}: info of {name} answered {got!r}")


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 answer: its status and body (Content-Length or chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (ln.partition(":") for ln in lines[1:] if ln)}
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() != "chunked":
        raise BenchError(f"an answer with neither Content-Length nor chunks: {headers}")
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return status, b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


async def _client(target: Target, until: float, seed: int, check: bool,
                  out: list[tuple[str, float]]) -> None:
    rnd = random.Random(seed)
    reader, writer = await asyncio.open_unix_connection(str(target.sock), limit=1 << 24)
    kind = "list" if seed % 2 else "info"
    try:
        while time.perf_counter() < until:
            name = rnd.choice(target.names)
            path = target.list_path if kind == "list" else target.info_fmt.format(name)
            t0 = time.perf_counter()
            writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
            status, body = await _read_response(reader)
            elapsed = (time.perf_counter() - t0) * 1000.0
            if status != 200:
                raise BenchError(f"{target.name}: GET {path} answered {status}: {body[:300]!r}")
            if check:
                target.check(kind, name, body)
            out.append((kind, elapsed))
            kind = "info" if kind == "list" else "list"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def window(target: Target, clients: int, seconds: float, check: bool,
           server_pid: int) -> dict[str, Any]:
    """``clients`` connections reading for ``seconds``: every request's kind and latency."""
    out: list[tuple[str, float]] = []

    async def run() -> None:
        until = time.perf_counter() + seconds
        await asyncio.gather(*(_client(target, until, i + int(time.time()), check, out)
                               for i in range(clients)))

    load = os.getloadavg()[0]
    cpu0, t0 = cpu_ms(server_pid), time.perf_counter()
    asyncio.run(run())
    wall, cpu = time.perf_counter() - t0, cpu_ms(server_pid) - cpu0
    return {"target": target.name, "wall_s": round(wall, 3), "requests": len(out),
            "server_cpu_ms": round(cpu, 1), "load1_before": load,
            "latencies_ms": [round(x, 3) for _, x in out], "kinds": [k for k, _ in out]}


# -- analysis --------------------------------------------------------------------------------
def _pct(xs: Sequence[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, max(0, int(round(q * len(s))) - 1))], 2)


def _stats(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    wall = sum(r["wall_s"] for r in rounds)
    lat = [x for r in rounds for x in r["latencies_ms"]]
    by_kind: dict[str, list[float]] = {"list": [], "info": []}
    for r in rounds:
        for k, x in zip(r["kinds"], r["latencies_ms"], strict=True):
            by_kind[k].append(x)
    n = len(lat)
    return {
        "requests": n, "seconds": round(wall, 2), "rps": round(n / wall, 1) if wall else None,
        "p50_ms": _pct(lat, 0.50), "p99_ms": _pct(lat, 0.99), "max_ms": _pct(lat, 1.0),
        "rps_per_round": [round(r["requests"] / r["wall_s"], 1) for r in rounds],
        "server_cpu_ms_per_request": round(sum(r["server_cpu_ms"] for r in rounds) / n, 3)
        if n else None,
        "by_kind": {k: {"requests": len(v), "p50_ms": _pct(v, 0.50), "p99_ms": _pct(v, 0.99)}
                    for k, v in by_kind.items()},
    }


def round_summary(r: dict[str, Any]) -> dict[str, Any]:
    """A window as the results file keeps it: its figures, not every request's latency."""
    lat = r["latencies_ms"]
    kinds = {k: [x for kk, x in zip(r["kinds"], lat, strict=True) if kk == k]
             for k in ("list", "info")}
    return {**{k: v for k, v in r.items() if k not in ("latencies_ms", "kinds")},
            "rps": round(r["requests"] / r["wall_s"], 1) if r["wall_s"] else None,
            "p50_ms": _pct(lat, 0.50), "p90_ms": _pct(lat, 0.90), "p99_ms": _pct(lat, 0.99),
            "max_ms": _pct(lat, 1.0),
            "by_kind": {k: {"requests": len(v), "p50_ms": _pct(v, 0.50), "p99_ms": _pct(v, 0.99)}
                        for k, v in kinds.items()}}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def analyse(rounds: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Per server: requests/s, p50, p99 (all reads, and list and info apart); the ratios."""
    names = list(dict.fromkeys(r["target"] for r in rounds))
    stats = {n: _stats([r for r in rounds if r["target"] == n]) for n in names}
    pk, pd = stats.get("popek"), stats.get("podman")
    ratios = {}
    if pk and pd:
        ratios = {"rps_popek_over_podman": _ratio(pk["rps"], pd["rps"]),
                  "p50_popek_over_podman": _ratio(pk["p50_ms"], pd["p50_ms"]),
                  "p99_popek_over_podman": _ratio(pk["p99_ms"], pd["p99_ms"]),
                  **{f"{k}_p50_popek_over_podman": _ratio(pk["by_kind"][k]["p50_ms"],
                                                         pd["by_kind"][k]["p50_ms"])
                     for k in ("list", "info")}}
    verdict = {}
    if pk:
        verdict = {"rps_at_least_500": bool(pk["rps"] and pk["rps"] >= TARGET_RPS),
                   "p99_under_50_ms": bool(pk["p99_ms"] is not None
                                           and pk["p99_ms"] < TARGET_P99_MS),
                   "ahead_of_podman": bool(pd and pk["rps"] and pd["rps"]
                                           and pk["rps"] > pd["rps"]
                                           and pk["p99_ms"] <= pd["p99_ms"])}
    return {"stats": stats, "ratios": ratios, "verdict": verdict}


def plot(report: dict[str, Any], path: Path) -> None:
    """Left: requests/s per round and server; right: latency percentiles per server and read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = report["stats"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, st in stats.items():
        a.plot(range(1, len(st["rps_per_round"]) + 1), st["rps_per_round"], "o-",
               label=f"{name}: {st['rps']} req/s")
    a.axhline(TARGET_RPS, color="grey", ls="--", lw=1, label=f"target {TARGET_RPS:.0f} req/s")
    a.set_xticks(range(1, report["config"]["rounds"] + 1))
    a.set_xlabel("round")
    a.set_ylabel("requests per second")
    a.set_ylim(bottom=0)
    a.set_title(f"{report['config']['count']} containers, {report['config']['clients']} "
                "clients, list and info alternately")
    a.legend(fontsize=8)
    labels, width = ["list p50", "list p99", "info p50", "info p99", "all p99"], 0.8 / len(stats)
    for i, (name, st) in enumerate(stats.items()):
        vals = [st["by_kind"]["list"]["p50_ms"], st["by_kind"]["list"]["p99_ms"],
                st["by_kind"]["info"]["p50_ms"], st["by_kind"]["info"]["p99_ms"], st["p99_ms"]]
        b.bar([x + i * width for x in range(len(labels))], [v or 0 for v in vals], width,
              label=name)
    b.axhline(TARGET_P99_MS, color="grey", ls="--", lw=1, label="p99 target 50 ms")
    b.set_xticks([x + width * (len(stats) - 1) / 2 for x in range(len(labels))], labels)
    b.set_yscale("log")
    b.set_ylabel("latency (ms, log scale)")
    b.set_title("latency under load")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------
def run(args: argparse.Namespace, env: Env) -> dict[str, Any]:
    """Make the containers, start the servers, measure in interleaved rounds."""
    made = make_containers(env, args.count)
    servers = start_servers(env, args.baseline)
    names = [f"a{i:04d}" for i in range(args.count)]
    targets = [Target(n, env.socket(n), names) for n in servers]
    for t in targets:  # warm-up, every answer checked
        window(t, args.clients, WARMUP_S, True, servers[t.name]["pid"])
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = targets if r % 2 == 0 else targets[::-1]
        for t in order:
            res = window(t, args.clients, args.seconds, args.check, servers[t.name]["pid"])
            res["round"] = r + 1
            rounds.append(res)
            print(f"round {r + 1} {t.name}: {res['requests'] / res['wall_s']:.0f} req/s "
                  f"(load {res['load1_before']:.2f})", flush=True)
    return {"made_s": made, "servers": servers, "rounds": rounds}


def _versions() -> dict[str, str]:
    def first(argv: list[str]) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        return "?"
    return {"podman": first(["podman", "--version"]), "runc": first(["runc", "--version"]),
            "python": platform.python_version(),
            "uvicorn_http": first([PYTHON, "-c", "import httptools; print('httptools', "
                                   "httptools.__version__)"])}


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, write results, print the summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--count", type=int, default=200, help="containers per side; default 200")
    ap.add_argument("--clients", type=int, default=8, help="concurrent connections; default 8")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; default 5")
    ap.add_argument("--seconds", type=float, default=8.0, help="per round and server; default 8")
    ap.add_argument("--check", action="store_true",
                    help="check every timed answer too (the warm-up's are always checked)")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="also serve popek from this source tree (its src/, e.g. a git archive "
                         "of an older commit), measured as popek_baseline")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = ap.parse_args(argv)
    if args.count < 1 or args.clients < 1 or args.rounds < 1 or args.seconds <= 0:
        ap.error("--count, --clients, --rounds and --seconds must be positive")
    if os.geteuid() != 0:
        print("api.py: needs root (containers, popek serve's socket)", file=sys.stderr)
        return 2
    if not shutil.which("podman"):
        print("api.py: podman is not installed: run scripts/setup-bench.sh", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)
    load_start = list(os.getloadavg())
    started = dt.datetime.now(dt.UTC)
    env = Env()
    try:
        data = run(args, env)
    except BenchError as exc:
        print(f"api.py: {exc}", file=sys.stderr)
        return 1
    finally:
        env.cleanup()
    report = {
        "claim": "popek at least 500 read requests per second with p99 under 50 ms, "
                 "and ahead of podman",
        "config": {"count": args.count, "clients": args.clients, "rounds": args.rounds,
                   "seconds": args.seconds, "containers": "running (launched, not stopped)",
                   "reads": "list and info alternately per connection, info of a random "
                            "container", "baseline": str(args.baseline or "")},
        **analyse(data["rounds"], args),
        "made_s": data["made_s"], "servers": data["servers"],
        "host": {"nproc": os.cpu_count(), "kernel": platform.release(),
                 "load_start": load_start, "load_end": list(os.getloadavg()),
                 "started": started.isoformat(timespec="seconds"), **_versions()},
        "rounds": [round_summary(r) for r in data["rounds"]],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(report, indent=1) + "\n"
    (args.out / f"api-{stamp}.json").write_text(text)
    (args.out / "api-latest.json").write_text(text)
    plot(report, args.out / "api-latest.png")
    print(json.dumps({"stats": {n: {k: v for k, v in s.items() if k != "rps_per_round"}
                                for n, s in report["stats"].items()},
                      "ratios": report["ratios"], "verdict": report["verdict"],
                      "load": [load_start, report["host"]["load_end"]]}, indent=1))
    print(f"results: {args.out / f'api-{stamp}.json'}, api-latest.json, api-latest.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
