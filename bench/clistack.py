"""What each part of the fast CLI saves: native client, command server, fast-path parser.

Issue 11, point 8: "measure what each part of the fast CLI saves today and keep
only what pays for itself".  For ``popek list`` (no instance) and ``popek info
NAME`` (one container) in a private ``POPEK_HOME``, this times (median of
``--runs``, default 20, the combinations interleaved round by round) each way
of running the same command:

========================  =========  ===========  =========
combination               client     server       parser
========================  =========  ===========  =========
native+server+fast        client.c   warm         fast path (today's default)
native+server+typer       client.c   warm         Typer (fast path skipped)
launcher+server+fast      Python -S  warm         fast path
script+server+fast        Python     warm         fast path
native+inproc+fast        client.c   none         fast path
launcher+inproc+fast      Python -S  none         fast path
native+inproc+typer       client.c   none         Typer
========================  =========  ===========  =========

*launcher* is the ``python -S`` script ``client.launcher`` writes where no C
compiler is found; *script* is what pip's console script
(``[project.scripts] popek = "popek.cli.client:main"``) runs: ``site`` and
``re`` imported, then the same client.  *inproc* is ``POPEK_CLI_SERVER=off``
(the client runs the command in its own process).  The servers are two private
command servers on private sockets (``POPEK_CLI_SOCKET``), started as
``python -I -m popek.cli.cmdserver`` is (through ``runpy``), watching no source
file (so that edits elsewhere in the checkout do not make them step down); the
second one runs Typer's ``popek.cli.main.main`` instead of ``cli.entry.main``,
which tries the fast path first.  In-process without the fast path is the
native client's fallback command line with ``cli.main.main`` in place of
``cli.entry.main``.  Writes ``bench/results/clistack-latest.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import CACHE, POPEK, PYTHON, RESULTS, BenchError, _median, _mkdir_public, _ms, _summary

REPO_SRC = str(Path(__file__).resolve().parents[1] / "src")
SERVER = """
import runpy, sys
from popek.cli import cmdserver
cmdserver.sources = lambda: []
if sys.argv[1] == "typer":
    from popek.cli import entry, main
    entry.main = main.main
runpy.run_module("popek.cli.cmdserver", run_name="__main__", alter_sys=True)
"""
#: the native client's fallback (client.c: python -S -c BOOT ARGS), entry or Typer
BOOT = ("import sys; sys.path.insert(0, {src!r})\n"
        "from popek.cli import client\n"
        "{body}\n")
BOOT_ENTRY = "client.main()"
BOOT_TYPER = ("import site; site.main()\n"
              "from popek.cli.main import main; main(sys.argv[1:])")
#: what pip's console-script wrapper runs
SCRIPT = ("import re, sys\n"
          "from popek.cli.client import main\n"
          "sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
          "sys.exit(main())\n")
COMBOS = ("native+server+fast", "native+server+typer", "launcher+server+fast",
          "script+server+fast", "native+inproc+fast", "launcher+inproc+fast",
          "native+inproc+typer")
#: the saving of each part: (name, slower combination, faster combination)
SAVINGS = (
    ("native client over the -S launcher (with server)", "launcher+server+fast",
     "native+server+fast"),
    ("native client over pip's console script (with server)", "script+server+fast",
     "native+server+fast"),
    ("command server (native client, fast path)", "native+inproc+fast", "native+server+fast"),
    ("fast path, with the server", "native+server+typer", "native+server+fast"),
    ("fast path, in-process", "native+inproc+typer", "native+inproc+fast"),
    ("native client over the -S launcher (in-process)", "launcher+inproc+fast",
     "native+inproc+fast"),
)


class Stack:
    """A private home with one container, two private servers, the clients."""

    def __init__(self) -> None:
        self.home = _mkdir_public("popek-bench-cli-")
        self.scratch = _mkdir_public("popek-bench-cli-run-")
        (self.scratch / "run").mkdir(mode=0o700)
        self.env = {**os.environ, "POPEK_HOME": str(self.home), "POPEK_CACHE": str(CACHE)}
        for k in ("PYTHONPROFILEIMPORTTIME", "TERM", "LANG", "POPEK_CLI_SERVER",
                  "POPEK_CLI_SOCKET"):
            self.env.pop(k, None)
        self.sockets = {k: str(self.scratch / "run" / f"{k}.sock") for k in ("fast", "typer")}
        self.servers: list[subprocess.Popen[bytes]] = []
        self.launcher = self.scratch / "popek-launcher"
        self.script = self.scratch / "popek-script"
        self.instance: str | None = None

    def start(self) -> None:
        """Build the image, launch one container, start both servers, write the clients."""
        from popek.cli import client

        self.launcher.write_text(client.launcher(sys.executable, REPO_SRC))
        self.script.write_text(f"#!{PYTHON}\n{SCRIPT}")
        for f in (self.launcher, self.script):
            f.chmod(0o755)
        if not (self.home / "images" / "minimal" / "manifest.json").exists():
            self.popek("image", "build", "minimal")
        self.instance = "c1"
        self.popek("launch", "minimal", "c1", "--container", "--memory", "64MiB")
        for kind, sock in self.sockets.items():
            self.servers.append(subprocess.Popen(
                [PYTHON, "-I", "-W", "ignore::RuntimeWarning", "-c", SERVER, kind],
                env={**self.env, "POPEK_CLI_SOCKET": sock},
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True))
        deadline = time.monotonic() + 60
        from popek.cli import cmdserver

        for (_kind, sock), proc in zip(self.sockets.items(), self.servers, strict=True):
            while cmdserver.control("status", sock) != f"K{proc.pid}":
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise BenchError(f"private command server on {sock} did not start")
                time.sleep(0.05)

    def popek(self, *args: str) -> str:
        """Run the installed ``popek`` with this home; raise on failure."""
        res = subprocess.run([POPEK, *args], env=self.env, capture_output=True, text=True,
                             check=False, stdin=subprocess.DEVNULL, timeout=900)
        if res.returncode != 0:
            raise BenchError(f"popek {' '.join(args)}: {res.stderr.strip()[-500:]}")
        return res.stdout

    def argv_env(self, combo: str, args: list[str]) -> tuple[list[str], dict[str, str]]:
        """The command line and environment of ``popek ARGS`` run as ``combo``."""
        client_kind, server, parser = combo.split("+")
        env = dict(self.env)
        if server == "server":
            env["POPEK_CLI_SOCKET"] = self.sockets["fast" if parser == "fast" else "typer"]
        else:
            env["POPEK_CLI_SERVER"] = "off"
        if server == "inproc" and parser == "typer":
            boot = BOOT.format(src=REPO_SRC, body=BOOT_TYPER)
            return [PYTHON, "-S", "-c", boot, *args], env
        exe = {"native": POPEK, "launcher": str(self.launcher), "script": str(self.script)}
        return [exe[client_kind], *args], env

    def close(self) -> None:
        """Delete the container, stop the private servers, remove the directories."""
        from popek.cli import cmdserver

        if self.instance is not None:
            try:
                self.popek("delete", "--force", self.instance)
            except BenchError as exc:
                print(f"clistack.py: {exc}", file=sys.stderr)
        for sock, proc in zip(self.sockets.values(), self.servers, strict=False):
            cmdserver.stop(sock)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.scratch, ignore_errors=True)
        shutil.rmtree(self.home, ignore_errors=True)


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall ms, CPU ms of the started process) of one run; raise on failure."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _pid, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise BenchError(f"{argv[:1]} {argv[-3:]}: {err.decode(errors='replace')[-400:]}")
    return _ms(wall), round((ru.ru_utime + ru.ru_stime) * 1000, 2)


def run(stack: Stack, runs: int) -> dict[str, Any]:
    """Every combination for every command, interleaved; the samples."""
    commands = {"list": ["list"], "info": ["info", stack.instance or "c1"]}
    samples: dict[str, dict[str, list[float]]] = {c: {k: [] for k in COMBOS} for c in commands}
    cpu: dict[str, dict[str, list[float]]] = {c: {k: [] for k in COMBOS} for c in commands}
    for args in commands.values():  # one unrecorded warm-up of each
        for combo in COMBOS:
            timed(*stack.argv_env(combo, args))
    for r in range(runs):
        order = list(COMBOS[r % len(COMBOS):] + COMBOS[:r % len(COMBOS)])
        for c, args in commands.items():
            for combo in order:
                wall, used = timed(*stack.argv_env(combo, args))
                samples[c][combo].append(wall)
                cpu[c][combo].append(used)
    return {"samples": samples, "client_cpu": cpu}


def analyse(data: dict[str, Any], runs: int, load: list[float]) -> dict[str, Any]:
    """Medians per combination and the saving of each part."""
    out: dict[str, Any] = {
        "benchmark": "clistack",
        "time_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "runs": runs,
        "definition": "wall time from spawning the command to its exit; median of the runs; "
                      "combinations interleaved in rotating order",
        "combinations": {}, "savings_ms": {},
        "host": {"nproc": os.cpu_count(), "kernel": platform.release(),
                 "python": platform.python_version(), "loadavg_start": load,
                 "loadavg_end": list(os.getloadavg())},
    }
    for c, by in data["samples"].items():
        out["combinations"][c] = {k: {**_summary(v), "client_cpu_ms_median":
                                      _median(data["client_cpu"][c][k])}
                                  for k, v in by.items()}
        med = {k: _median(v) for k, v in by.items()}
        out["savings_ms"][c] = {name: round((med[slow] or 0) - (med[fast] or 0), 2)
                                for name, slow, fast in SAVINGS}
    out["samples"] = data["samples"]
    return out


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, write the results, print a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=20, help="runs per combination; default 20")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("clistack.py: needs root (the clients use the server only for root)",
              file=sys.stderr)
        return 2
    load = list(os.getloadavg())
    stack = Stack()
    try:
        stack.start()
        data = run(stack, args.runs)
    except BenchError as exc:
        print(f"clistack.py: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.close()
    rep = analyse(data, args.runs, load)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(rep, indent=2) + "\n"
    (args.out / f"clistack-{stamp}.json").write_text(text)
    (args.out / "clistack-latest.json").write_text(text)
    print(f"{'':24}" + "".join(f"{c:>22}" for c in rep["combinations"]))
    for combo in COMBOS:
        print(f"{combo:24}" + "".join(
            f"{rep['combinations'][c][combo]['median']:>14.1f} (cpu {rep['combinations'][c][combo]['client_cpu_ms_median']:>4.0f})"  # noqa: E501
            for c in rep["combinations"]))
    for name, _slow, _fast in SAVINGS:
        print(f"saves: {name:55}" + "".join(f"{rep['savings_ms'][c][name]:>10.1f}"
                                             for c in rep["savings_ms"]))
    print(f"load {load} -> {rep['host']['loadavg_end']}; results {args.out}/clistack-{stamp}.json,"
          " clistack-latest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
