"""The container init configuration shared by every image with a rootfs.

``/sbin/init`` is busybox init.  Its ``/etc/inittab`` runs
``/etc/init.d/rcS-container`` at start (hostname from ``POPEK_HOSTNAME``,
loopback up, then ``popek-guest: ready`` on init's stdout, which the
container engine logs) and ``/etc/init.d/rcK-container`` at stop
(``popek-guest: shutdown``).  On SIGTERM busybox init runs the shutdown
action, signals every process, asks the kernel to reboot (denied or
ignored in a container) and exits, which ends the container.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from popek.errors import ImageError

INIT = "sbin/init"
BUSYBOX = "/bin/busybox"
# guest/ file -> (path in the root filesystem, mode)
FILES = {
    "inittab-container": ("etc/inittab", 0o644),
    "rcS-container": ("etc/init.d/rcS-container", 0o755),
    "rcK-container": ("etc/init.d/rcK-container", 0o755),
}


def install(root: Path, link_init: bool) -> None:
    """Write the inittab and scripts under ``root``; with ``link_init``, make
    ``/sbin/init`` a symlink to ``/bin/busybox`` (refusing to replace another init).
    """
    guest = resources.files("popek.images") / "guest"
    for src_name, (dest, mode) in FILES.items():
        target = root / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((guest / src_name).read_bytes())
        target.chmod(mode)
    if link_init:
        init = _resolve_inside(root, INIT)
        if init.is_symlink() or init.exists():
            raise ImageError(f"the root filesystem already has /{INIT}; refusing to replace it")
        init.symlink_to(BUSYBOX)


def _resolve_inside(root: Path, rel: str) -> Path:
    """Return where ``rel`` lands under ``root``, following a merged-/usr ``sbin`` link.

    Only a relative link of the first component that stays inside ``root``
    (``sbin -> usr/sbin``) is followed.
    """
    first, _, rest = rel.partition("/")
    link = root / first
    if link.is_symlink():
        target = link.readlink()
        if target.is_absolute() or ".." in target.parts:
            raise ImageError(f"/{first} is a symlink to {target}; expected a relative one")
        return root / target / rest
    return root / rel
