"""Opening a network port's tap device for QEMU.

``/dev/net/tun`` is root-only on hardened hosts, and QEMU runs unprivileged
under a sandbox: popek (root) opens the persistent tap that popek.network
made and hands QEMU the file descriptor, at start (inherited) or at hot-plug
(passed over the QMP socket with SCM_RIGHTS).  QEMU never opens a device.
"""

from __future__ import annotations

import fcntl
import os
import struct

from popek.errors import EngineError

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000


def open_tap(ifname: str) -> int:
    """Attach to the existing tap ``ifname`` and return its file descriptor (non-inheritable)."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise EngineError(f"cannot open /dev/net/tun: {exc}") from exc
    try:
        ifreq = struct.pack("16sH22x", ifname.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, ifreq)
    except OSError as exc:
        os.close(fd)
        raise EngineError(f"cannot attach to tap {ifname}: {exc}") from exc
    return fd
