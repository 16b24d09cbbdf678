"""Instance configuration: the keys ``popek config set`` accepts and their checks.

:func:`apply` changes an instance's spec in memory and says what the change
needs on a running instance; :class:`popek.core.instances.Instances` writes
it and, where the engine can, applies it live.  An invalid key or value
raises :class:`InvalidInput` before anything is changed.
"""

from __future__ import annotations

from enum import Enum

from popek.core.host import check_resources
from popek.core.lifecycle import State
from popek.core.model import Instance, check_label
from popek.errors import InvalidInput, StateError
from popek.units import parse_size

CONFIG_KEYS = ("limits.memory", "limits.cpu", "limits.pids", "limits.net", "limits.disk",
               "label")
MAX_PIDS = 1 << 22


class Live(Enum):
    """What a change needs while the instance runs."""

    RESIZE = "resize"   # the engine applies the new limits (refused without the capability)
    SHAPE = "shape"     # the host side of the ports is shaped again
    DISK = "disk"       # the engine resizes the writable layer, running or stopped
    NONE = "none"       # nothing (only allowed while stopped)


def _int(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError as exc:
        raise InvalidInput(f"invalid {what} {value!r}: expected a whole number") from exc


def check_limits(limits: dict[str, int]) -> dict[str, int]:
    """Validate extra limits (``pids``: 16 to 4194304; ``net``: bit/s; ``disk``:
    bytes, containers); return them."""
    from popek.engines.container.disk import check_size
    from popek.network.shaping import check_rate

    for key, value in limits.items():
        if key == "net":
            check_rate(value)
        elif key == "disk":
            check_size(value)
        elif key != "pids":
            raise InvalidInput(f"unknown limit {key!r}; allowed: pids, net, disk")
        elif not 16 <= value <= MAX_PIDS:
            raise InvalidInput(f"invalid limits.pids {value}: must be from 16 to {MAX_PIDS}")
    return limits


def apply(inst: Instance, key: str, value: str) -> Live:
    """Set ``key`` to ``value`` in ``inst``'s spec; return what a running instance needs."""
    spec = inst.spec
    if key == "limits.memory":
        spec.memory = parse_size(value, "limits.memory")
        check_resources(spec.vcpus, spec.memory)
        return Live.RESIZE
    if key == "limits.cpu":
        try:
            spec.vcpus = int(value)
        except ValueError as exc:
            raise InvalidInput(f"invalid limits.cpu {value!r}: expected a whole number of "
                               "CPUs, from 1 to this host's count") from exc
        check_resources(spec.vcpus, spec.memory)
        return Live.RESIZE
    if key == "limits.pids":
        spec.limits = check_limits({**spec.limits, "pids": _int(value, "limits.pids")})
        return Live.RESIZE
    if key == "limits.net":
        from popek.network.shaping import parse_rate

        limits = dict(spec.limits)
        if value.lower() in ("none", "off"):  # "0" is no rate: refused as out of range
            limits.pop("net", None)
        else:
            try:
                limits["net"] = parse_rate(value)
            except InvalidInput as exc:
                raise InvalidInput(f"limits.net: {exc}; or none to lift the limit") from exc
        spec.limits = check_limits(limits)
        return Live.SHAPE
    if key == "limits.disk":
        return _disk(inst, value)
    if key == "label":
        if inst.state != State.STOPPED:
            raise StateError(inst.name, "change the label of", inst.state.value,
                             (State.STOPPED.value,))
        spec.label = check_label(value)
        return Live.NONE
    raise InvalidInput(f"unknown key {key!r}; allowed: {', '.join(CONFIG_KEYS)}")


def _disk(inst: Instance, value: str) -> Live:
    """``limits.disk``: a container's writable layer; it grows while the container runs,
    and shrinks only while it is stopped (ext4 cannot shrink mounted)."""
    spec = inst.spec
    size = check_limits({"disk": parse_size(value, "limits.disk")})["disk"]
    old = spec.limits.get("disk")
    if inst.state != State.STOPPED and old is not None and size < old:
        raise StateError(inst.name, "shrink limits.disk of", inst.state.value,
                         (State.STOPPED.value,))
    spec.limits = check_limits({**spec.limits, "disk": size})
    return Live.DISK
