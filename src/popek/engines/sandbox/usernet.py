"""User-mode networking for a sandbox with network: slirp4netns on its own namespace.

A sandbox never shares the host's network namespace: sharing it would hand
the application the host's abstract Unix sockets (X11's ``@/tmp/.X11-unix/X0``,
D-Bus, ...), which live in the network namespace and have no file
permission to stop it, and every service listening on the host's loopback.
bubblewrap gives it a namespace of its own (only ``lo``), and
`slirp4netns <https://github.com/rootless-containers/slirp4netns>`_ (Debian
package ``slirp4netns``) attaches a TAP device ``eth0`` to it whose packets
it turns into ordinary sockets of the host: TCP and UDP connections out, as
the host would open them, and nothing in.

- The sandbox is ``10.0.2.100/24``, its gateway ``10.0.2.2`` and its DNS
  ``10.0.2.3`` (forwarded to the host's resolver; the sandbox's resolv.conf
  names it).  ``--disable-host-loopback``: the gateway does not lead to the
  host's ``127.0.0.1``, so a service that listens only on the host's loopback
  stays out of reach.  No port of the host is forwarded into the sandbox.
- Started as root, slirp4netns enters the namespace through a descriptor
  popek opened (``--netns-type=path /proc/self/fd/N``), then runs in a mount
  namespace of its own with every capability dropped but
  ``CAP_NET_BIND_SERVICE`` (``--enable-sandbox``) and a seccomp filter
  (``--enable-seccomp``).  Run by another user, it joins the sandbox's user
  namespace first (``--userns-path``), which needs ``/dev/net/tun`` open to
  that user (Debian's default, mode 0666).
- Its lifetime: it says when ``eth0`` is configured by writing to
  ``--ready-fd`` (the application is held until then, through bwrap's
  ``--block-fd``), and it exits when popek closes ``--exit-fd``, or when popek
  dies and the kernel closes it.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

from popek import proc
from popek.errors import EngineError

MTU = 65520
TAP = "eth0"
#: seconds to wait for bwrap's pid and for slirp4netns to configure the namespace
SETUP_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def find_slirp() -> str:
    """The path of ``slirp4netns``; :class:`EngineError` naming the Debian package if missing."""
    path = proc.tool("slirp4netns")
    if not path:
        raise EngineError("sandboxes with network need the 'slirp4netns' program; install the "
                          "Debian package 'slirp4netns'")
    return path


def slirp_argv(slirp: str, netns_fd: int, exit_fd: int, ready_fd: int,
               userns: str | None = None) -> list[str]:
    """The slirp4netns command line for the namespace open at ``netns_fd``."""
    return [slirp, "--configure", f"--mtu={MTU}", "--disable-host-loopback",
            "--enable-sandbox", "--enable-seccomp", f"--exit-fd={exit_fd}",
            f"--ready-fd={ready_fd}", *([f"--userns-path={userns}"] if userns else []),
            "--netns-type=path", f"/proc/self/fd/{netns_fd}", TAP]


def _read_until(fd: int, deadline: float, done: bytes) -> bytes:
    """Read ``fd`` until it ends, holds ``done`` at its end, or ``deadline`` passes."""
    data = b""
    while not data.rstrip().endswith(done):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data


def child_pid(info_fd: int, timeout: float = SETUP_TIMEOUT) -> int:
    """The host pid of the sandbox's first process, from bwrap's ``--info-fd`` JSON."""
    import json

    raw = _read_until(info_fd, time.monotonic() + timeout, b"}")
    try:
        pid = json.loads(raw)["child-pid"]
    except (ValueError, KeyError, TypeError):
        raise EngineError("bubblewrap did not report the sandbox's pid; the sandbox did not "
                          "start") from None
    if not isinstance(pid, int) or pid <= 0:
        raise EngineError(f"bubblewrap reported a bad sandbox pid {pid!r}")
    return pid


@dataclass
class UserNet:
    """A running slirp4netns: stop it with :meth:`stop`."""

    process: subprocess.Popen[bytes]
    exit_fd: int

    def stop(self) -> None:
        """Close its exit descriptor and wait for it; kill it if it lingers."""
        with contextlib.suppress(OSError):
            os.close(self.exit_fd)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def attach(pid: int, prefix: Sequence[str] = (), rootless: bool = False,
           timeout: float = SETUP_TIMEOUT) -> UserNet:
    """Attach slirp4netns to the network namespace of ``pid``; return once it is configured.

    ``prefix`` runs before it (the launcher that joins the sandbox's cgroup).
    Raises :class:`EngineError` with slirp4netns' own message when it does not
    come up within ``timeout`` seconds (it is stopped then).
    """
    slirp = find_slirp()
    try:
        netns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise EngineError(f"cannot open the sandbox's network namespace: {exc.strerror}") from exc
    exit_r, exit_w = os.pipe()
    ready_r, ready_w = os.pipe()
    userns = f"/proc/{pid}/ns/user" if rootless else None
    try:
        with tempfile.TemporaryFile() as log:
            try:
                process = subprocess.Popen(
                    [*prefix, *slirp_argv(slirp, netns, exit_r, ready_w, userns)],
                    pass_fds=(netns, exit_r, ready_w), stdin=subprocess.DEVNULL,
                    stdout=log, stderr=log)
            except OSError as exc:
                os.close(exit_w)
                raise EngineError(f"cannot start slirp4netns: {exc.strerror}") from exc
            net = UserNet(process, exit_w)  # from here net.stop() closes exit_w
            os.close(ready_w)
            ready_w = -1
            try:
                ready = _read_until(ready_r, time.monotonic() + timeout, b"1")
            except BaseException:
                net.stop()
                raise
            if ready != b"1":
                net.stop()
                log.seek(0)
                lines = [ln for ln in log.read(65536).decode(errors="replace").splitlines()
                         if ln.strip()]
                why = lines[-1][:200] if lines else f"exit code {process.returncode}"
                raise EngineError(f"the sandbox's network did not come up: slirp4netns: {why}")
            return net
    finally:
        for fd in (netns, exit_r, ready_r, ready_w):
            if fd >= 0:
                os.close(fd)
