"""Reading a container's cgroup usage on cgroup v1 (and hybrid) and v2 hosts.

The OCI runtime creates the cgroups and applies limits; popek only reads
usage here.  The layout is detected once: a pure v2 host has ``cgroup2``
mounted at /sys/fs/cgroup; a v1 or hybrid host has one hierarchy per
controller under /sys/fs/cgroup/<controller>.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from popek.engines.cgroupfs import ROOT, counters, is_v2

CGROUP2_MAGIC = 0x63677270
__all__ = ["ROOT", "Usage", "frozen", "is_v2", "remove", "usage"]


@dataclass(frozen=True)
class Usage:
    """Current resource usage of one container."""

    memory: int | None
    memory_limit: int | None
    pids: int | None
    pids_limit: int | None
    cpu_seconds: float | None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _limit(value: int | None) -> int | None:
    # v1 reports "no limit" as a huge page-aligned number
    return None if value is None or value >= (1 << 62) else value


def usage(cgroups_path: str, root: Path = ROOT) -> Usage:
    """Read usage and limits of the cgroup at ``cgroups_path`` (as given to the runtime).

    CPU time and memory are :func:`popek.engines.cgroupfs.counters`' (what
    ``/metrics`` shows too); the limits and the task count are read here.
    """
    rel = cgroups_path.lstrip("/")
    used = counters(rel, root)
    if is_v2(root):
        d = root / rel
        return Usage(used.memory, _limit(_read_int(d / "memory.max")),
                     _read_int(d / "pids.current"), _limit(_read_int(d / "pids.max")),
                     used.cpu_seconds)
    return Usage(
        used.memory,
        _limit(_read_int(root / "memory" / rel / "memory.limit_in_bytes")),
        _read_int(root / "pids" / rel / "pids.current"),
        _limit(_read_int(root / "pids" / rel / "pids.max")),
        used.cpu_seconds,
    )


def frozen(cgroups_path: str, root: Path = ROOT) -> bool | None:
    """Whether the freezer holds the cgroup at ``cgroups_path`` frozen (what ``runc state``
    reports as ``paused``): v2 ``cgroup.events`` says ``frozen 1``, v1 ``freezer.state``
    says ``FROZEN``.  ``None`` when the cgroup cannot be read (gone)."""
    rel = cgroups_path.strip("/")
    try:
        if is_v2(root):
            events = (root / rel / "cgroup.events").read_text().split("\n")
            return "frozen 1" in events
        return (root / "freezer" / rel / "freezer.state").read_text().strip() == "FROZEN"
    except OSError:
        return None


def remove(cgroups_path: str, root: Path = ROOT) -> None:
    """Remove the (empty) cgroup directories of a deleted container, on v1 or v2."""
    rel = cgroups_path.lstrip("/")
    dirs = [root / rel] if is_v2(root) else [p / rel for p in root.iterdir() if p.is_dir()]
    for d in dirs:
        if d.is_dir():
            with contextlib.suppress(OSError):
                os.rmdir(d)
