"""bench/idle.py: what idle VMs cost the host, against the same guest running only a shell.

The claim under test (issue 12, point 5): **an idle minimal VM uses at most
2x the host CPU of the same kernel and initramfs running only a shell**, with
16 idle VMs on the host; QEMU's memory per idle VM is reported beside it.

Two groups of ``--vms`` VMs (default 16) run at the same time, so that the
load of the host (other users, the benchmark itself) weighs on both alike:

* **popek**: ``popek launch minimal idleN --vcpus 1 --memory 128MiB``, the
  real thing (jail, vTPM, console logger, guest agent), in a private
  ``POPEK_HOME``; nothing talks to the guests after their ready line.
* **shell**: QEMU started by hand as root from the argv popek used
  (``qemu.argv.json``), with the image's kernel and initrd, the vTPM devices
  dropped (no swtpm), the console logged to a plain file, and
  ``rdinit=/bin/sh`` added to the kernel command line: the guest kernel runs
  busybox ``sh`` as its only process, waiting on the serial console.

After every guest is up and ``--settle`` seconds passed, ``--rounds``
windows of ``--window`` seconds each are measured: the CPU time (user +
system, ``/proc/PID/stat``) each QEMU used in the window, as a share of one
host CPU.  Reported: per group the median over VMs of each VM's median over
rounds, and the ratio popek/shell of those medians (the verdict), plus the
CPU of popek's helper processes per VM (swtpm, the console logger).  Memory:
``VmRSS`` and ``Pss`` (``smaps_rollup``) of every QEMU at the end, medians
per group, and the helpers' RSS.

Run as root: ``.venv/bin/python bench/idle.py [--vms 16] [--window 30]
[--rounds 3]``.  Results: ``bench/results/idle-<UTC>.json``,
``idle-latest.json`` and ``idle-latest.png``.  Everything it started is
stopped at the end, also on failure or SIGTERM.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, POPEK, RESULTS, BenchError, _mkdir_public

IMAGE = "minimal"
MEMORY = "128MiB"
TARGET_RATIO = 2.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: the vTPM's QEMU options (the shell guests have no swtpm): option -> value prefix
TPM_OPTIONS = {"-chardev": "socket,id=chrtpm,", "-tpmdev": "", "-fw_cfg": ""}
TPM_DEVICE = "tpm-crb,"


def _on_term(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def cpu_ticks(pid: int) -> int:
    """User plus system time of ``pid`` in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and Pss of ``pid`` in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            out["rss_kib"] = int(line.split()[1])
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            out["pss_kib"] = int(line.split()[1])
    return out


class Bench:
    """The private home, the popek VMs and the shell QEMUs; cleaned up at the end."""

    def __init__(self) -> None:
        self.home = _mkdir_public("popek-bench-idle-")
        self.env = {**os.environ, "POPEK_HOME": str(self.home), "POPEK_CACHE": str(CACHE)}
        self.names: list[str] = []
        self.raw: list[subprocess.Popen[bytes]] = []
        self.rawdirs: list[Path] = []

    def popek(self, *args: str, timeout: float = 600) -> str:
        res = subprocess.run([POPEK, *args], env=self.env, capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=timeout, check=False)
        if res.returncode != 0:
            raise BenchError(f"popek {' '.join(args)} exited {res.returncode}: "
                             f"{(res.stdout + res.stderr).strip()[-400:]}")
        return res.stdout

    def workdir(self, name: str) -> Path:
        return self.home / "instances" / "default" / name

    def launch(self, name: str) -> None:
        self.names.append(name)
        self.popek("launch", IMAGE, name, "--vcpus", "1", "--memory", MEMORY)

    def helpers(self, name: str) -> dict[str, int]:
        """pids of the instance's QEMU, swtpm and console logger."""
        work = self.workdir(name)
        return {role: int((work / f).read_text().strip())
                for role, f in (("qemu", "qemu.pid"), ("swtpm", "swtpm.pid"),
                                ("conlog", "conlog.pid")) if (work / f).exists()}

    def shell_argv(self, name: str, tmp: Path) -> list[str]:
        """popek's argv for ``name``, turned into the shell-only guest in ``tmp``."""
        argv: list[str] = json.loads((self.workdir(name) / "qemu.argv.json").read_text())
        work = str(self.workdir(name))
        image = self.home / "images" / IMAGE
        out: list[str] = []
        i = 0
        while i < len(argv):
            opt = argv[i]
            val = argv[i + 1] if i + 1 < len(argv) else ""
            if opt in TPM_OPTIONS and val.startswith(TPM_OPTIONS[opt]) and \
                    (opt != "-chardev" or "chrtpm" in val) and (opt != "-fw_cfg" or "popek" in val):
                i += 2
                continue
            if opt == "-device" and val.startswith(TPM_DEVICE):
                i += 2
                continue
            if opt == "-kernel":
                val = str(image / "vmlinuz")
            elif opt == "-initrd":
                val = str(image / "initrd.img")
            elif opt == "-append":
                val = f"{val} rdinit=/bin/sh"
            elif opt == "-chardev" and "logfile=" in val:
                val = val.replace(str(Path(work) / "console.fifo"), str(tmp / "console.log"))
            if opt.startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                out += [opt, val.replace(work, str(tmp))]
                i += 2
            else:
                out.append(opt)
                i += 1
        return out

    def start_shell(self, template: str, index: int) -> int:
        tmp = Path(tempfile.mkdtemp(prefix=f"popek-bench-idle-sh{index}-", dir="/var/tmp"))
        self.rawdirs.append(tmp)
        argv = self.shell_argv(template, tmp)
        log = open(tmp / "qemu.log", "wb")  # noqa: SIM115 - kept for the process' life
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             start_new_session=True, cwd=tmp)
        self.raw.append(p)
        return p.pid

    def wait_shells(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for tmp, p in zip(self.rawdirs, self.raw, strict=True):
            log = tmp / "console.log"
            while not (log.exists() and b"# " in log.read_bytes()[-4096:]):
                if p.poll() is not None:
                    raise BenchError(f"a shell guest's QEMU exited: "
                                     f"{(tmp / 'qemu.log').read_text()[-300:]}")
                if time.monotonic() > deadline:
                    raise BenchError(f"a shell guest gave no prompt in {timeout:.0f}s")
                time.sleep(0.5)

    def cleanup(self) -> None:
        for p in self.raw:
            p.kill()
            p.wait()
        for d in self.rawdirs:
            shutil.rmtree(d, ignore_errors=True)
        left = []
        for name in self.names:
            try:
                self.popek("delete", "--force", name)
            except (BenchError, subprocess.SubprocessError) as exc:
                left.append(f"{name}: {exc}")
        if left:
            print(f"idle.py: deletes failed, {self.home} kept: {left[:3]}", file=sys.stderr)
        else:
            shutil.rmtree(self.home, ignore_errors=True)


def measure(groups: dict[str, list[int]], window: float) -> dict[str, list[float]]:
    """CPU % of one host CPU used by each pid during ``window`` seconds."""
    before = {pid: cpu_ticks(pid) for pids in groups.values() for pid in pids}
    t0 = time.monotonic()
    time.sleep(window)
    elapsed = time.monotonic() - t0
    return {g: [round((cpu_ticks(pid) - before[pid]) / CLK_TCK / elapsed * 100, 3)
                for pid in pids] for g, pids in groups.items()}


def _med(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def run(args: argparse.Namespace, b: Bench) -> dict[str, Any]:
    load_start = list(os.getloadavg())
    b.popek("image", "build", IMAGE, timeout=900)
    t0 = time.monotonic()
    for i in range(args.vms):
        b.launch(f"idle{i}")
        print(f"  popek VM idle{i} ready", flush=True)
    for i in range(args.vms):
        b.start_shell("idle0", i)
    b.wait_shells(600)
    print(f"all {2 * args.vms} guests up after {time.monotonic() - t0:.0f}s; settling "
          f"{args.settle:.0f}s", flush=True)
    time.sleep(args.settle)
    pids = {name: b.helpers(name) for name in b.names}
    groups = {"popek": [pids[n]["qemu"] for n in b.names], "shell": [p.pid for p in b.raw],
              "swtpm": [pids[n]["swtpm"] for n in b.names if "swtpm" in pids[n]],
              "conlog": [pids[n]["conlog"] for n in b.names if "conlog" in pids[n]]}
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        m = measure(groups, args.window)
        rounds.append({"cpu_percent": m, "load": list(os.getloadavg())})
        print(f"  round {r + 1}: popek median {_med(m['popek'])} %, shell median "
              f"{_med(m['shell'])} %", flush=True)
    per_vm = {g: [_med([rd["cpu_percent"][g][i] for rd in rounds]) or 0.0
                  for i in range(len(groups[g]))] for g in groups}
    memory = {g: [memory_kib(pid) for pid in groups[g]] for g in groups}
    med = {g: _med(per_vm[g]) for g in groups}
    top, bottom = med["popek"], med["shell"]
    ratio = round(top / bottom, 2) if top is not None and bottom else None

    def mem_med(g: str, key: str) -> float | None:
        vals = [m[key] / 1024 for m in memory[g] if key in m]
        return round(statistics.median(vals), 1) if vals else None

    return {
        "claim": "an idle minimal VM uses at most 2x the host CPU of the same kernel and "
                 "initramfs running only a shell (rdinit=/bin/sh), with 16 idle VMs",
        "target_ratio": TARGET_RATIO,
        "ratio_popek_to_shell": ratio,
        "target_met": ratio is not None and ratio <= TARGET_RATIO,
        "cpu_percent_of_one_host_cpu_median": med,
        "cpu_percent_per_vm_median_over_rounds": per_vm,
        "memory_mib_median": {g: {"rss": mem_med(g, "rss_kib"), "pss": mem_med(g, "pss_kib")}
                              for g in groups},
        "memory_kib": memory,
        "rounds": rounds,
        "config": {"vms_per_group": args.vms, "memory": MEMORY, "vcpus": 1,
                   "window_s": args.window, "rounds": args.rounds, "settle_s": args.settle,
                   "shell_append": "image cmdline + rdinit=/bin/sh"},
        "host": {"nproc": os.cpu_count(), "kernel": platform.release(), "clk_tck": CLK_TCK,
                 "qemu": subprocess.run(["qemu-system-x86_64", "--version"],
                                        capture_output=True, text=True,
                                        check=False).stdout.splitlines()[0],
                 "load_start": load_start, "load_end": list(os.getloadavg())},
    }


def plot(report: dict[str, Any], path: Path) -> None:
    """Per-VM CPU of both groups, and QEMU memory per VM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    per_vm = report["cpu_percent_per_vm_median_over_rounds"]
    labels = ["popek (agent)", "shell only", "swtpm", "console logger"]
    data = [per_vm["popek"], per_vm["shell"], per_vm["swtpm"], per_vm["conlog"]]
    ax1.boxplot(data)
    ax1.set_xticks(range(1, len(labels) + 1), labels)
    for i, ys in enumerate(data, start=1):
        ax1.plot([i] * len(ys), ys, ".", alpha=0.5)
    shell = report["cpu_percent_of_one_host_cpu_median"]["shell"]
    if shell:
        ax1.axhline(shell * TARGET_RATIO, color="red", linestyle="--",
                    label=f"target: {TARGET_RATIO:.0f}x the shell-only median")
    ax1.set_ylabel("% of one host CPU (median over rounds)")
    ax1.set_title(f"idle CPU per VM ({report['config']['vms_per_group']} per group, TCG), "
                  f"ratio {report['ratio_popek_to_shell']}")
    ax1.legend(fontsize=8)
    mem = report["memory_mib_median"]
    groups = ["popek", "shell", "swtpm", "conlog"]
    xs = range(len(groups))
    ax2.bar([x - 0.2 for x in xs], [mem[g]["rss"] or 0 for g in groups], 0.4, label="RSS")
    ax2.bar([x + 0.2 for x in xs], [mem[g]["pss"] or 0 for g in groups], 0.4, label="PSS")
    ax2.set_xticks(list(xs), labels)
    ax2.set_ylabel("MiB per VM (median)")
    ax2.set_title(f"memory per idle VM ({MEMORY} guest)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, write results, print the summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--vms", type=int, default=16, help="VMs per group; default 16")
    ap.add_argument("--window", type=float, default=30.0, help="seconds per round; default 30")
    ap.add_argument("--rounds", type=int, default=3, help="measured windows; default 3")
    ap.add_argument("--settle", type=float, default=20.0,
                    help="seconds after the last guest is up before measuring; default 20")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = ap.parse_args(argv)
    if args.vms < 1 or args.rounds < 1 or args.window <= 0:
        ap.error("--vms and --rounds must be at least 1, --window positive")
    if os.geteuid() != 0:
        print("idle.py: needs root (popek launches VMs)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)
    b = Bench()
    try:
        report = run(args, b)
    except BenchError as exc:
        print(f"idle.py: {exc}", file=sys.stderr)
        return 1
    finally:
        b.cleanup()
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(report, indent=2) + "\n"
    (args.out / f"idle-{stamp}.json").write_text(text)
    (args.out / "idle-latest.json").write_text(text)
    plot(report, args.out / "idle-latest.png")
    print(json.dumps({k: report[k] for k in ("ratio_popek_to_shell", "target_met",
                                             "cpu_percent_of_one_host_cpu_median",
                                             "memory_mib_median")}, indent=1))
    print(f"results: {args.out / f'idle-{stamp}.json'}, idle-latest.json, idle-latest.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
