"""Helpers shared by the benchmarks in bench/ (boot.py, containers.py).

Paths of the repository and its venv, the error type, rounding and summary
statistics, public temp directories and timing a command to completion.
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
POPEK = str(VENV_BIN / "popek")
PYTHON = str(VENV_BIN / "python")
CACHE = REPO / ".cache" / "popek"
RESULTS = REPO / "bench" / "results"


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says which and why."""


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 2)


def _median(xs: Sequence[float]) -> float | None:
    return round(statistics.median(xs), 2) if xs else None


def _summary(xs: Sequence[float]) -> dict[str, float | int | None]:
    if not xs:
        return {"n": 0, "median": None, "min": None, "max": None, "stdev": None}
    return {
        "n": len(xs), "median": _median(xs), "min": round(min(xs), 2), "max": round(max(xs), 2),
        "stdev": round(statistics.stdev(xs), 2) if len(xs) > 1 else None,
    }


def _mkdir_public(prefix: str) -> Path:
    """A fresh directory that unprivileged uids may traverse (0755), beside the default home.

    Under /var/lib, where popek keeps its state by default (/var/lib/popek):
    file systems differ per directory on some hosts (on the development
    machine, /var/tmp creates a symlink in 0.5 ms, /var/lib in 0.02 ms).
    """
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/lib"))
    d.chmod(0o755)
    return d


def time_cmd(argv: list[str], env: dict[str, str], n: int) -> list[float]:
    """Median-ready samples (ms) of running ``argv`` to completion ``n`` times."""
    samples: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=True)
        samples.append(_ms(time.perf_counter() - t0))
    return samples


COLD = {"POPEK_CLI_SERVER": "off"}


def command_server(env: dict[str, str], wait_s: float = 20.0) -> dict[str, int | None]:
    """Start popek's warm command server (any root command does) and return its pid and RSS.

    The ``popek_cli`` contestants run through it, as every root ``popek`` command
    does by default; ``*_cold`` contestants set ``POPEK_CLI_SERVER=off``.
    """
    subprocess.run([POPEK, "list"], env=env, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    deadline = time.monotonic() + wait_s
    while True:
        res = subprocess.run([POPEK, "command-server", "status"], env=env, capture_output=True,
                             text=True, check=False)
        if res.returncode == 0:
            pid = int(res.stdout.split("pid ")[1].rstrip(".\n"))
            return {"pid": pid, "rss_kib": rss_kib(pid)}
        if time.monotonic() > deadline:
            raise BenchError(f"the command server did not start: {res.stdout}{res.stderr}")
        time.sleep(0.1)


def rss_kib(pid: int) -> int | None:
    """Resident memory of ``pid`` in KiB, ``None`` when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


# What any Python process that launches an instance must import before it does
# anything of popek's: the store, hashing, records, child processes, paths.
LAUNCH_STDLIB = "sqlite3, json, hashlib, subprocess, dataclasses, pathlib, enum"
FLOOR_STEPS = {
    "python -c pass": "pass",
    f"import {LAUNCH_STDLIB}": f"import {LAUNCH_STDLIB}",
    "import typer (the mandated CLI framework; the instance verbs skip it)": "import typer",
    "import popek.cli.main (the Typer CLI: other commands, --help, usage errors)":
        "import popek.cli.main",
    "import what popek launch imports (cli.fastpath, cli.ops, core, trust, both engines)":
        "import popek.cli.fastpath, popek.cli.ops, popek.core.instances, popek.trust.imagesig, "
        "popek.trust.policy, popek.trust.measure, popek.trust.audit, popek.engines.qemu.engine, "
        "popek.engines.container.engine",
}


def python_floor(env: dict[str, str], n: int) -> dict[str, dict[str, float | int | None]]:
    """The fixed cost of a Python CLI on this host: interpreter, stdlib, Typer, popek's CLI.

    Any ``popek`` command pays these before its own work; the report shows them
    next to popek's added time so a reader sees which part popek's code controls.
    """
    return {label: _summary(time_cmd([PYTHON, "-c", stmt], env, n))
            for label, stmt in FLOOR_STEPS.items()}
