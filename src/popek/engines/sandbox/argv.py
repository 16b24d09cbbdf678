"""The command line of one sandbox: ``prlimit ... -- bwrap ... -- CMD``.

Pure functions of a (merged) profile, so that unit tests can check exactly what
bubblewrap is asked to do.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from popek.engines.sandbox.profile import Limits, Profile

UID = GID = 1000
HOME = "/home/sandbox"
HOSTNAME = "sandbox"
PATH = "/usr/local/bin:/usr/bin:/bin"
ROOT_ENTRIES = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
ETC_FILES = (
    "hosts", "host.conf", "nsswitch.conf", "gai.conf", "protocols", "services",
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "ssl", "ca-certificates", "alternatives",
    "localtime", "timezone", "locale.alias", "mime.types", "os-release", "debian_version",
    "fonts", "xdg",
)
"""/etc entries bound read-only when the host has them (passwd and group are made up)."""

PASSWD = (f"root:x:0:0:root:/root:/usr/sbin/nologin\n"
          f"sandbox:x:{UID}:{GID}:popek sandbox:{HOME}:/bin/sh\n"
          "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
GROUP = f"root:x:0:\nsandbox:x:{GID}:\nnogroup:x:65534:\n"


#: where the user-mode network (slirp4netns) answers DNS, in the sandbox's own namespace
USERNET_DNS = "10.0.2.3"
RESOLV_CONF = f"nameserver {USERNET_DNS}\n"
PAGE = 4096


@dataclass(frozen=True)
class Fds:
    """File descriptors bwrap reads: the seccomp program and the made-up passwd and group.

    With network: ``resolv`` is the made-up resolv.conf, ``info`` where bwrap
    writes the sandbox's pid (JSON), ``block`` what it waits on before it
    runs the command (the network is attached in between).
    """

    seccomp: int
    passwd: int
    group: int
    resolv: int | None = None
    info: int | None = None
    block: int | None = None


def tmpfs_sizes(memory: int) -> dict[str, int]:
    """Split the memory limit between the sandbox's tmpfs: /tmp 1/2, the home and /dev/shm 1/8.

    Together they take at most 3/4 of ``memory`` (each rounded down to a
    page), so that filling them gets ENOSPC while the application still has
    a quarter of its limit to run in; their pages are charged to the
    sandbox's memory cgroup too, so files and memory together stay under the
    limit (docs/SANDBOX.md).
    """
    tmp, eighth = memory // 2 // PAGE * PAGE, memory // 8 // PAGE * PAGE
    return {"/tmp": tmp, HOME: eighth, "/dev/shm": eighth}


def join_argv(join: Sequence[Path], sh: str = "/bin/sh") -> list[str]:
    """The root prefix that joins a cgroup, then execs the rest of the command line.

    ``sh`` writes ``0`` into each of ``join``: it moves itself (v1 ``tasks``
    files, v2 ``cgroup.procs``), and what it execs is born inside.
    """
    script = " && ".join([*(f"echo 0 > {shlex.quote(str(f))}" for f in join), 'exec "$@"'])
    return [sh, "-c", script, "sh"]


def launcher_argv(join: Sequence[Path], uid: int, gid: int, setpriv: str = "setpriv",
                  sh: str = "/bin/sh") -> list[str]:
    """The root prefix that joins the sandbox's cgroup, then drops to ``uid``/``gid``.

    After :func:`join_argv`, util-linux ``setpriv`` sets the real, effective
    and saved uid and gid, clears the supplementary groups and the
    inheritable capabilities (a uid change from root clears the others) and
    execs the rest: so everything the application does, its tmpfs pages
    included, is charged to the sandbox's cgroup.
    """
    return [*join_argv(join, sh), setpriv, f"--reuid={uid}", f"--regid={gid}",
            "--clear-groups", "--inh-caps=-all", "--"]


#: where, in the launcher's private mount namespace, binds the sandbox's host user
#: cannot reach are staged (a tmpfs there, one directory per bind; nothing on the host)
STAGE_DIR = "/run/popek-sandbox"


def stage_argv(staged: Mapping[Path, str], unshare: str = "unshare",
               sh: str = "/bin/sh") -> list[str]:
    """The root prefix that reaches host paths the sandbox's host user cannot.

    As root the sandbox runs as ``nobody``, which cannot search a directory
    such as ``/root`` (0700): bwrap, running as ``nobody``, could not bind
    ``/root/work``.  util-linux ``unshare`` gives the launcher a private
    mount namespace (no propagation to the host), where a tmpfs on
    :data:`STAGE_DIR` holds a bind of each path of ``staged`` (host path ->
    stage path); bwrap binds the stage path instead.  Each bound directory
    keeps its own owner and mode: the application may use what ``nobody``
    may use in it.  Everything goes when the namespace does.
    """
    steps = [f"mount -t tmpfs -o mode=0755,size=64k popek-stage {STAGE_DIR}"]
    for host, stage in staged.items():
        make = "mkdir" if host.is_dir() else "touch"
        steps += [f"{make} {shlex.quote(stage)}",
                  f"mount --bind {shlex.quote(str(host))} {shlex.quote(stage)}"]
    return [unshare, "--mount", "--propagation", "private", "--", sh, "-c",
            " && ".join([*steps, 'exec "$@"']), "sh"]


def root_entries() -> list[str]:
    """Return the bwrap arguments that recreate the host's /bin, /lib... (usr-merge symlinks)."""
    args: list[str] = []
    for entry in ROOT_ENTRIES:
        host = f"/{entry}"
        if os.path.islink(host):
            args += ["--symlink", os.readlink(host), host]
        elif os.path.isdir(host):
            args += ["--ro-bind", host, host]
    return args


def prlimit_argv(limits: Limits, prlimit: str = "prlimit") -> list[str]:
    """Return the ``prlimit`` wrapper that sets the limits (soft = hard) before bwrap runs.

    Core dumps are always off.  The limits are inherited by bwrap and the
    application; without CAP_SYS_RESOURCE nobody inside can raise them.
    """
    argv = [prlimit, "--core=0"]
    for flag, value in (("--as", limits.memory), ("--nproc", limits.nproc),
                        ("--nofile", limits.nofile), ("--cpu", limits.cpu_seconds)):
        if value is not None:
            argv.append(f"{flag}={value}")
    return [*argv, "--"]


def environment(profile: Profile) -> dict[str, str]:
    """Return the application's whole environment: PATH, HOME, USER, then the profile's."""
    return {"PATH": PATH, "HOME": HOME, "USER": "sandbox", **profile.env}


def build_bwrap_argv(profile: Profile, cmd: Sequence[str], fds: Fds,
                     bwrap: str = "bwrap", staged: Mapping[Path, str] | None = None,
                     ) -> list[str]:
    """Return the bwrap command line that runs ``cmd`` confined by (merged) ``profile``.

    Every namespace is new, the network one too: with ``profile.network`` the
    runner attaches user-mode networking to it (``fds.info``/``fds.block``)
    and the sandbox's resolv.conf names its DNS forwarder (``fds.resolv``).
    Nested user namespaces are disabled, the application runs as uid/gid 1000
    with no capabilities in its own session, and dies with its parent.  The
    file system is a read-only root with /usr, an /etc subset, /proc, a
    minimal /dev, tmpfs on /tmp, /dev/shm and the home that share the memory
    limit (:func:`tmpfs_sizes`), then the profile's binds; / and /dev are then
    remounted read-only.  ``staged`` maps a bind to the path it is reached
    through (:func:`stage_argv`).
    """
    sizes = tmpfs_sizes(profile.limits.memory) if profile.limits.memory else {}

    def tmpfs(path: str) -> list[str]:
        size = ["--size", str(sizes[path])] if path in sizes else []
        return [*size, "--tmpfs", path]

    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns"]
    if fds.info is not None and fds.block is not None:
        argv += ["--info-fd", str(fds.info), "--block-fd", str(fds.block)]
    argv += ["--uid", str(UID), "--gid", str(GID), "--hostname", HOSTNAME,
             "--new-session", "--die-with-parent", "--cap-drop", "ALL", "--clearenv"]
    for key, value in environment(profile).items():
        argv += ["--setenv", key, value]
    argv += ["--ro-bind", "/usr", "/usr", *root_entries()]
    for entry in ETC_FILES:
        argv += ["--ro-bind-try", f"/etc/{entry}", f"/etc/{entry}"]
    if profile.network and fds.resolv is not None:
        argv += ["--ro-bind-data", str(fds.resolv), "/etc/resolv.conf"]
    argv += ["--ro-bind-data", str(fds.passwd), "/etc/passwd",
             "--ro-bind-data", str(fds.group), "/etc/group",
             "--proc", "/proc", "--dev", "/dev", *tmpfs("/dev/shm"), *tmpfs("/tmp"),
             *tmpfs(HOME)]
    staged = staged or {}
    for path in profile.ro:
        argv += ["--ro-bind", staged.get(path, str(path)), str(path)]
    for path in profile.rw:
        argv += ["--bind", staged.get(path, str(path)), str(path)]
    argv += ["--remount-ro", "/dev", "--remount-ro", "/", "--seccomp", str(fds.seccomp),
             "--chdir", HOME, "--", *cmd]
    return argv
