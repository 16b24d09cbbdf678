"""Starting QEMU jailed, detached and unprivileged.

popek does not use QEMU's ``-daemonize`` (it forks after the seccomp sandbox
is on, and ``spawn=deny`` kills it) nor ``-runas`` (it calls setuid after the
sandbox is on, and ``elevateprivileges=deny`` kills it).  Like Firecracker's
jailer, popek confines QEMU *before* exec (see ``jail.py``): a mount
namespace that holds only what QEMU needs, the instance's cgroup, and the
instance's unprivileged uid/gid (no supplementary groups but ``kvm`` when
KVM is used).  ``setsid --fork`` then puts QEMU in a session of its own
whose parent exits at once: QEMU is re-parented to init, outlives the CLI,
and never becomes a zombie child of a long-lived popek process.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from popek.engines import cgroupfs
from popek.engines.qemu import jail
from popek.errors import EngineError
from popek.proc import run

SETSID = "setsid"
#: the launcher's environment: tools by their standard paths, nothing of popek's own
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
#: how long the launcher may take (cgroup move, mounts, fork of QEMU)
TIMEOUT = 10.0


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-3:])


def spawn_jailed(argv: list[str], uid: int, gid: int, groups: Sequence[int],
                 stderr_path: Path, fstab: str, cgroup: str, limits: cgroupfs.Limits,
                 pass_fds: tuple[int, ...] = (), root: Path | None = None,
                 cpus: Sequence[int] = ()) -> None:
    """Run ``argv`` jailed as ``uid``/``gid`` in a new session, detached from the caller.

    The jail's mounts come from ``fstab``; ``cgroup`` is created with
    ``limits`` and holds QEMU from its first instruction.  The launcher
    returns once QEMU is forked off; its messages (a failed mount's) go to
    ``stderr_path``.  Raises :class:`EngineError` when the cgroup cannot be
    made or the launcher fails.
    """
    join = cgroupfs.create(cgroup, limits)
    launcher = jail.launcher_argv(argv, uid, gid, groups, join, root or jail.jail_root(),
                                  SETSID)
    if cpus:  # pinned before QEMU exists (its seccomp forbids changing its affinity)
        launcher = ["taskset", "-c", ",".join(str(c) for c in cpus), *launcher]
    table = os.memfd_create("popek-jail.fstab")
    try:
        os.write(table, fstab.encode())
        os.lseek(table, 0, os.SEEK_SET)
        try:  # never through a link QEMU (which owns the directory) may have left there
            err = os.open(stderr_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise EngineError(f"cannot open {stderr_path}: {exc.strerror}") from exc
        try:
            os.fchown(err, uid, gid)
            proc = run(launcher, TIMEOUT, stdin=table, stdout=err, stderr=err, cwd="/",
                       env=ENV, umask=0o022, start_new_session=True, pass_fds=pass_fds)
        except (OSError, subprocess.SubprocessError) as exc:
            raise EngineError(f"cannot start {argv[0]}: {exc}") from exc
        finally:
            os.close(err)
    finally:
        os.close(table)
    if proc.returncode != 0:
        detail = _tail(stderr_path)
        raise EngineError(f"cannot start {argv[0]} in its jail: the launcher exited with "
                          f"{proc.returncode}" + (f": {detail}" if detail else ""))
