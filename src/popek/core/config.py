"""Instance configuration: the keys ``popek config set`` and ``launch -c`` accept, and their checks.

:func:`apply` changes an instance's spec in memory and says what the change
needs on a running instance; :class:`popek.core.instances.Instances` writes
it and, where the engine can, applies it live.  An invalid key or value
raises :class:`InvalidInput` before anything is changed.  :func:`parse_pairs`
reads ``KEY=VALUE`` words, :func:`show` gives every key's value as text, and
:func:`unset` puts a key back to what the instance would have without it.
"""

from __future__ import annotations

from enum import Enum

from popek import iolimits
from popek.core.host import check_resources
from popek.core.lifecycle import State
from popek.core.model import Instance, InstanceSpec, check_label
from popek.errors import InvalidInput, StateError
from popek.units import parse_size

CONFIG_KEYS = ("limits.memory", "limits.cpu", "limits.pids", "limits.net", "limits.disk",
               *iolimits.KEYS, "label", "boot.autostart")
#: the words ``boot.autostart`` takes (``popek admin boot`` starts the instances set true)
BOOLEANS = {"true": True, "1": True, "yes": True, "on": True,
            "false": False, "0": False, "no": False, "off": False}
MAX_PIDS = 1 << 22
#: the processes a container may run at once unless it says otherwise (``limits.pids``)
CONTAINER_PIDS = 1024


class Live(Enum):
    """What a change needs while the instance runs."""

    RESIZE = "resize"   # the engine applies the new limits (refused without the capability)
    SHAPE = "shape"     # the host side of the ports is shaped again
    DISK = "disk"       # the engine resizes the writable layer, running or stopped
    IO = "io"           # the engine applies the new disk I/O limits (throttle, I/O controller)
    NONE = "none"       # nothing (only allowed while stopped)


def parse_pairs(items: list[str] | tuple[str, ...], what: str = "-c") -> dict[str, str]:
    """``["limits.cpu=2", ...]`` -> ``{"limits.cpu": "2"}`` (a key given twice: the last wins).

    Raises :class:`InvalidInput` for a word without ``=`` or a key popek does not know.
    """
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise InvalidInput(f"invalid {what} {item!r}: use KEY=VALUE with KEY one of "
                               f"{', '.join(CONFIG_KEYS)}")
        check_key(key)
        out[key] = value
    return out


def check_key(key: str) -> str:
    """``key`` when popek knows it; else :class:`InvalidInput` naming the keys allowed."""
    if key not in CONFIG_KEYS:
        raise InvalidInput(f"unknown key {key!r}; allowed: {', '.join(CONFIG_KEYS)}")
    return key


def show(inst: Instance) -> dict[str, str]:
    """Every key of :data:`CONFIG_KEYS` set on ``inst``, as text ``apply`` reads back."""
    from popek.network.shaping import format_rate
    from popek.units import format_size

    spec = inst.spec
    out = {"limits.memory": format_size(spec.memory), "limits.cpu": str(spec.vcpus)}
    if "pids" in spec.limits:
        out["limits.pids"] = str(spec.limits["pids"])
    if "net" in spec.limits:
        out["limits.net"] = format_rate(int(spec.limits["net"]))
    if "disk" in spec.limits:
        out["limits.disk"] = format_size(int(spec.limits["disk"]))
    out.update(iolimits.show(iolimits.IoLimits.of(spec.limits)))
    out["label"] = spec.label
    out["boot.autostart"] = "true" if spec.autostart else "false"
    return out


def unset(inst: Instance, key: str, fallback: dict[str, str], disk: int) -> Live:
    """Put ``key`` of ``inst`` back to what it would be without it; return what that needs.

    ``fallback``: the values the instance's profiles give now (they win over the
    built-in defaults); ``disk``: the project's ``limits.disk`` for a container.
    The built-in defaults: 512MiB, 1 CPU, 1024 processes for a container (a VM:
    none of its own), no network limit, the ``default`` label.
    """
    check_key(key)
    if key in fallback:
        return apply(inst, key, fallback[key])
    defaults = InstanceSpec(inst.spec.image)
    if key == "limits.memory":
        return apply(inst, key, str(defaults.memory))
    if key == "limits.cpu":
        return apply(inst, key, str(defaults.vcpus))
    if key == "limits.net":
        return apply(inst, key, "none")
    if key == "label":
        return apply(inst, key, defaults.label)
    if key == "boot.autostart":
        return apply(inst, key, "false")
    if iolimits.is_key(key):
        return apply(inst, key, "0")
    if key == "limits.disk":
        if "disk" not in inst.spec.limits:
            return Live.NONE
        return apply(inst, key, str(disk))
    if inst.spec.engine == "container":  # limits.pids
        return apply(inst, key, str(CONTAINER_PIDS))
    inst.spec.limits = {k: v for k, v in inst.spec.limits.items() if k != "pids"}
    return Live.RESIZE


def _int(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError as exc:
        raise InvalidInput(f"invalid {what} {value!r}: expected a whole number") from exc


def check_limits(limits: dict[str, int]) -> dict[str, int]:
    """Validate extra limits (``pids``: 16 to 4194304; ``net``: bit/s; ``disk``:
    bytes, containers; ``disk.read_bps`` and the other I/O limits: see
    :mod:`popek.iolimits`); return them."""
    from popek.engines.container.disk import check_size
    from popek.network.shaping import check_rate

    for key, value in limits.items():
        if key == "net":
            check_rate(value)
        elif key == "disk":
            check_size(value)
        elif iolimits.is_key(f"limits.{key}"):
            iolimits.check(f"limits.{key}", int(value))
        elif key != "pids":
            raise InvalidInput(f"unknown limit {key!r}; allowed: pids, net, disk, "
                               f"{', '.join(k.removeprefix('limits.') for k in iolimits.KEYS)}")
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
    if iolimits.is_key(key):
        io = iolimits.replace(iolimits.IoLimits.of(spec.limits), key, value)
        spec.limits = {**{k: v for k, v in spec.limits.items() if not k.startswith("disk.")},
                       **io.stored()}
        return Live.IO
    if key == "label":
        if inst.state != State.STOPPED:
            raise StateError(inst.name, "change the label of", inst.state.value,
                             (State.STOPPED.value,))
        spec.label = check_label(value)
        return Live.NONE
    if key == "boot.autostart":  # read by popek admin boot only: set at any time
        if value.strip().lower() not in BOOLEANS:
            raise InvalidInput(f"invalid boot.autostart {value!r}; allowed: true or false "
                               "(also 1/0, yes/no, on/off)")
        spec.autostart = BOOLEANS[value.strip().lower()]
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
