"""Run one application in a sandbox: stdio and exit code pass straight through.

When popek runs as root, bwrap itself runs as ``nobody`` (uid/gid 65534, no
supplementary groups), dropped by :mod:`subprocess` before exec.  bwrap then
makes an unprivileged user namespace in which the application is uid 1000.
So the application holds only ``nobody``'s access to the host files bound
into it, never root's, even if it escaped its namespaces.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from popek import proc
from popek.engines import seccomp
from popek.engines.sandbox import argv as argvmod
from popek.engines.sandbox import store
from popek.engines.sandbox.profile import Profile, RunOptions, merge
from popek.errors import EngineError, InvalidInput

HOST_UID = HOST_GID = 65534
TIMEOUT_EXIT = 124


def find_tools() -> tuple[str, str]:
    """Return the paths of ``bwrap`` and ``prlimit``; :class:`EngineError` if one is missing."""
    bwrap, prlimit = proc.tool("bwrap"), proc.tool("prlimit")
    if not bwrap:
        raise EngineError("bubblewrap is not installed: sandboxes need the 'bwrap' program; "
                          "install the Debian package 'bubblewrap'")
    if not prlimit:
        raise EngineError("'prlimit' is missing; install the Debian package 'util-linux'")
    return bwrap, prlimit


def _blocker(path: Path, uid: int, gid: int, bit: int) -> Path | None:
    """Return the first directory on the way to ``path`` that ``uid`` cannot search."""
    for parent in reversed(path.parents):
        st = parent.stat()
        if st.st_uid == uid:
            ok = st.st_mode & (bit << 6)
        elif st.st_gid == gid:
            ok = st.st_mode & (bit << 3)
        else:
            ok = st.st_mode & bit
        if not ok:
            return parent
    return None


def check_reachable(profile: Profile, uid: int, gid: int) -> None:
    """Refuse binds the sandbox's host uid cannot reach; warn for --rw paths it cannot write."""
    for path in (*profile.ro, *profile.rw):
        block = _blocker(path, uid, gid, 1)
        if block is not None:
            mode = stat.S_IMODE(block.stat().st_mode)
            raise InvalidInput(
                f"{path}: the sandbox's host user (uid {uid}) cannot reach it, {block} is mode "
                f"{mode:04o}; allowed: paths whose directories that user may search")
    for path in profile.rw:
        st = path.stat()
        writable = (st.st_mode & 0o200 if st.st_uid == uid else
                    st.st_mode & 0o020 if st.st_gid == gid else st.st_mode & 0o002)
        if not writable:
            print(f"popek: warning: {path} is not writable by the sandbox's host user "
                  f"(uid {uid}); the application will get 'Permission denied'",
                  file=sys.stderr)


@contextlib.contextmanager
def _data_fd(data: bytes, name: str) -> Iterator[int]:
    fd = os.memfd_create(f"popek-{name}")
    try:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
        yield fd
    finally:
        os.close(fd)


def run(profile_name: str, options: RunOptions, cmd: Sequence[str]) -> int:
    """Run ``cmd`` in a sandbox made from profile ``profile_name`` and ``options``.

    stdin, stdout and stderr are inherited; returns the application's exit
    code (128+N if a signal N killed it, 124 if ``options.timeout`` expired).
    Raises :class:`InvalidInput` for a bad profile, option or empty command,
    :class:`NotFound` for an unknown profile, :class:`EngineError` when
    bubblewrap is missing.
    """
    if not cmd:
        raise InvalidInput("no command given; usage: popek sandbox run [OPTIONS] -- CMD [ARGS]...")
    if options.timeout is not None and options.timeout <= 0:
        raise InvalidInput(f"--timeout {options.timeout}: allowed: a number of seconds > 0")
    bwrap, prlimit = find_tools()
    profile = merge(store.load(profile_name), options)
    program = seccomp.bpf_program(profile.seccomp_extra)
    root = os.geteuid() == 0
    uid, gid = (HOST_UID, HOST_GID) if root else (os.getuid(), os.getgid())
    check_reachable(profile, uid, gid)
    with (_data_fd(program, "seccomp") as sfd, _data_fd(argvmod.PASSWD.encode(), "passwd") as pfd,
          _data_fd(argvmod.GROUP.encode(), "group") as gfd):
        fds = argvmod.Fds(seccomp=sfd, passwd=pfd, group=gfd)
        argv = [*argvmod.prlimit_argv(profile.limits, prlimit),
                *argvmod.build_bwrap_argv(profile, cmd, fds, bwrap)]
        # user/group/extra_groups drop privileges in the forked child before exec
        # (no preexec_fn); for a non-root caller they are its own ids already.
        proc = subprocess.Popen(argv, pass_fds=(sfd, pfd, gfd), env={"PATH": "/usr/bin:/bin"},
                                user=uid if root else None, group=gid if root else None,
                                extra_groups=[] if root else None)
    return _wait(proc, options.timeout)


def _wait(proc: subprocess.Popen[bytes], timeout: float | None) -> int:
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        print(f"popek: the sandboxed application ran longer than --timeout {timeout:g} "
              "seconds and was killed", file=sys.stderr)
        return TIMEOUT_EXIT
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return 128 - code if code < 0 else code
