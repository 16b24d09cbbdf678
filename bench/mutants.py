"""Mutation testing of popek's security-critical logic (``make mutants``).

Runs mutmut (pinned in the dev dependencies, configured in pyproject.toml's
``[tool.mutmut]``) over the modules in :data:`MODULES` against the fast unit
suite (``tests/unit``).  mutmut copies ``src/`` and ``tests/`` into
``mutants/`` and mutates the copy, never ``src/`` in place; for each mutant it
runs only the unit tests that reached the mutated function in a first, traced
run of the suite.

Then it reads mutmut's per-file results and writes
``bench/results/mutants-latest.json`` (score per module and in total, every
surviving mutant with its diff and, where ``bench/mutants-explained.toml``
has one, the reason it is allowed to survive) and a bar plot
``bench/results/mutants-latest.png``.

Exit status: 0 when the score of the modules run is at least ``--target``
(90 %) and every survivor is explained; 1 otherwise; 2 when mutmut itself
failed.

    python bench/mutants.py                       # every module
    python bench/mutants.py --modules units,lifecycle
    make mutants MODULES=ipam,audit
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MUTMUT = REPO / ".venv" / "bin" / "mutmut"
ROOT = REPO  # where mutmut runs (--workdir changes it)
WORK = ROOT / "mutants"
RESULTS = REPO / "bench" / "results"
EXPLAINED = REPO / "bench" / "mutants-explained.toml"

#: module name -> the source files it covers (a glob relative to the repository).
#: pyproject.toml's [tool.mutmut] only_mutate lists the same globs.
MODULES: dict[str, str] = {
    "nft": "src/popek/network/nft.py",
    "ipam": "src/popek/network/ipam*.py",
    "imagesig": "src/popek/trust/imagesig*.py",
    "audit": "src/popek/trust/audit*.py",
    "policy": "src/popek/trust/policy*.py",
    "lifecycle": "src/popek/core/lifecycle*.py",
    "units": "src/popek/units.py",  # size parsing (parse_size, format_size)
    "seccomp": "src/popek/engines/seccomp*.py",
}

#: mutmut's exit codes per mutant (mutmut.stats.status_by_exit_code, 3.8.1)
KILLED = {1, 3, 24, -24, 152, 255, 36, 37}   # failed, error, timeout, caught by type check
SURVIVED = {0}
NO_TESTS = {5, 33}
SKIPPED = {34}


class MutantsError(RuntimeError):
    """mutmut failed or left no results; the message says which step."""


def mutant_glob(path_glob: str) -> str:
    """The glob of mutmut's mutant names for a source path glob.

    ``src/popek/network/ipam*.py`` -> ``popek.network.ipam*.*``.
    """
    dotted = path_glob.removeprefix("src/").removesuffix(".py").replace("/", ".")
    return dotted + ".*"


def check_config(modules: dict[str, str]) -> None:
    """pyproject.toml's only_mutate must list the same globs as MODULES."""
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mutmut"]
    if sorted(conf["only_mutate"]) != sorted(modules.values()):
        raise MutantsError("pyproject.toml [tool.mutmut] only_mutate and bench/mutants.py "
                           f"MODULES differ: {conf['only_mutate']} vs {list(modules.values())}")


def prepare_workdir(root: Path) -> None:
    """A directory to run mutmut in besides the checkout (two runs at once need two).

    It holds links to ``src`` and ``tests`` and a copy of pyproject.toml;
    mutmut makes its own ``mutants/`` copy inside it.
    """
    root.mkdir(parents=True, exist_ok=True)
    for name in ("src", "tests"):
        link = root / name
        if not link.is_symlink():
            link.symlink_to(REPO / name)
    shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")


def run_mutmut(names: list[str], max_children: int, log: Path) -> None:
    """``mutmut run`` for the mutant-name globs ``names``, output to ``log`` and stdout."""
    if not MUTMUT.exists():
        raise MutantsError(f"{MUTMUT} is missing: run `make setup`")
    argv = [str(MUTMUT), "run", "--max-children", str(max_children), *names]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    with log.open("w") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            # mutmut redraws a progress line with \r; print only the finished lines
            if not line.startswith("\r") or line.rstrip().endswith("done"):
                sys.stdout.write(line.split("\r")[-1])
                sys.stdout.flush()
        rc = proc.wait()
    if rc != 0:
        raise MutantsError(f"mutmut run exited {rc}; see {log}")


def load_results(modules: dict[str, str]) -> dict[str, dict[str, int | None]]:
    """module -> {mutant name: mutmut exit code} from mutants/**/*.meta."""
    out: dict[str, dict[str, int | None]] = {m: {} for m in modules}
    for meta in sorted(WORK.rglob("*.py.meta")):
        src = str(meta.relative_to(WORK)).removesuffix(".meta")
        for mod, pattern in modules.items():
            if fnmatch.fnmatch(src, pattern):
                codes = json.loads(meta.read_text())["exit_code_by_key"]
                out[mod].update(codes)
                PATHS.update(dict.fromkeys(codes, src))
    return out


#: mutant name -> its source file (relative, as mutmut names it), filled by load_results
PATHS: dict[str, str] = {}


def diff_of(name: str) -> str:
    """The mutant's diff against the source, as ``mutmut show`` prints it.

    In-process (``mutmut show`` costs a second per call, and nft has hundreds).
    """
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    cwd = Path.cwd()
    os.chdir(ROOT)
    try:
        return str(get_diff_for_mutant(name, path=PATHS[name]))
    except Exception:  # an older layout: ask the command
        proc = subprocess.run([str(MUTMUT), "show", name], cwd=ROOT, capture_output=True,
                              text=True, check=False)
        return "\n".join(line for line in proc.stdout.splitlines() if not line.startswith("# "))
    finally:
        os.chdir(cwd)


def load_explanations() -> dict[str, str]:
    if not EXPLAINED.exists():
        return {}
    data = tomllib.loads(EXPLAINED.read_text())
    return {str(k): str(v) for k, v in data.get("explanations", {}).items()}


def summarize(codes: dict[str, int | None], explanations: dict[str, str],
              with_diffs: bool = True) -> dict[str, Any]:
    """Counts, score and survivors of one module's mutants."""
    killed = sorted(n for n, c in codes.items() if c in KILLED)
    survived = sorted(n for n, c in codes.items() if c in SURVIVED)
    no_tests = sorted(n for n, c in codes.items() if c in NO_TESTS)
    skipped = sorted(n for n, c in codes.items() if c in SKIPPED)
    other = sorted(n for n in codes if n not in {*killed, *survived, *no_tests, *skipped})
    # a mutant no test reaches, or one that was not checked, survived as far as the
    # score is concerned; skipped ones (do-not-mutate) are left out of it
    alive = sorted([*survived, *no_tests, *other], key=_natural)
    counted = len(codes) - len(skipped)
    score = round(100.0 * len(killed) / counted, 1) if counted else None
    survivors = []
    for n in alive:
        entry: dict[str, Any] = {"name": n, "status": _status(codes[n])}
        if with_diffs:
            entry["diff"] = diff_of(n)
        if n in explanations:
            entry["explanation"] = explanations[n]
        survivors.append(entry)
    explained = sum(1 for s in survivors if "explanation" in s)
    return {
        "total": len(codes), "killed": len(killed), "survived": len(survived),
        "no_tests": len(no_tests), "skipped": len(skipped), "other": len(other),
        "score_pct": score,
        "explained": explained, "unexplained": len(survivors) - explained,
        "survivors": survivors,
    }


def _status(code: int | None) -> str:
    if code in SURVIVED:
        return "survived"
    if code in NO_TESTS:
        return "no tests"
    return f"not checked (exit code {code})"


def _natural(name: str) -> tuple[str, int]:
    head, _, num = name.rpartition("__mutmut_")
    return (head, int(num) if num.isdigit() else 0)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mods = list(report["modules"])
    killed = [report["modules"][m]["killed"] / max(report["modules"][m]["total"], 1) * 100
              for m in mods]
    explained = [report["modules"][m]["explained"] / max(report["modules"][m]["total"], 1) * 100
                 for m in mods]
    unexplained = [report["modules"][m]["unexplained"] / max(report["modules"][m]["total"], 1)
                   * 100 for m in mods]
    labels = [f"{m}\n({report['modules'][m]['total']})" for m in mods]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(mods) + 2), 4.2))
    ax.bar(labels, killed, color="#2e8b57", label="killed")
    ax.bar(labels, explained, bottom=killed, color="#e0b040", label="survived, explained")
    ax.bar(labels, unexplained, bottom=[k + e for k, e in zip(killed, explained, strict=True)],
           color="#c0392b", label="survived, unexplained")
    for i, m in enumerate(mods):
        ax.text(i, 2, f"{report['modules'][m]['score_pct']}%", ha="center", color="white",
                fontsize=8)
    ax.axhline(report["target_pct"], color="black", linestyle="--", linewidth=1,
               label=f"target {report['target_pct']:.0f}% killed")
    total = report["total"]
    ax.set_title(f"popek mutation score (mutmut): {total['killed']}/{total['total']} killed "
                 f"= {total['score_pct']}%, {total['unexplained']} unexplained survivors",
                 fontsize=10)
    ax.set_ylabel("% of mutants")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modules", default=os.environ.get("MODULES", ""),
                    help=f"comma-separated subset of: {', '.join(MODULES)} (default: all)")
    ap.add_argument("--max-children", type=int, default=1,
                    help="mutants tested in parallel (default 1: the host is shared)")
    ap.add_argument("--target", type=float, default=90.0, help="required %% of mutants killed")
    ap.add_argument("--keep", action="store_true",
                    help="reuse mutants/ from the last run (mutmut retests only what changed)")
    ap.add_argument("--report-only", action="store_true",
                    help="do not run mutmut, only write the report from mutants/")
    ap.add_argument("--fresh", action="store_true",
                    help="do not carry over the last results of the modules not run")
    ap.add_argument("--workdir", type=Path,
                    help="run mutmut in this directory instead of the checkout")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    global ROOT, WORK
    if args.workdir is not None:
        ROOT = args.workdir.resolve()
        WORK = ROOT / "mutants"

    chosen = [m.strip() for m in args.modules.split(",") if m.strip()] or list(MODULES)
    unknown = [m for m in chosen if m not in MODULES]
    if unknown:
        ap.error(f"unknown module(s) {', '.join(unknown)}; allowed: {', '.join(MODULES)}")
    modules = {m: MODULES[m] for m in chosen}
    check_config(MODULES)

    started = time.monotonic()
    try:
        if not args.report_only:
            if args.workdir is not None:
                prepare_workdir(ROOT)
            if not args.keep and WORK.exists():
                shutil.rmtree(WORK)  # a fresh copy of src/ and tests/ as they are now
            WORK.mkdir(exist_ok=True)
            run_mutmut([mutant_glob(p) for p in modules.values()], args.max_children,
                       WORK / "run.log")
        results = load_results(modules)
    except MutantsError as e:
        print(f"mutants: {e}", file=sys.stderr)
        return 2
    runtime = round(time.monotonic() - started, 1)
    missing = [m for m, codes in results.items() if not codes]
    if missing:
        print(f"mutants: no results for {', '.join(missing)} in {WORK}", file=sys.stderr)
        return 2

    explanations = load_explanations()
    generated = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    per_module: dict[str, dict[str, Any]] = {}
    for m in modules:
        per_module[m] = {"generated": generated, "run_modules": list(modules),
                         "run_runtime_s": None if args.report_only else runtime,
                         **summarize(results[m], explanations)}
    # modules not run this time keep their last result (make mutants MODULES=x updates x)
    previous = args.out / "mutants-latest.json"
    if previous.exists() and not args.fresh:
        old = json.loads(previous.read_text()).get("modules", {})
        for m in MODULES:
            if m not in per_module and m in old:
                entry = old[m]
                for sv in entry["survivors"]:  # explanations may have changed since
                    sv.pop("explanation", None)
                    if sv["name"] in explanations:
                        sv["explanation"] = explanations[sv["name"]]
                entry["explained"] = sum(1 for sv in entry["survivors"] if "explanation" in sv)
                entry["unexplained"] = len(entry["survivors"]) - entry["explained"]
                per_module[m] = entry
    per_module = {m: per_module[m] for m in MODULES if m in per_module}
    keys = ("total", "killed", "survived", "no_tests", "skipped", "other", "explained",
            "unexplained")
    total: dict[str, Any] = {k: sum(int(e[k]) for e in per_module.values()) for k in keys}
    counted = total["total"] - total["skipped"]
    total["score_pct"] = round(100.0 * total["killed"] / counted, 1) if counted else None
    survivor_names = {s["name"] for mod in per_module.values() for s in mod["survivors"]}
    stale = sorted(n for n in explanations
                   if n not in survivor_names and any(fnmatch.fnmatch(n, mutant_glob(p))
                                                      for p in modules.values()))
    report: dict[str, Any] = {
        "generated": generated,
        "tool": "mutmut 3.8.1 (pyproject.toml [tool.mutmut]), tests: tests/unit",
        "command": "python bench/mutants.py " + " ".join(argv if argv is not None
                                                           else sys.argv[1:]),
        "modules_run": list(modules),
        "max_children": args.max_children,
        "runtime_s": None if args.report_only else runtime,
        "target_pct": args.target,
        "modules": per_module,
        "total": total,
        "stale_explanations": stale,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mutants-latest.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "mutants-latest.png")

    print(f"\n{'module':<10} {'mutants':>7} {'killed':>6} {'score':>7} {'explained':>9} "
          f"{'unexplained':>11}")
    for m, s in [*per_module.items(), ("TOTAL", total)]:
        print(f"{m:<10} {s['total']:>7} {s['killed']:>6} {s['score_pct']!s:>6}% "
              f"{s['explained']:>9} {s['unexplained']:>11}")
    for m in modules:
        for sv in per_module[m]["survivors"]:
            if "explanation" not in sv:
                print(f"unexplained survivor ({m}): {sv['name']}\n{sv['diff']}\n")
    if stale:
        print(f"explanations for mutants that no longer survive: {', '.join(stale)}")
    print(f"runtime {runtime} s; results: {args.out / 'mutants-latest.json'}, "
          f"mutants-latest.png")
    ok = total["score_pct"] is not None and total["score_pct"] >= args.target
    return 0 if ok and total["unexplained"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
