"""Benchmark of volume snapshots and clones on a ``dir`` pool (issue 15, "Benchmark").

The issue: "snapshot and clone time for 1 GiB and 16 GiB volumes (target:
flat, under 200 ms on dir)".  For each size a block volume of a private
POPEK_HOME's pool ``local`` gets data in every MiB of it (64 KiB each, so
that its qcow2 tables are full, as on a disk in use), then in each of
``--runs`` rounds:

- **popek**: ``Storage.snapshot_volume`` (intent, rename, overlay, outcome)
  and ``Storage.clone_volume`` of that snapshot, in this process, as the CLI
  and the API run them;
- **qemu-img** (the raw engine, same round, same files): ``qemu-img create
  -b`` of an overlay on the volume's current file, what both operations
  cost the engine itself.

Reported: the medians per size, popek over qemu-img as ratios, the 16 GiB
median over the 1 GiB one (flat: near 1), and whether both sizes are under
200 ms.  Results: ``bench/results/storage-snap-<UTC>.json`` and
``storage-snap-latest.{json,png}``.
Run as root or not: ``.venv/bin/python bench/storage_snap.py [--runs N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, _summary

TARGET_MS = 200.0
GiB = 1 << 30
MiB = 1 << 20


def fill(path: Path, size: int) -> None:
    """Write 64 KiB of data at the start of every MiB of the qcow2 file ``path``."""
    commands = "".join(f"write -P 0x5a {off} 64k\n" for off in range(0, size, MiB))
    subprocess.run(["qemu-io", "-f", "qcow2", str(path)], input=commands + "quit\n",
                   capture_output=True, text=True, check=True)


def ms_since(t: float) -> float:
    return (time.perf_counter() - t) * 1000


def one_size(size: int, runs: int) -> dict[str, Any]:
    """Rounds of popek's snapshot and clone and qemu-img's overlay on a filled volume."""
    from popek.state.store import SQLiteStore
    from popek.storage.service import Storage, storage_dir

    store = SQLiteStore(Path(os.environ["POPEK_HOME"]) / "state.db")
    storage = Storage(store)
    name = f"v{size // GiB}g"
    storage.create_volume("local", "default", name, size)
    d = storage_dir() / "local" / "default"
    fill(d / f"{name}.qcow2", size)
    snap, clone, raw = [], [], []
    for i in range(runs):
        t = time.perf_counter()
        storage.snapshot_volume("local", "default", name, f"r{i}")
        snap.append(ms_since(t))
        t = time.perf_counter()
        storage.clone_volume("local", "default", name, f"r{i}", f"{name}-c{i}")
        clone.append(ms_since(t))
        overlay = d / f"raw-{i}.qcow2"
        t = time.perf_counter()
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", f"{name}.qcow2",
                        "-F", "qcow2", str(overlay)], check=True, cwd=d)
        raw.append(ms_since(t))
        overlay.unlink()
    for i in range(runs):
        storage.delete_volume("local", "default", f"{name}-c{i}")
    used = sum(f.stat().st_blocks * 512 for f in d.glob(f"{name}*.qcow2"))
    store.close()
    return {"size": size, "data_bytes": used, "snapshot_ms": _summary(snap),
            "clone_ms": _summary(clone), "qemu_img_overlay_ms": _summary(raw),
            "samples": {"snapshot": snap, "clone": clone, "qemu_img_overlay": raw}}


def analyse(sizes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios against qemu-img, flatness (16 GiB over 1 GiB) and the verdict."""
    def med(key: str, s: str) -> float:
        return float(sizes[s][key]["median"])

    out: dict[str, Any] = {"ratios": {}, "flat": {}, "verdict": {}}
    for s in sizes:
        out["ratios"][s] = {k: round(med(f"{k}_ms", s) / med("qemu_img_overlay_ms", s), 2)
                            for k in ("snapshot", "clone")}
        out["verdict"][f"under_{TARGET_MS:g}_ms_{s}"] = all(
            med(f"{k}_ms", s) < TARGET_MS for k in ("snapshot", "clone"))
    if "1GiB" in sizes and "16GiB" in sizes:
        out["flat"] = {k: round(med(f"{k}_ms", "16GiB") / med(f"{k}_ms", "1GiB"), 2)
                       for k in ("snapshot", "clone")}
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(report["sizes"])
    kinds = [("snapshot_ms", "popek snapshot"), ("clone_ms", "popek clone"),
             ("qemu_img_overlay_ms", "qemu-img overlay")]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.25
    for k, (key, label) in enumerate(kinds):
        ax.bar([i + k * width for i in range(len(sizes))],
               [report["sizes"][s][key]["median"] for s in sizes], width, label=label)
    ax.axhline(TARGET_MS, color="red", linestyle="--", label=f"target {TARGET_MS:g} ms")
    ax.set_xticks([i + width for i in range(len(sizes))], sizes)
    ax.set_ylabel("median ms")
    ax.set_title("Snapshot and clone of a filled block volume (dir pool)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run both sizes, write the results, print the summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=9, help="rounds per size; default 9")
    ap.add_argument("--sizes", default="1,16", help="volume sizes in GiB; default 1,16")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be positive")
    home = Path(tempfile.mkdtemp(prefix="popek-bench-snap-", dir="/var/tmp"))
    os.environ["POPEK_HOME"] = str(home)
    started = datetime.now(UTC)
    try:
        sizes = {f"{g}GiB": one_size(int(g) * GiB, args.runs) for g in args.sizes.split(",")}
    finally:
        shutil.rmtree(home, ignore_errors=True)
    report = {"claim": f"snapshot and clone flat in the size, under {TARGET_MS:g} ms on dir",
              "config": {"runs": args.runs, "data": "64 KiB in every MiB"},
              "host": {"nproc": os.cpu_count(), "load": list(os.getloadavg()),
                       "started": started.isoformat(timespec="seconds")},
              "sizes": sizes, **analyse(sizes)}
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(report, indent=1) + "\n"
    (args.out / f"storage-snap-{stamp}.json").write_text(text)
    (args.out / "storage-snap-latest.json").write_text(text)
    plot(report, args.out / "storage-snap-latest.png")
    print(json.dumps({s: {k: v["median"] for k, v in d.items() if k.endswith("_ms")}
                      for s, d in sizes.items()}, indent=1))
    print(json.dumps({k: report[k] for k in ("ratios", "flat", "verdict")}, indent=1))
    print(f"results: {args.out / f'storage-snap-{stamp}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
