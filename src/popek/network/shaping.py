"""Network rate limits of an instance's ports (``limits.net``), with tc on the host side.

Each port's host device (the VM's tap, the container's host-side veth) gets
a token bucket (``tbf``) on its egress, which is what the guest receives,
and an ingress policer (``matchall`` + ``police ... drop``), which is what
the guest sends.  Both at the same rate, in bits per second.  Without a
limit, both are removed.  Applied at start, at attach and live on
``popek config set NAME limits.net RATE``.
"""

from __future__ import annotations

import re
import subprocess

from popek import proc
from popek.errors import InvalidInput, PopekError

MIN_RATE = 1_000_000          # 1 Mbit/s
MAX_RATE = 100_000_000_000    # 100 Gbit/s
_UNITS = {"kbit": 1_000, "mbit": 1_000_000, "gbit": 1_000_000_000}
#: at most 12 digits before the point and 9 after: a float that always converts exactly
#: enough, never ``inf`` (a 5000-digit rate overflowed ``int(float(...))``)
_RATE = re.compile(r"^(\d{1,12}(?:\.\d{1,9})?)(kbit|mbit|gbit)$", re.IGNORECASE | re.ASCII)
RATE_RULE = "a rate such as 500kbit, 100Mbit or 1Gbit, from 1Mbit to 100Gbit"


class ShapingError(PopekError):
    """tc refused a rate limit; the message carries its answer."""


def parse_rate(text: str) -> int:
    """``100Mbit`` -> 100000000 (bits per second); :class:`InvalidInput` when out of range."""
    m = _RATE.match(text.strip())
    if not m:
        raise InvalidInput(f"invalid network rate {text!r}: use {RATE_RULE}")
    rate = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    check_rate(rate)
    return rate


def check_rate(rate: int) -> int:
    """Return ``rate`` (bits/s) when it is within range; else :class:`InvalidInput`."""
    if not MIN_RATE <= rate <= MAX_RATE:
        raise InvalidInput(f"invalid network rate {rate} bit/s: use {RATE_RULE}")
    return rate


def format_rate(rate: int) -> str:
    """A rate for people: ``100Mbit``."""
    for unit, size in (("Gbit", 10**9), ("Mbit", 10**6), ("kbit", 10**3)):
        if rate % size == 0:
            return f"{rate // size}{unit}"
    return f"{rate}bit"


def guest_ifname(netns_pid: int, mac: str) -> str:
    """The name of the interface with ``mac`` in the network namespace of ``netns_pid``."""
    out = _run([*_ns(netns_pid), "ip", "-o", "link", "show"]).stdout
    for line in out.splitlines():
        if f"link/ether {mac.lower()}" in line.lower():
            return line.split(":")[1].strip().split("@")[0]
    raise ShapingError(f"no interface with MAC {mac} in the namespace of process {netns_pid}")


def _qdiscs(ifname: str, netns_pid: int | None = None) -> str:
    res = subprocess.run([*_ns(netns_pid), "tc", "qdisc", "show", "dev", ifname],
                         capture_output=True, text=True, check=False, env=proc.tool_env())
    if res.returncode != 0:
        raise ShapingError(f"tc qdisc show dev {ifname} failed: {res.stderr.strip()}")
    return res.stdout


def _ns(netns_pid: int | None) -> list[str]:
    return [] if netns_pid is None else ["nsenter", f"--net=/proc/{netns_pid}/ns/net"]


def _burst(rate: int) -> int:
    return max(rate // 8 // 100, 16 * 1024)  # 10 ms of traffic, at least 16 KiB


def _tbf(ifname: str, rate: int | None, netns_pid: int | None = None) -> None:
    """A token bucket on the egress of ``ifname`` (in the netns of ``netns_pid``), or none."""
    ns = _ns(netns_pid)
    if "qdisc tbf" in _qdiscs(ifname, netns_pid):
        _run([*ns, "tc", "qdisc", "del", "dev", ifname, "root"])
    if rate is not None:
        _run([*ns, "tc", "qdisc", "add", "dev", ifname, "root", "tbf", "rate", f"{rate}bit",
              "burst", str(_burst(rate)), "latency", "50ms"])


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    # tc, ip and nsenter (and what nsenter runs) from the system's directories
    res = subprocess.run(argv, capture_output=True, text=True, check=False, env=proc.tool_env())
    if res.returncode != 0:
        raise ShapingError(f"{' '.join(argv)} failed: {res.stderr.strip()}")
    return res


def _police(ifname: str, rate: int | None) -> bool:
    """An ingress policer on ``ifname`` (what the guest sends); False when the kernel has none."""
    if "qdisc ingress" in _qdiscs(ifname):
        _run(["tc", "qdisc", "del", "dev", ifname, "ingress"])
    if rate is None:
        return True
    _run(["tc", "qdisc", "add", "dev", ifname, "handle", "ffff:", "ingress"])
    res = subprocess.run(["tc", "filter", "add", "dev", ifname, "parent", "ffff:", "protocol",
                          "all", "u32", "match", "u32", "0", "0", "police", "rate", f"{rate}bit",
                          "burst", str(_burst(rate)), "drop"],
                         capture_output=True, text=True, check=False, env=proc.tool_env())
    if res.returncode == 0:
        return True
    _run(["tc", "qdisc", "del", "dev", ifname, "ingress"])
    if "module" in res.stderr or "not found" in res.stderr:
        return False  # no act_police / cls_u32 in this kernel
    raise ShapingError(f"tc police on {ifname} failed: {res.stderr.strip()}")


def apply(ifname: str, rate: int | None, guest: tuple[int, str] | None = None) -> None:
    """Limit the port ``ifname`` to ``rate`` bit/s both ways, or lift the limits (``None``).

    What the guest receives: a ``tbf`` on the host device.  What it sends:
    an ingress policer on the host device; where the kernel has no policer,
    a ``tbf`` on the guest's own interface inside its network namespace
    (``guest`` = (pid in that netns, interface), containers only: they hold
    no CAP_NET_ADMIN to lift it).  A VM on such a kernel cannot be limited
    and :class:`ShapingError` says so.
    """
    _tbf(ifname, rate)
    if _police(ifname, rate):
        if guest is not None and "qdisc tbf" in _qdiscs(guest[1], guest[0]):
            _tbf(guest[1], None, guest[0])
        return
    if guest is None:
        raise ShapingError("this host's kernel has no tc policer (act_police, cls_u32), so "
                           "what a VM sends cannot be limited; the limit was not applied")
    _tbf(guest[1], rate, guest[0])
