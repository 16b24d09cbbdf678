"""Starting QEMU detached and unprivileged, and watching its process.

popek does not use QEMU's ``-daemonize`` (it forks after the seccomp sandbox
is on, and ``spawn=deny`` kills it) nor ``-runas`` (it calls setuid after the
sandbox is on, and ``elevateprivileges=deny`` kills it).  Like a jailer, popek
drops to the instance's unprivileged uid/gid (no supplementary groups but
``kvm`` when KVM is used) *before* exec, and ``setsid --fork`` puts QEMU in a
session of its own whose parent exits at once: QEMU is re-parented to init,
outlives the CLI, and never becomes a zombie child of a long-lived popek
process.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from popek.errors import EngineError
from popek.proc import run

SETSID = "setsid"


def spawn_detached(argv: list[str], uid: int, gid: int, groups: list[int],
                   stderr_path: Path, cwd: Path, pass_fds: tuple[int, ...] = ()) -> None:
    """Run ``argv`` as ``uid``/``gid`` in a new session, detached from the caller.

    Raises :class:`EngineError` when the launcher itself fails.
    """
    with open(stderr_path, "ab") as err:
        os.fchown(err.fileno(), uid, gid)
        try:
            proc = run(
                [SETSID, "--fork", *argv], 10.0,
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, cwd=cwd,
                user=uid, group=gid, extra_groups=groups, umask=0o077,
                start_new_session=True, pass_fds=pass_fds,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise EngineError(f"cannot start {argv[0]}: {exc}") from exc
    if proc.returncode != 0:
        raise EngineError(f"cannot start {argv[0]}: setsid exited with {proc.returncode}")
