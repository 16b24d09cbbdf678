"""The engine protocol says the truth: every capability is implemented by some engine.

A capability an engine declares has its own method on that engine (not the
protocol's placeholder); a capability no engine declares is not in the enum.
"""

from __future__ import annotations

import inspect

import pytest

from popek.engines import ENGINES, Capability, get_engine
from popek.engines.base import Engine

#: the protocol methods a capability promises (the rest need no method of their own)
METHODS = {
    Capability.PAUSE: ("pause", "resume"),
    Capability.CONSOLE: ("console", "console_log"),
    Capability.EXEC: ("exec",),
    Capability.EXEC_STREAM: ("exec_stream",),
    Capability.RESIZE: ("resize",),
    Capability.DISK_LIMIT: ("resize_disk",),
    Capability.IO_LIMIT: ("set_io_limits",),
    Capability.NETWORK_HOTPLUG: ("attach_port", "detach_port"),
    Capability.DISK_HOTPLUG: ("attach_disk", "detach_disk", "grow_disk"),
    Capability.GRACEFUL_STOP: ("stop",),
    Capability.STATS: ("status",),
    Capability.HOST_MOUNTS: ("create",),
}


def test_every_capability_is_declared_by_an_engine() -> None:
    declared = set().union(*(get_engine(n).capabilities for n in ENGINES))
    assert declared == set(Capability), f"declared by no engine: {set(Capability) - declared}"
    assert set(METHODS) == set(Capability)


@pytest.mark.parametrize("name", ENGINES)
def test_declared_capabilities_have_their_methods(name: str) -> None:
    engine = get_engine(name)
    for cap in engine.capabilities:
        for method in METHODS[cap]:
            impl = getattr(type(engine), method, None)
            assert impl is not None, f"{name} declares {cap} without {method}"
            assert impl is not getattr(Engine, method), f"{name}.{method} is the placeholder"
            ours, theirs = (
                len([p for p in inspect.signature(f).parameters.values()
                     if p.default is inspect.Parameter.empty])
                for f in (impl, getattr(Engine, method)))
            assert ours == theirs, f"{name}.{method} does not take the protocol's arguments"


def test_the_sandbox_is_not_an_engine() -> None:
    with pytest.raises(Exception, match="unknown engine 'sandbox'"):
        get_engine("sandbox")
