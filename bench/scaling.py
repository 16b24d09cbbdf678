"""Scaling benchmark: does a command's cost grow with the host's instance count?

Issue 11, point 7: "launch cost within 10 % from 10 to 500 instances, ``list``
of 500 under 150 ms".  In a private ``POPEK_HOME`` this launches containers one
after another (``popek launch minimal sNNNN --container --memory 64MiB --pids
64``) up to ``--max`` (default 500) and at each checkpoint (10, 100, 250, 500 or
the largest count reached) times, through the warm command server as users run
them: several extra launches (each deleted again, so the count stays), ``popek
list`` and ``popek info NAME``; plus the pieces a command is made of (import,
``Instances()``, ``reconcile()``, ``all()``/``info()``) in a fresh Python
process, and the cold commands (``POPEK_CLI_SERVER=off``).  At the largest
count it profiles ``list``, its reconcile, ``info`` and a ``launch`` (cProfile, in a fresh
process, after one unprofiled call).
Writes ``bench/results/scaling-<UTC>.json``, ``scaling-latest.{json,png}``.
Every instance is deleted at the end, also on failure or SIGTERM.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from common import CACHE, COLD, POPEK, PYTHON, RESULTS, BenchError, _median, _mkdir_public, _ms

IMAGE = "minimal"
MEMORY = "64MiB"  # the smallest the CLI accepts (popek.core.model.MIN_MEMORY)
PIDS = "64"
CHECKPOINTS = (10, 100, 250, 500)
TARGET_LAUNCH_GROWTH = 1.10  # launch at the largest count within 10 % of launch at 10
TARGET_LIST_MS = 150.0
#: a command the warm server ran costs the native client about 1 ms of CPU; one
#: run in its own process (the server stepped down after a source edit) 100+ ms
SERVED_CPU_MS = 20.0
RETRIES = 6
RETRY_PAUSE_S = 10.0
#: a popek command that failed with one of these died of a half-edited source file
BROKEN_SOURCE = ("Traceback (most recent call last)", "NameError", "SyntaxError",
                 "ImportError", "IndentationError", "AttributeError: module",
                 "popek failed inside")  # exit 70: popek's own report of an internal error

PIECES = r"""
import json, sys, time
t0 = time.perf_counter()
from popek.core.instances import Instances
t1 = time.perf_counter()
insts = Instances()
t2 = time.perf_counter()
insts.reconcile(None)
t3 = time.perf_counter()
rows = insts.all()
t4 = time.perf_counter()
insts2 = Instances()
insts2.reconcile([sys.argv[1]])
t5 = time.perf_counter()
insts2.info(sys.argv[1])
t6 = time.perf_counter()
import contextlib, io
import popek.cli.ops as ops
import rich.console, rich.table
with contextlib.redirect_stdout(io.StringIO()):
    t7 = time.perf_counter()
    ops.list_(remote=None, fmt="table", columns="")
    t8 = time.perf_counter()
    ops.list_(remote=None, fmt="json", columns="")
    t9 = time.perf_counter()
ms = lambda a, b: round((b - a) * 1000, 2)
print(json.dumps({"import": ms(t0, t1), "Instances()": ms(t1, t2), "reconcile(all)": ms(t2, t3),
                  "all()": ms(t3, t4), "Instances()+reconcile(name)": ms(t4, t5),
                  "info(name)": ms(t5, t6), "ops.list_('table') in-process": ms(t7, t8),
                  "ops.list_('json') in-process": ms(t8, t9), "count": len(rows)}))
"""

PROFILE = r"""
import contextlib, cProfile, io, json, pstats, sys
import popek.cli.ops as ops
what, name = sys.argv[1], sys.argv[2]
if what == "launch":  # a container launch, warmed up by one launch and delete before
    from popek.cli import fastpath
    def args(n):
        return fastpath.parse("launch", ["minimal", n, *sys.argv[3:]])
    with contextlib.redirect_stdout(io.StringIO()):
        ops.launch(**args(name + "-warm"))
        ops.delete(name + "-warm", True)
def call():
    if what == "launch":
        ops.launch(**args(name))
    elif what == "list":
        ops.list_(remote=None, fmt="table", columns="")
    elif what == "reconcile":  # what list and launch do before their own work
        ops.instances().all()
    else:
        ops.info(name, "table")
prof = cProfile.Profile()
with contextlib.redirect_stdout(io.StringIO()):
    if what != "launch":
        call()  # imports done, as in the warm command server; then the profiled run
    prof.enable()
    call()
    prof.disable()
    if what == "launch":
        ops.delete(name, True)
st = pstats.Stats(prof)
total = st.total_tt
rows = []
for (file, line, func), (cc, nc, tt, ct, _callers) in st.stats.items():
    rows.append({"func": f"{file.replace(sys.prefix, '<venv>')}:{line}({func})", "calls": nc,
                 "tottime_ms": round(tt * 1000, 2), "cumtime_ms": round(ct * 1000, 2)})
print(json.dumps({"total_ms": round(total * 1000, 2),
                  "by_cumtime": sorted(rows, key=lambda r: -r["cumtime_ms"])[:40],
                  "popek_by_cumtime": sorted((r for r in rows if "/popek/" in r["func"]),
                                             key=lambda r: -r["cumtime_ms"])[:40],
                  "by_tottime": sorted(rows, key=lambda r: -r["tottime_ms"])[:25]}))
"""


def _on_term(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


class Env:
    """A private POPEK_HOME and the instances launched in it."""

    def __init__(self) -> None:
        self.home = _mkdir_public("popek-bench-scale-")
        self.env = {**os.environ, "POPEK_HOME": str(self.home), "POPEK_CACHE": str(CACHE)}
        for k in ("PYTHONPROFILEIMPORTTIME", "TERM", "LANG"):
            self.env.pop(k, None)
        self.instances: list[str] = []
        self.extra: set[str] = set()
        self.launch_args = ["--container", "--memory", MEMORY, "--pids", PIDS]
        self.retries = 0

    def run(self, args: list[str], cold: bool = False) -> tuple[float, float, str]:
        """Run ``popek ARGS``: (wall ms, CPU ms of the client process, output).

        A command that dies of a Python error (popek's sources are being edited
        in this checkout while the benchmark runs: a half-saved module) is run
        again after a pause, up to :data:`RETRIES` times; a launch first deletes
        what the failed attempt may have left.
        """
        for attempt in range(RETRIES + 1):
            try:
                return self._run_once(args, cold)
            except BenchError as exc:
                if attempt == RETRIES or not any(m in str(exc) for m in BROKEN_SOURCE):
                    raise
                print(f"  popek {' '.join(args[:3])} failed on a Python error, retrying in "
                      f"{RETRY_PAUSE_S:.0f}s: {str(exc)[-160:]!r}", file=sys.stderr, flush=True)
                self.retries += 1
                time.sleep(RETRY_PAUSE_S)
                if args[0] == "launch":
                    with contextlib.suppress(BenchError):
                        self._run_once(["delete", "--force", args[2]], False)
        raise AssertionError("unreachable")

    def _run_once(self, args: list[str], cold: bool) -> tuple[float, float, str]:
        env = {**self.env, **COLD} if cold else self.env
        t0 = time.perf_counter()
        proc = subprocess.Popen([POPEK, *args], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        out = proc.stdout.read()
        _pid, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
        if proc.returncode != 0:
            raise BenchError(f"popek {' '.join(args)} exited {proc.returncode}: "
                             f"{out.decode(errors='replace').strip()[-600:]}")
        return _ms(wall), round((ru.ru_utime + ru.ru_stime) * 1000, 2), out.decode(
            errors="replace")

    def launch(self, name: str) -> dict[str, Any]:
        """Launch one container; its wall and CPU time."""
        wall, cpu, _ = self.run(["launch", IMAGE, name, *self.launch_args])
        return {"name": name, "ms": wall, "client_cpu_ms": cpu, "served": cpu < SERVED_CPU_MS}

    def delete(self, name: str) -> None:
        """Delete one instance (--force)."""
        self.run(["delete", "--force", name])

    def cleanup(self) -> None:
        """Delete every instance this run launched, then the private home."""
        t0 = time.perf_counter()
        left = sorted(set(self.instances) | self.extra)
        total = len(left)
        for _attempt in range(3):
            failed: list[str] = []
            for name in left:
                try:
                    self.delete(name)
                except (BenchError, OSError, subprocess.SubprocessError) as exc:
                    failed.append(name)
                    last = str(exc)
            if not failed:
                break
            print(f"scaling.py: {len(failed)} deletes failed, last: {last[-300:]}",
                  file=sys.stderr, flush=True)
            left = failed
            time.sleep(RETRY_PAUSE_S)
        try:
            _wall, _cpu, out = self.run(["list", "--format", "json"])
            remaining = [i["name"] for i in json.loads(out[out.index("["):])]
        except (BenchError, ValueError, OSError) as exc:
            remaining = [f"? (popek list failed: {exc})"]
        if remaining:
            print(f"scaling.py: {len(remaining)} instances remain in {self.home}, which is "
                  f"kept so they can be deleted (POPEK_HOME={self.home} popek delete --force "
                  f"NAME): {remaining[:10]}", file=sys.stderr, flush=True)
            return
        shutil.rmtree(self.home, ignore_errors=True)
        print(f"cleanup: {total} instances deleted in {time.perf_counter() - t0:.0f}s",
              flush=True)


def ensure_image(env: Env) -> None:
    """Build the minimal image into the private home (uses the shared download cache)."""
    if not (env.home / "images" / IMAGE / "manifest.json").exists():
        print(f"building image {IMAGE} (cache {CACHE}) ...", flush=True)
        env.run(["image", "build", IMAGE])


def _served_median(samples: list[dict[str, Any]]) -> float | None:
    served = [s["ms"] for s in samples if s["served"]]
    return _median(served) if served else _median([s["ms"] for s in samples])


def _timed(env: Env, args: list[str], runs: int, cold: bool = False) -> list[dict[str, Any]]:
    out = []
    for _ in range(runs):
        wall, cpu, _text = env.run(args, cold=cold)
        out.append({"ms": wall, "client_cpu_ms": cpu, "served": cold or cpu < SERVED_CPU_MS})
    return out


def _python_json(env: Env, code: str, *args: str) -> dict[str, Any]:
    res = subprocess.run([PYTHON, "-c", code, *args], env={**env.env, **COLD},
                         capture_output=True, text=True, check=False, timeout=300)
    if res.returncode != 0:
        raise BenchError(f"python helper failed: {res.stderr.strip()[-800:]}")
    data: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return data


def checkpoint(env: Env, count: int, launch_runs: int, cmd_runs: int,
               ref: Env | None = None) -> dict[str, Any]:
    """Everything measured with ``count`` instances on the host.

    ``ref``: a second home that holds one instance; a launch there, taken in turn
    with each launch in ``env`` (same host, same moment), shows what the host
    (runtime and kernel) adds as instances pile up, apart from popek's own cost.
    """
    name = env.instances[0]
    point: dict[str, Any] = {"count": count, "loadavg": list(os.getloadavg())}
    launches: list[dict[str, Any]] = []
    reference: list[dict[str, Any]] = []
    for i in range(launch_runs):
        for home, out in ((env, launches), (ref, reference)):
            if home is None:
                continue
            extra = f"x{count:04d}-{i}"
            home.extra.add(extra)
            out.append(home.launch(extra))
            home.delete(extra)
            home.extra.discard(extra)
    point["launch"] = launches
    point["launch_small_home"] = reference
    point["list"] = _timed(env, ["list"], cmd_runs)
    point["list_json"] = _timed(env, ["list", "--format", "json"], cmd_runs)
    point["info"] = _timed(env, ["info", name], cmd_runs)
    point["list_cold"] = _timed(env, ["list"], 3, cold=True)
    point["info_cold"] = _timed(env, ["info", name], 3, cold=True)
    pieces = [_python_json(env, PIECES, name) for _ in range(3)]
    point["pieces_ms"] = {k: _median([p[k] for p in pieces]) for k in pieces[0] if k != "count"}
    point["pieces_count_seen"] = pieces[0]["count"]
    for k in ("launch", "launch_small_home", "list", "list_json", "info", "list_cold",
              "info_cold"):
        point[f"{k}_median_ms"] = _served_median(point[k])
    point["runs_not_served_by_server"] = sum(
        1 for k in ("launch", "list", "info") for s in point[k] if not s["served"])
    print(f"[{count:4d} instances] launch {point['launch_median_ms']} ms (in a one-instance home "
          f"{point['launch_small_home_median_ms']} ms), list "
          f"{point['list_median_ms']} ms (json {point['list_json_median_ms']}), info "
          f"{point['info_median_ms']} ms, cold list "
          f"{point['list_cold_median_ms']} ms; pieces {point['pieces_ms']}; load "
          f"{point['loadavg'][0]:.2f}", flush=True)
    return point


def run(args: argparse.Namespace, env: Env, ref: Env) -> dict[str, Any]:
    """Fill the host up to ``args.max`` instances, measuring at the checkpoints."""
    ensure_image(env)
    ensure_image(ref)
    ref.instances.append("r0001")  # one instance of its own: a first launch in a home
    ref.launch("r0001")            # pays for what the home's first instance sets up
    env.run(["list"])  # starts the warm command server if none runs
    checkpoints = sorted({c for c in CHECKPOINTS if c <= args.max} | {args.max})
    fill: list[dict[str, Any]] = []
    points: list[dict[str, Any]] = []
    broke: str | None = None
    probe = env.launch_args
    for n in range(1, args.max + 1):
        name = f"s{n:04d}"
        env.instances.append(name)
        try:
            sample = env.launch(name)
        except BenchError as exc:
            if n == 1 and "--pids" in probe:
                print(f"--pids {PIDS} refused ({exc}); launching without it", file=sys.stderr)
                env.launch_args = ["--container", "--memory", MEMORY]
                sample = env.launch(name)
            else:
                broke = f"launch number {n} failed: {exc}"
                print(f"scaling.py: {broke}", file=sys.stderr)
                with contextlib.suppress(BenchError):
                    env.delete(name)
                env.instances.pop()
                break
        sample["count_after"] = n
        fill.append(sample)
        if n % 50 == 0:
            print(f"  {n} instances, last launch {sample['ms']} ms, load "
                  f"{os.getloadavg()[0]:.2f}", flush=True)
        if n in checkpoints:
            points.append(checkpoint(env, n, args.launch_runs, args.runs, ref))
    reached = len(env.instances)
    if broke is not None and (not points or points[-1]["count"] != reached) and reached:
        points.append(checkpoint(env, reached, args.launch_runs, args.runs, ref))
    profile: dict[str, Any] = {}
    if reached and not args.no_profile:
        for what in ("list", "reconcile", "info"):
            profile[what] = _python_json(env, PROFILE, what, env.instances[0])
        env.extra |= {"plaunch", "plaunch-warm"}
        profile["launch"] = _python_json(env, PROFILE, "launch", "plaunch", *env.launch_args)
        env.extra -= {"plaunch", "plaunch-warm"}
    return {"fill": fill, "points": points, "broke": broke, "reached": reached,
            "profile": profile}


def _fill_window(fill: list[dict[str, Any]], count: int, width: int = 5) -> float | None:
    return _served_median([s for s in fill if count - width < s["count_after"] <= count])


def analyse(data: dict[str, Any], args: argparse.Namespace, env: Env,
            load_start: list[float]) -> dict[str, Any]:
    """The report as one JSON-able dict, with the verdicts."""
    points = data["points"]
    by = {p["count"]: p for p in points}
    first = by.get(10) or (points[0] if points else None)
    last = points[-1] if points else None
    verdict: dict[str, Any] = {}
    if first and last and first is not last:
        for k in ("launch", "info", "list"):
            a, b = first[f"{k}_median_ms"], last[f"{k}_median_ms"]
            verdict[f"{k}_growth_{first['count']}_to_{last['count']}"] = round(b / a, 3)
        g = verdict[f"launch_growth_{first['count']}_to_{last['count']}"]
        verdict["launch_within_10pct"] = g <= TARGET_LAUNCH_GROWTH
        ra, rb = first["launch_small_home_median_ms"], last["launch_small_home_median_ms"]
        if ra and rb:
            # the host's share: the same launch in a home with one instance, at each count
            verdict["host_growth_(launch_in_a_one_instance_home)"] = round(rb / ra, 3)
            # popek's share: launch in the full home over launch in the one-instance home,
            # at the same moment, from the first count to the last
            own = (last["launch_median_ms"] / rb) / (first["launch_median_ms"] / ra)
            verdict["popek_own_growth_(full_home_over_one_instance_home)"] = round(own, 3)
            verdict["popek_own_growth_within_10pct"] = own <= TARGET_LAUNCH_GROWTH
        verdict[f"list_of_{last['count']}_ms"] = last["list_median_ms"]
        verdict[f"list_of_{last['count']}_under_{TARGET_LIST_MS:.0f}ms"] = (
            last["list_median_ms"] < TARGET_LIST_MS)
        verdict["info_within_10pct (same criterion as launch, applied by this bench)"] = (
            verdict[f"info_growth_{first['count']}_to_{last['count']}"] <= TARGET_LAUNCH_GROWTH)
        verdict["full_count_reached"] = data["reached"] >= 500
    try:
        runc = subprocess.run(["runc", "--version"], capture_output=True, text=True,
                              check=False).stdout.splitlines()[0]
    except (OSError, IndexError):
        runc = "?"
    return {
        "benchmark": "scaling",
        "claim": "a command's cost does not grow with the host's instance count: launch within "
                 f"10 % from 10 to 500 instances, list of 500 under {TARGET_LIST_MS:.0f} ms",
        "time_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "launch_argv": ["popek", "launch", IMAGE, "NAME", *env.launch_args],
        "max_asked": args.max, "reached": data["reached"], "broke": data["broke"],
        "commands_retried_after_a_python_error": env.retries,
        "definition": "wall time from spawning `popek ...` (native client, warm command server) "
                      "to its exit; medians over the runs the server served (client CPU < "
                      f"{SERVED_CPU_MS:.0f} ms); launch = extra launches at the count, each "
                      "deleted again; fill_window = the fill loop's last 5 launches before it; "
                      "launch_small_home = the same launch in a second home with one instance, "
                      "taken in turn with each launch (what the host adds, apart from popek)",
        "targets": {"launch_growth_max": TARGET_LAUNCH_GROWTH, "list_ms_max": TARGET_LIST_MS},
        "verdict": verdict,
        "summary": [{"count": p["count"], "launch_ms": p["launch_median_ms"],
                     "launch_small_home_ms": p.get("launch_small_home_median_ms"),
                     "launch_fill_window_ms": _fill_window(data["fill"], p["count"]),
                     "list_ms": p["list_median_ms"], "list_json_ms": p["list_json_median_ms"],
                     "info_ms": p["info_median_ms"],
                     "list_cold_ms": p["list_cold_median_ms"],
                     "info_cold_ms": p["info_cold_median_ms"], "pieces_ms": p["pieces_ms"],
                     "loadavg_1m": p["loadavg"][0],
                     "runs_not_served_by_server": p["runs_not_served_by_server"]}
                    for p in points],
        "points": points, "fill": data["fill"], "profile": data["profile"],
        "host": {"nproc": os.cpu_count(), "kernel": platform.release(),
                 "python": platform.python_version(), "runc": runc,
                 "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
                 "nproc_limit": resource.getrlimit(resource.RLIMIT_NPROC),
                 "loadavg_start": load_start, "loadavg_end": list(os.getloadavg())},
    }


def plot(report: dict[str, Any], path: Path) -> None:
    """ms against instance count for launch, list and info, with the targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    s = report["summary"]
    xs = [p["count"] for p in s]
    for key, label, mark in (("launch_ms", "launch (extra, median)", "o-"),
                             ("launch_small_home_ms", "launch in a one-instance home (host only)",
                              "o:"),
                             ("list_ms", "list (median)", "s-"),
                             ("list_json_ms", "list --format json (median)", "s--"),
                             ("info_ms", "info (median)", "^-")):
        ax1.plot(xs, [float("nan") if p.get(key) is None else p[key] for p in s], mark,
                 label=label)
    ax1.axhline(TARGET_LIST_MS, color="red", linestyle="--",
                label=f"list target {TARGET_LIST_MS:.0f} ms")
    if s:
        base = s[0]["launch_ms"]
        ax1.axhline(base * TARGET_LAUNCH_GROWTH, color="orange", linestyle="--",
                    label=f"launch target: {s[0]['count']}-instance launch + 10 %")
    ax1.set_xlabel("instances on the host")
    ax1.set_ylabel("ms (warm command server)")
    ax1.set_title("command cost against instance count")
    ax1.legend(fontsize=8)
    fill = report["fill"]
    ax2.plot([f["count_after"] for f in fill], [f["ms"] for f in fill], ".", markersize=3,
             label="each launch of the fill loop")
    if s:
        ax2.axhline(s[0]["launch_ms"] * TARGET_LAUNCH_GROWTH, color="orange", linestyle="--",
                    label="launch target")
    ax2.set_xlabel("instances after the launch")
    ax2.set_ylabel("ms")
    ax2.set_title("every launch")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, write results, print the summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--max", type=int, default=500, help="instances to reach; default 500")
    ap.add_argument("--runs", type=int, default=7, help="list/info runs per count; default 7")
    ap.add_argument("--launch-runs", type=int, default=21,
                    help="extra launches (each deleted) per count, in each home; default 21")
    ap.add_argument("--no-profile", action="store_true", help="skip the cProfile of list/info")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = ap.parse_args(argv)
    if args.max < 1 or args.runs < 1 or args.launch_runs < 1:
        ap.error("--max, --runs and --launch-runs must be at least 1")
    if os.geteuid() != 0:
        print("scaling.py: needs root (containers)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)
    load_start = list(os.getloadavg())
    env, ref = Env(), Env()
    try:
        data = run(args, env, ref)
        report = analyse(data, args, env, load_start)
    except BenchError as exc:
        print(f"scaling.py: {exc}", file=sys.stderr)
        return 1
    finally:
        env.cleanup()
        ref.cleanup()
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(report, indent=2) + "\n"
    (args.out / f"scaling-{stamp}.json").write_text(text)
    (args.out / "scaling-latest.json").write_text(text)
    plot(report, args.out / "scaling-latest.png")
    print(json.dumps({"summary": [{k: v for k, v in p.items() if k != "pieces_ms"}
                                  for p in report["summary"]],
                      "verdict": report["verdict"], "broke": report["broke"]}, indent=1))
    print(f"results: {args.out / f'scaling-{stamp}.json'}, scaling-latest.json, "
          "scaling-latest.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
