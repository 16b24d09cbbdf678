"""Disk I/O limits: ``limits.disk.read_bps|write_bps|read_iops|write_iops``.

One vocabulary for a volume's limits (its ``config``), an instance's (its
``spec.limits``) and the engines that apply them (QEMU throttle groups for
VMs, the cgroup I/O controller for containers).  ``0`` or unset is no limit.
Byte rates are sizes per second (``10MB``, ``64MiB``; ``/s`` may follow);
operation rates are whole numbers of operations per second.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from popek.errors import InvalidInput
from popek.units import format_size, parse_size

#: the config keys, in the order they are shown
KEYS = ("limits.disk.read_bps", "limits.disk.write_bps", "limits.disk.read_iops",
        "limits.disk.write_iops")
#: the smallest byte rate: below it a guest's or container's I/O would stall for seconds
MIN_BPS = 64 << 10
#: QEMU's largest throttle value (``THROTTLE_VALUE_MAX``); the cgroup files take it too
MAX_RATE = 10**15
_NONE = ("0", "none", "off", "")


@dataclass(frozen=True)
class IoLimits:
    """Bytes and operations per second, each way; 0: no limit."""

    read_bps: int = 0
    write_bps: int = 0
    read_iops: int = 0
    write_iops: int = 0

    def __bool__(self) -> bool:
        return any(asdict(self).values())

    def stored(self) -> dict[str, int]:
        """The limits set, as ``{"disk.write_bps": N}`` (an instance's ``spec.limits`` keys)."""
        return {f"disk.{k}": v for k, v in asdict(self).items() if v}

    @classmethod
    def of(cls, limits: Mapping[str, int | str]) -> IoLimits:
        """Read them back from ``spec.limits`` or a volume's ``config`` (keys with or
        without the ``limits.`` prefix; other keys are ignored)."""
        out: dict[str, int] = {}
        for key, value in limits.items():
            field = key.removeprefix("limits.").removeprefix("disk.")
            if key.removeprefix("limits.").startswith("disk.") and field in _FIELDS:
                out[field] = int(value)
        return cls(**out)


_FIELDS = ("read_bps", "write_bps", "read_iops", "write_iops")


def is_key(key: str) -> bool:
    """Whether ``key`` is one of :data:`KEYS`."""
    return key in KEYS


def parse(key: str, value: str) -> int:
    """The value of I/O limit ``key`` (one of :data:`KEYS`) given as ``value``; 0: none.

    Raises :class:`InvalidInput`: one line naming the key and what it takes.
    """
    if key not in KEYS:
        raise InvalidInput(f"unknown key {key!r}; allowed: {', '.join(KEYS)}")
    text = value.strip()
    if text.lower() in _NONE:
        return 0
    if key.endswith("_bps"):
        try:
            rate = parse_size(text.removesuffix("/s"), key)
        except InvalidInput as exc:
            raise InvalidInput(f"{exc} per second, or 0 for no limit") from exc
        return check(key, rate, value)
    try:
        ops = int(text.removesuffix("/s"))
    except ValueError as exc:
        raise InvalidInput(f"invalid {key} {value!r}: expected a whole number of operations "
                           "per second, or 0 for no limit") from exc
    return check(key, ops, value)


def check(key: str, rate: int, given: object = None) -> int:
    """``rate`` when it is in range for ``key`` (0: no limit); else :class:`InvalidInput`."""
    shown = repr(given if given is not None else rate)
    if key.endswith("_bps"):
        if rate and not MIN_BPS <= rate <= MAX_RATE:
            raise InvalidInput(f"invalid {key} {shown}: from {format_size(MIN_BPS)} to "
                               f"{MAX_RATE} bytes per second, or 0 for no limit")
    elif not 0 <= rate <= MAX_RATE:
        raise InvalidInput(f"invalid {key} {shown}: from 1 to {MAX_RATE} operations per "
                           "second, or 0 for no limit")
    return rate


def show(limits: IoLimits) -> dict[str, str]:
    """The limits set, as text :func:`parse` reads back (``{"limits.disk.write_bps": "10MiB"}``)."""
    out: dict[str, str] = {}
    for key, field in zip(KEYS, _FIELDS, strict=True):
        value = getattr(limits, field)
        if value:
            out[key] = format_size(value) if field.endswith("_bps") else str(value)
    return out


def replace(limits: IoLimits, key: str, value: str) -> IoLimits:
    """``limits`` with ``key`` set to ``value`` (checked by :func:`parse`)."""
    fields = asdict(limits)
    fields[key.removeprefix("limits.disk.")] = parse(key, value)
    return IoLimits(**fields)
