"""The memory cgroup of one sandbox (root only): what its tmpfs pages are charged to.

Without a cgroup, the pages of the sandbox's tmpfs (/tmp, /dev/shm, the
home) are charged to no limit at all, and ``RLIMIT_AS`` does not see them.
So a sandbox run by root gets a cgroup of its own,
``popek/sandbox-<popek pid>-<random>`` (unique on the host: two homes or
two runs never share one), with the profile's memory limit and swap off,
which the launcher joins before bubblewrap starts (``argv.launcher_argv``).
The kernel charges a tmpfs page to the memory cgroup of the process that
first touches it, so everything the application writes there counts against
the same limit as its own memory; past it the application gets ENOSPC (the
tmpfs are sized to share the limit) or the cgroup's OOM killer.

A cgroup whose popek process is gone (killed before it could clean up) is
removed by the next sandbox run (:func:`sweep`).
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from popek import proc
from popek.engines import cgroupfs
from popek.engines.sandbox.profile import Limits

PARENT = "popek"
NAME = re.compile(r"^sandbox-(\d+)-[0-9a-f]{8}$")
#: tasks beyond ``limits.nproc`` for the launcher, bwrap's two processes and slirp4netns
PIDS_EXTRA = 8
#: tasks when the profile sets no ``nproc``
PIDS_DEFAULT = 4096


def new_path() -> str:
    """A fresh cgroup path for one sandbox of this process."""
    return f"{PARENT}/sandbox-{os.getpid()}-{secrets.token_hex(4)}"


def limits(limits: Limits) -> cgroupfs.Limits:
    """The cgroup limits of a sandbox: its memory (swap off), all CPUs, its tasks."""
    assert limits.memory is not None
    pids = limits.nproc + PIDS_EXTRA if limits.nproc is not None else PIDS_DEFAULT
    return cgroupfs.Limits(cpus=float(os.cpu_count() or 1), memory=limits.memory, pids=pids)


def create(path: str, profile_limits: Limits, root: Path = cgroupfs.ROOT) -> list[Path]:
    """Make the cgroup ``path``; return the files the launcher writes ``0`` into to join it.

    Raises :class:`popek.errors.EngineError` (nothing is left behind).
    """
    try:
        return cgroupfs.create(path, limits(profile_limits), root)
    except Exception:
        remove(path, root)
        raise


def remove(path: str, root: Path = cgroupfs.ROOT) -> None:
    """Kill what is left in the cgroup ``path`` and remove it (a missing one is fine)."""
    cgroupfs.kill(path, root)
    cgroupfs.remove(path, root)


def sweep(root: Path = cgroupfs.ROOT) -> None:
    """Remove the sandbox cgroups whose popek process is gone."""
    dirs = cgroupfs.dirs(PARENT, root)
    if not dirs or not dirs[0].is_dir():
        return
    for entry in dirs[0].iterdir():
        m = NAME.match(entry.name)
        if m and entry.is_dir() and proc.start_time(int(m.group(1))) is None:
            remove(f"{PARENT}/{entry.name}", root)
