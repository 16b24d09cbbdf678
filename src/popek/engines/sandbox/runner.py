"""Run one application in a sandbox: stdio and exit code pass straight through.

When popek runs as root, bwrap itself runs as ``nobody`` (uid/gid 65534, no
supplementary groups), dropped by :mod:`subprocess` before exec.  bwrap then
makes an unprivileged user namespace in which the application is uid 1000.
So the application holds only ``nobody``'s access to the host files bound
into it, never root's, even if it escaped its namespaces.

As root, with a memory limit, the sandbox runs in a memory cgroup of its own
(:mod:`.cgroup`): the launcher joins it as root, then ``setpriv`` drops to
``nobody`` and execs ``prlimit`` and bwrap.  With network, the sandbox gets
its own network namespace with user-mode networking (:mod:`.usernet`): bwrap
reports the sandbox's pid and waits until slirp4netns has configured it.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from popek import proc
from popek.engines import seccomp
from popek.engines.sandbox import argv as argvmod
from popek.engines.sandbox import cgroup, store, usernet
from popek.engines.sandbox.profile import Profile, RunOptions, merge
from popek.errors import EngineError, InvalidInput

HOST_UID = HOST_GID = 65534
TIMEOUT_EXIT = 124
#: the descriptors of a sandbox's stdin, stdout and stderr (``None``: the caller's)
Stdio = tuple[int | None, int | None, int | None]


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


def check_reachable(profile: Profile, uid: int, gid: int, root: bool = False) -> list[Path]:
    """Check the binds against the sandbox's host uid; warn for --rw paths it cannot write.

    Returns the binds that uid cannot reach (a directory on the way it may
    not search, such as root's 0700 home): as ``root`` the runner reaches
    them for it (:func:`popek.engines.sandbox.argv.stage_argv`); otherwise
    they are refused with :class:`InvalidInput`.
    """
    unreachable: list[Path] = []
    for path in (*profile.ro, *profile.rw):
        block = _blocker(path, uid, gid, 1)
        if block is not None and root:
            unreachable.append(path)
        elif block is not None:
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
    return unreachable


@contextlib.contextmanager
def _data_fd(data: bytes, name: str) -> Iterator[int]:
    fd = os.memfd_create(f"popek-{name}")
    try:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
        yield fd
    finally:
        os.close(fd)


def run(profile_name: str, options: RunOptions, cmd: Sequence[str],
        stdio: Stdio | None = None) -> int:
    """Run ``cmd`` in a sandbox made from profile ``profile_name`` and ``options``.

    stdin, stdout and stderr are inherited (``stdio``: these three descriptors
    instead, ``None`` among them inherited); returns the application's exit
    code (128+N if a signal N killed it, 124 if ``options.timeout`` expired).
    Raises :class:`InvalidInput` for a bad profile, option or empty command,
    :class:`NotFound` for an unknown profile, :class:`EngineError` when
    bubblewrap (or slirp4netns, with network) is missing or the sandbox's
    cgroup or network cannot be set up (nothing is left behind).
    """
    if not cmd:
        raise InvalidInput("no command given; usage: popek sandbox run [OPTIONS] -- CMD [ARGS]...")
    if options.timeout is not None and options.timeout <= 0:
        raise InvalidInput(f"--timeout {options.timeout}: allowed: a number of seconds > 0")
    bwrap, prlimit = find_tools()
    profile = merge(store.load(profile_name), options)
    if profile.network:
        usernet.find_slirp()
    program = seccomp.bpf_program(profile.seccomp_extra)
    root = os.geteuid() == 0
    uid, gid = (HOST_UID, HOST_GID) if root else (os.getuid(), os.getgid())
    unreachable = check_reachable(profile, uid, gid, root)
    staged = {path: f"{argvmod.STAGE_DIR}/{i}" for i, path in enumerate(unreachable)}
    if staged:
        os.makedirs(argvmod.STAGE_DIR, mode=0o755, exist_ok=True)
    with contextlib.ExitStack() as stack:
        join: list[Path] = []
        if root and profile.limits.memory is not None:
            with contextlib.suppress(EngineError):
                cgroup.sweep()
            path = cgroup.new_path()
            join = cgroup.create(path, profile.limits)
            stack.callback(cgroup.remove, path)
        child, block = _start(profile, cmd, program, (bwrap, prlimit), join, uid, gid, stack,
                              staged, stdio)
        try:
            if block is not None:
                info, block_w = block
                pid = usernet.child_pid(info)
                prefix = argvmod.join_argv(join, _tool("sh")) if join else []
                stack.callback(usernet.attach(pid, prefix, rootless=not root).stop)
                os.write(block_w, b"1")  # the network is up: bwrap runs the command
        except BaseException:
            child.kill()
            child.wait()
            raise
        return _wait(child, options.timeout, stdio[2] if stdio else None)


def _start(profile: Profile, cmd: Sequence[str], program: bytes, tools: tuple[str, str],
           join: list[Path], uid: int, gid: int, stack: contextlib.ExitStack,
           staged: dict[Path, str] | None = None, stdio: Stdio | None = None,
           ) -> tuple[subprocess.Popen[bytes], tuple[int, int] | None]:
    """Start ``[launcher] prlimit ... -- bwrap ... -- CMD``.

    Returns the process and, with network, the two descriptors the runner
    then uses: the read end of bwrap's ``--info-fd`` and the write end of its
    ``--block-fd`` (the stack closes them).
    """
    bwrap, prlimit = tools
    fds = argvmod.Fds(
        seccomp=stack.enter_context(_data_fd(program, "seccomp")),
        passwd=stack.enter_context(_data_fd(argvmod.PASSWD.encode(), "passwd")),
        group=stack.enter_context(_data_fd(argvmod.GROUP.encode(), "group")))
    child_ends: list[int] = []
    block: tuple[int, int] | None = None
    if profile.network:
        info_r, info_w = os.pipe()
        block_r, block_w = os.pipe()
        for fd in (info_r, block_w):
            stack.callback(os.close, fd)
        child_ends = [info_w, block_r]
        block = (info_r, block_w)
        fds = replace(fds, resolv=stack.enter_context(
            _data_fd(argvmod.RESOLV_CONF.encode(), "resolv")), info=info_w, block=block_r)
    launcher = argvmod.launcher_argv(join, uid, gid, _tool("setpriv"), _tool("sh")) \
        if join or staged else []
    if staged:  # after the cgroup join, before setpriv drops root
        split = len(argvmod.join_argv(join, "sh"))
        launcher[split:split] = argvmod.stage_argv(staged, _tool("unshare"), _tool("sh"))
    argv = [*launcher, *argvmod.prlimit_argv(profile.limits, prlimit),
            *argvmod.build_bwrap_argv(profile, cmd, fds, bwrap, staged)]
    # without the launcher, user/group/extra_groups drop privileges in the forked
    # child before exec (no preexec_fn); for a non-root caller they are its own ids
    drop = uid != os.geteuid() and not launcher
    stdin, stdout, stderr = stdio or (None, None, None)
    try:
        proc = subprocess.Popen(
            argv, pass_fds=(fds.seccomp, fds.passwd, fds.group, *child_ends,
                            *([fds.resolv] if fds.resolv is not None else [])),
            env={"PATH": "/usr/bin:/bin"}, user=uid if drop else None,
            group=gid if drop else None, extra_groups=[] if drop else None,
            stdin=stdin, stdout=stdout, stderr=stderr)
    finally:
        for fd in child_ends:  # the child's copies are the ones that count
            os.close(fd)
    return proc, block


def _tool(name: str) -> str:
    path = proc.tool(name)
    if not path:
        raise EngineError(f"'{name}' is missing; install the Debian package "
                          f"'{'dash' if name == 'sh' else 'util-linux'}'")
    return path


def _wait(proc: subprocess.Popen[bytes], timeout: float | None,
          stderr: int | None = None) -> int:
    """The exit code; after ``timeout`` seconds the sandbox is killed, and why is said on
    ``stderr`` (the sandbox's, when given; else popek's own)."""
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        note = (f"popek: the sandboxed application ran longer than --timeout {timeout:g} "
                "seconds and was killed")
        if stderr is None:
            print(note, file=sys.stderr)
        else:
            os.write(stderr, f"{note}\n".encode())
        return TIMEOUT_EXIT
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return 128 - code if code < 0 else code
