"""The command line of one sandbox: ``prlimit ... -- bwrap ... -- CMD``.

Pure functions of a (merged) profile, so that unit tests can check exactly what
bubblewrap is asked to do.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Fds:
    """File descriptors bwrap reads: the seccomp program and the made-up passwd and group."""

    seccomp: int
    passwd: int
    group: int


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
                     bwrap: str = "bwrap") -> list[str]:
    """Return the bwrap command line that runs ``cmd`` confined by (merged) ``profile``.

    Every namespace is new (network only unless ``profile.network``), nested
    user namespaces are disabled, the application runs as uid/gid 1000 with no
    capabilities in its own session, and dies with its parent.  The file system
    is a read-only root with /usr, an /etc subset, /proc, a minimal /dev,
    size-limited tmpfs on /tmp, /dev/shm and the home, then the profile's binds;
    / and /dev are then remounted read-only.
    """
    size = ["--size", str(profile.limits.memory)] if profile.limits.memory else []
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns"]
    if profile.network:
        argv.append("--share-net")
    argv += ["--uid", str(UID), "--gid", str(GID), "--hostname", HOSTNAME,
             "--new-session", "--die-with-parent", "--cap-drop", "ALL", "--clearenv"]
    for key, value in environment(profile).items():
        argv += ["--setenv", key, value]
    argv += ["--ro-bind", "/usr", "/usr", *root_entries()]
    etc = [*ETC_FILES, "resolv.conf"] if profile.network else ETC_FILES
    for entry in etc:
        argv += ["--ro-bind-try", f"/etc/{entry}", f"/etc/{entry}"]
    argv += ["--ro-bind-data", str(fds.passwd), "/etc/passwd",
             "--ro-bind-data", str(fds.group), "/etc/group",
             "--proc", "/proc", "--dev", "/dev", *size, "--tmpfs", "/dev/shm",
             *size, "--tmpfs", "/tmp", *size, "--tmpfs", HOME]
    for path in profile.ro:
        argv += ["--ro-bind", str(path), str(path)]
    for path in profile.rw:
        argv += ["--bind", str(path), str(path)]
    argv += ["--remount-ro", "/dev", "--remount-ro", "/", "--seccomp", str(fds.seccomp),
             "--chdir", HOME, "--", *cmd]
    return argv
