"""Benchmark of the trust controls: image verification and the audit log.

1. **Verification cost.**  A signed VM image of about 100 MiB and of 1 GiB
   (the minimal kernel, its initrd padded with zeros, which the guest kernel
   skips) is launched in one long-lived Python process, A/B alternated:
   *verified* is popek as shipped (signature check, kernel and initrd copied
   into the instance directory while their SHA-256 is computed); *off*
   replaces the check by nothing and the verified copy by a hard link (what
   a launch that trusts the files would do; this switch exists only here).
   Reported: launch-to-ready medians, the verification step itself
   (median), and that step as a share of the unverified launch.  Target:
   under 10 % for the small image.  TCG boots vary by about a second, so
   the step's own time is the figure to read; the A/B medians are context.
2. **Audit throughput.**  Records appended per second (each one fsynced,
   with the head written to the state store), and the time to verify the
   whole log.

Results: ``bench/results/trust-<UTC>.json`` and ``trust-latest.{json,png}``.
Run as root: ``.venv/bin/python bench/trust.py [--runs N] [--sizes 100,1024]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, POPEK, RESULTS, BenchError, _mkdir_public, _summary

TARGET_SHARE = 0.10
MiB = 1 << 20


def _run(argv: list[str], env: dict[str, str], timeout: float = 900) -> None:
    import subprocess

    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed: {proc.stderr.strip()[-400:]}")


def padded_image(home: Path, base: Path, name: str, total_mib: int) -> None:
    """Copy the minimal image as ``name`` with its initrd padded to ``total_mib`` in all."""
    from popek.images.image import hash_file
    from popek.images.manifest import Manifest

    dst = home / "images" / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(base, dst)
    (dst / "manifest.sig").unlink(missing_ok=True)
    (dst / "rootfs.tar").unlink(missing_ok=True)
    m = Manifest.from_json((dst / "manifest.json").read_text())
    kernel_size = m.files[m.kernel].size
    initrd = dst / m.initrd
    want = total_mib * MiB - kernel_size
    with open(initrd, "ab") as f:
        chunk = bytes(MiB)
        while f.tell() < want:
            f.write(chunk[: min(MiB, want - f.tell())])
    files = {k: v for k, v in m.files.items() if k != m.rootfs}
    files[m.initrd] = hash_file(initrd)
    new = Manifest(name=name, version=m.version, created=m.created, kernel=m.kernel,
                   initrd=m.initrd, cmdline=m.cmdline, files=files,
                   kernel_version=m.kernel_version, arch=m.arch)
    (dst / "manifest.json").write_text(new.to_json())


@contextmanager
def verification_off() -> Iterator[None]:
    """Launch without any check: no signature check, hard links instead of verified copies."""
    from popek.core.guard import Guard
    from popek.images.image import Image
    from popek.trust.imagesig import Verdict

    saved_image, saved_copy = Guard.image, Image.copy_verified

    def no_check(self: Guard, image: Image, asked: str, project: str) -> Verdict:
        return Verdict(False, "", "", 0, "", "not checked (benchmark)")

    def link(self: Image, role: str, dest: Path) -> None:
        os.link(self.file(role), dest)

    Guard.image = no_check  # type: ignore[method-assign]
    Image.copy_verified = link  # type: ignore[method-assign]
    try:
        yield
    finally:
        Guard.image = saved_image  # type: ignore[method-assign]
        Image.copy_verified = saved_copy  # type: ignore[method-assign]


def timed_step() -> tuple[Callable[[], None], list[float]]:
    """Wrap Guard.image and Image.copy_verified to add up their time per launch."""
    from popek.core.guard import Guard
    from popek.images.image import Image

    spent: list[float] = [0.0]
    saved = {(cls, attr): getattr(cls, attr)
             for cls, attr in ((Guard, "image"), (Image, "copy_verified"))}
    for (cls, attr), orig in saved.items():

        def wrapped(*a: Any, _orig: Any = orig, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return _orig(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t

        setattr(cls, attr, wrapped)

    def restore() -> None:
        for (cls, attr), orig in saved.items():
            setattr(cls, attr, orig)

    return restore, spent


def launch_once(name: str, image: str, memory: int) -> float:
    """Launch ``image`` as ``name`` in this process; return ms to ready; delete it."""
    from popek.core.instances import Instances

    insts = Instances()
    t = time.perf_counter()
    insts.launch(image, name, memory=memory, ready_timeout=600)
    ms = (time.perf_counter() - t) * 1000
    insts.delete(name, force=True)
    return ms


def bench_verification(home: Path, sizes: list[int], runs: int) -> dict[str, Any]:
    """The A/B launches and the verification step, per image size."""
    out: dict[str, Any] = {}
    for size in sizes:
        name = f"pad{size}"
        memory = max(512, 2 * size + 256) * MiB
        on, off, step = [], [], []
        for r in range(runs + 1):  # round 0 warms the page cache, not recorded
            order = ("on", "off") if r % 2 else ("off", "on")
            for mode in order:
                if mode == "off":
                    with verification_off():
                        ms = launch_once(f"b{size}x{r}", name, memory)
                    if r:
                        off.append(ms)
                else:
                    restore, spent = timed_step()
                    try:
                        ms = launch_once(f"b{size}v{r}", name, memory)
                    finally:
                        restore()
                    if r:
                        on.append(ms)
                        step.append(spent[0] * 1000)
            if r:
                print(f"{size} MiB round {r}/{runs}: verified {on[-1]:.0f} ms "
                      f"(step {step[-1]:.0f}), off {off[-1]:.0f} ms", flush=True)
        share = (statistics.median(step) / statistics.median(off)) if off else None
        out[f"{size}MiB"] = {
            "image_bytes": size * MiB, "guest_memory": memory,
            "launch_to_ready_ms_verified": _summary(on),
            "launch_to_ready_ms_off": _summary(off),
            "verification_step_ms": _summary(step),
            "verification_share_of_unverified_launch": round(share, 4) if share else None,
            "verification_mib_per_s": round(size / (statistics.median(step) / 1000), 1)
            if step else None,
        }
    return out


def bench_audit(home: Path, n: int, batches: int) -> dict[str, Any]:
    """Appends per second and the time to verify the resulting log."""
    from popek.state.store import SQLiteStore
    from popek.trust.audit import AuditLog
    from popek.trust.keys import TrustStore

    log = AuditLog(TrustStore(SQLiteStore(home / "state.db")))
    rates = []
    for b in range(batches):
        t = time.perf_counter()
        for i in range(n):
            log.append("bench.append", f"target-{i}", {"batch": b, "i": i}, "ok")
        rates.append(n / (time.perf_counter() - t))
    t = time.perf_counter()
    problems = log.verify()
    verify_ms = (time.perf_counter() - t) * 1000
    if problems:
        raise BenchError(f"audit log does not verify after the benchmark: {problems[:3]}")
    records = sum(1 for _ in log.records())
    return {"records_per_s": _summary(rates), "appends_per_batch": n, "batches": batches,
            "verify_ms": round(verify_ms, 1), "records_verified": records,
            "verify_records_per_s": round(records / (verify_ms / 1000), 1)}


def plot(rep: dict[str, Any], path: Path) -> None:
    """Launch medians (verified/off) and the verification step per size; audit rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    sizes = list(rep["verification"])
    x = range(len(sizes))
    v = rep["verification"]
    ax1.bar([i - 0.27 for i in x], [v[s]["launch_to_ready_ms_off"]["median"] for s in sizes],
            0.27, label="launch, verification off")
    ax1.bar(list(x), [v[s]["launch_to_ready_ms_verified"]["median"] for s in sizes], 0.27,
            label="launch, verified")
    ax1.bar([i + 0.27 for i in x], [v[s]["verification_step_ms"]["median"] for s in sizes],
            0.27, label="verification step")
    ax1.set_xticks(list(x), sizes)
    ax1.set_ylabel("ms (median)")
    ax1.set_title("VM launch to ready, TCG")
    ax1.legend(fontsize=8)
    a = rep["audit"]
    ax2.bar(["append", "verify"], [a["records_per_s"]["median"], a["verify_records_per_s"]])
    ax2.set_ylabel("records / s")
    ax2.set_title("audit log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="A/B rounds per size; default 5")
    ap.add_argument("--sizes", default="100,1024", help="image sizes in MiB; default 100,1024")
    ap.add_argument("--audit-records", type=int, default=300, help="appends per batch")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench/trust.py needs root (it launches VMs)")
    home = _mkdir_public("popek-bench-trust-")
    env = {**os.environ, "POPEK_HOME": str(home), "POPEK_CACHE": str(CACHE)}
    os.environ.update(POPEK_HOME=str(home), POPEK_CACHE=str(CACHE))
    try:
        print("building image minimal ...", flush=True)
        _run([POPEK, "image", "build", "minimal"], env)
        sizes = [int(s) for s in args.sizes.split(",")]
        for size in sizes:
            padded_image(home, home / "images" / "minimal", f"pad{size}", size)
            _run([POPEK, "image", "sign", f"pad{size}"], env)
        rep: dict[str, Any] = {
            "benchmark": "trust",
            "claim": "image verification streams and costs under 10% of a launch for a "
                     "100 MiB image",
            "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "rounds": args.runs, "nproc": os.cpu_count(), "loadavg_start": os.getloadavg(),
            "verification": bench_verification(home, sizes, args.runs),
            "audit": bench_audit(home, args.audit_records, 3),
        }
        small = rep["verification"].get("100MiB")
        rep["target_met"] = bool(small and small["verification_share_of_unverified_launch"]
                                 is not None and small["verification_share_of_unverified_launch"]
                                 < TARGET_SHARE)
        rep["loadavg_end"] = os.getloadavg()
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        text = json.dumps(rep, indent=2) + "\n"
        (args.out / f"trust-{stamp}.json").write_text(text)
        (args.out / "trust-latest.json").write_text(text)
        plot(rep, args.out / "trust-latest.png")
        for size, v in rep["verification"].items():
            print(f"{size}: launch verified {v['launch_to_ready_ms_verified']['median']} ms, "
                  f"off {v['launch_to_ready_ms_off']['median']} ms; verification step "
                  f"{v['verification_step_ms']['median']} ms "
                  f"({v['verification_mib_per_s']} MiB/s) = "
                  f"{100 * (v['verification_share_of_unverified_launch'] or 0):.1f}% of the "
                  "unverified launch")
        a = rep["audit"]
        print(f"audit: {a['records_per_s']['median']:.0f} appends/s (fsync each); verify "
              f"{a['records_verified']} records in {a['verify_ms']} ms")
        print(f"target (<10% for 100 MiB): {'MET' if rep['target_met'] else 'NOT MET'}")
        print(f"results: {args.out / ('trust-' + stamp + '.json')}, trust-latest.png")
    finally:
        from popek.core.instances import Instances

        for inst in Instances().all(None):
            Instances().delete(inst.name, force=True)
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
