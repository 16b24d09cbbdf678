"""Traffic counters of host network devices, read from sysfs.

``/sys/class/net/IF/statistics/`` holds the kernel's own counters of each
device, one small file each: reading four of them for every port of a host
costs far less than a netlink link dump parsed by pyroute2 (which decodes
every attribute of every device).  The counters are the host side's: what a
tap or veth *received* is what its instance sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SYSFS_NET = Path("/sys/class/net")
FIELDS = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")


@dataclass(frozen=True)
class DeviceCounters:
    """The traffic counters of one device, as the host sees them."""

    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int


def read(ifname: str, sysfs: Path = SYSFS_NET) -> DeviceCounters | None:
    """The counters of the host device ``ifname``; ``None`` when there is no such device."""
    if not ifname or "/" in ifname or ifname in (".", ".."):
        return None
    d = sysfs / ifname / "statistics"
    values = []
    try:
        for name in FIELDS:
            with open(d / name, "rb") as f:
                values.append(int(f.read()))
    except (OSError, ValueError):
        return None
    return DeviceCounters(*values)
