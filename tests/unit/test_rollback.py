"""No half-done operation survives a failure: a fault injected at each step of each operation.

The core runs over the fake engine and the fake network host of
``test_core_instances`` with the real store.  Each test makes one step of a
multi-step operation fail (the host refuses the port, the engine refuses the
plug, the shaping fails, another command changes the record first so the
compare-and-swap is lost), then checks that every step before it was undone:
no port record, every plug unplugged, every host device torn down, the
instance record as it was, and the same operation succeeding afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from popek.core.lifecycle import State
from popek.core.model import Instance
from popek.core.records import Records
from popek.engines import LaunchSpec
from popek.engines.base import Runtime
from popek.errors import (
    ConflictError,
    EngineError,
    InvalidInput,
    PopekError,
    StoreUnavailable,
)
from popek.network.model import Port
from popek.state.schema import UID_PREFIX, instance_key
from unit.test_core_instances import Env, env, launch  # noqa: F401  (env: the fixture)


class Fault(PopekError):
    """The injected failure."""


def _lan(e: Env) -> None:
    e.networks(e.store).create("lan", "10.99.0.0/24")


def _ports(e: Env) -> list[str]:
    return [kv.key for kv in e.store.range("/popek/ports/")]


def _balanced(calls: list[str], do: str, undo: str) -> bool:
    return calls.count(do) == calls.count(undo)


def _devices_balanced(host_calls: list[str]) -> bool:
    """Every host device made was torn down again (tearing down more is harmless)."""
    made = {c.split()[1] for c in host_calls if c.startswith("port ")}
    gone = {c.split()[1] for c in host_calls if c.startswith("unport ")}
    return made <= gone


def _lose_the_race(e: Env) -> None:
    """Another command changes the record meanwhile: the attach's compare-and-swap loses."""
    e.instances().config_set("web", "limits.pids", "64")


#: each step of a live attach, and how the fault is injected there
ATTACH_STEPS: dict[str, Callable[[Env, pytest.MonkeyPatch], None]] = {
    "port": lambda e, mp: mp.setattr(e.host, "fail_port", True),
    "plug": lambda e, mp: mp.setattr(e.engine, "attach_port", _raiser(e, "attach")),
    "shape": lambda e, mp: mp.setattr(e.host, "shape_port", _raiser(e, "shape")),
    "record": lambda e, mp: mp.setattr(e.engine, "attach_port", _then(e, "attach",
                                                                      _lose_the_race)),
}


def _raiser(e: Env, what: str) -> Callable[..., None]:
    def fail(*_args: Any) -> None:
        if what == "attach":
            e.engine.calls.append("attach refused")
        raise Fault(f"injected: {what} fails")
    return fail


def _then(e: Env, what: str, effect: Callable[[Env], None]) -> Callable[..., None]:
    def plug(spec: LaunchSpec, runtime: Runtime, port: Port) -> None:
        e.engine.calls.append(f"{what} {spec.name} {port.network}")
        effect(e)
    return plug


@pytest.mark.parametrize("step", list(ATTACH_STEPS))
def test_a_failed_live_attach_undoes_every_step(env: Env, step: str,  # noqa: F811
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    _lan(env)
    launch(env)
    before = env.store.get(instance_key("default", "web"))
    ports = _ports(env)
    with monkeypatch.context() as mp:
        ATTACH_STEPS[step](env, mp)
        with pytest.raises((Fault, InvalidInput, ConflictError)):
            env.instances().attach("web", "lan")
    calls = env.engine.calls
    assert _ports(env) == ports, "a port of the failed attach is left"
    assert _balanced(calls, "attach web lan", "detach web lan"), calls
    if step in ("shape", "record"):
        assert calls.count("attach web lan") == 1  # it was plugged, and unplugged again
    assert _devices_balanced(env.host.calls), env.host.calls
    after = env.store.get(instance_key("default", "web"))
    assert after is not None and before is not None
    if step != "record":  # there, the other command's change is the one kept
        assert after.value == before.value
    # and the operation works afterwards, plugged once
    port = env.instances().attach("web", "lan")
    assert [p.host_ifname for p in env.instances().nets.ports(env.instances().get("web"))] == [
        port.host_ifname]
    assert env.engine.calls.count("attach web lan") - env.engine.calls.count("detach web lan") == 1


def test_an_attach_whose_unplug_fails_keeps_its_port_for_detach(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Never a NIC in the guest without its port: the state that made the next attach fail."""
    _lan(env)
    launch(env)
    monkeypatch.setattr(env.host, "shape_port", _raiser(env, "shape"))
    monkeypatch.setattr(env.engine, "detach_port", _raiser(env, "unplug"))
    with pytest.raises(Fault, match="shape fails") as exc:
        env.instances().attach("web", "lan")
    assert any("stays plugged" in note and "popek network detach web lan" in note
               for note in getattr(exc.value, "__notes__", []))
    assert len(_ports(env)) == 1  # the NIC is in the guest: its port stays
    history = env.instances().get("web").history  # and the record says it is attached
    assert history[-1]["event"] == "attached to network lan (the undo of a failed attach failed)"
    monkeypatch.undo()
    env.instances().detach("web", "lan")  # which removes both
    assert _ports(env) == [] and env.engine.calls[-1] == "detach web lan"


def test_a_failed_stopped_attach_leaves_no_port(env: Env) -> None:  # noqa: F811
    _lan(env)
    insts = launch(env)
    insts.stop("web")
    env.host.fail_port = True
    with pytest.raises(InvalidInput):
        env.instances().attach("web", "lan")
    assert _ports(env) == []
    env.host.fail_port = False
    env.instances().attach("web", "lan")
    assert len(_ports(env)) == 1


def test_a_detach_that_fails_after_the_unplug_still_detaches(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    _lan(env)
    launch(env, networks=["lan"])
    monkeypatch.setattr(env.host, "teardown_port", _raiser(env, "teardown"))
    with pytest.raises(Fault):
        env.instances().detach("web", "lan")
    assert "detach web lan" in env.engine.calls
    # the port is left 'deleting' for the network reconcile, which finishes it
    monkeypatch.undo()
    assert [p.state for p in env.instances().nets.ports(env.instances().get("web"))] == [
        "deleting"]
    history = env.instances().get("web").history
    assert history[-1]["event"] == "detached from network lan"


#: each step of a start after the engine process began
@pytest.mark.parametrize("step", ["shape", "record"])
def test_a_start_that_fails_after_the_engine_started_stops_it(
        env: Env, step: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    _lan(env)
    insts = launch(env, networks=["lan"])
    insts.stop("web")
    if step == "shape":
        monkeypatch.setattr(env.host, "shape_port", _raiser(env, "shape"))
    else:  # the store fails to take the outcome 'running' (a full disk, a lost lock)
        real = Records.finish

        def finish(self: Records, inst: Instance, rev: int, state: State, *args: Any) -> int:
            if state == State.RUNNING:
                raise StoreUnavailable("injected: the store refuses the write")
            return real(self, inst, rev, state, *args)
        monkeypatch.setattr(Records, "finish", finish)
    with pytest.raises((Fault, StoreUnavailable)):
        env.instances().start("web")
    assert env.engine.calls[-2:] == ["start web ports=1", "stop web"], env.engine.calls
    assert not env.engine.alive["web"]
    monkeypatch.undo()
    inst = env.instances().get("web")
    assert inst.state == State.STOPPED and inst.runtime is None
    env.instances().start("web")
    assert env.instances().get("web").state == State.RUNNING


@pytest.mark.parametrize("step", ["port", "create", "start", "shape"])
def test_a_failed_launch_leaves_nothing_at_any_step(env: Env, step: str,  # noqa: F811
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _lan(env)
    if step == "port":
        env.host.fail_port = True
    elif step == "create":
        monkeypatch.setattr(env.engine, "create", _raiser(env, "create"))
    elif step == "start":
        env.engine.fail_start = True
    else:
        monkeypatch.setattr(env.host, "shape_port", _raiser(env, "shape"))
    with pytest.raises((Fault, InvalidInput, EngineError)):
        launch(env, networks=["lan"])
    assert env.store.range("/popek/instances/") == []
    assert env.store.range(UID_PREFIX) == []
    assert _ports(env) == []
    assert env.store.range("/popek/owners/") == []
    assert _devices_balanced(env.host.calls), env.host.calls
    assert not env.engine.alive.get("web")


def _refuse_saves(monkeypatch: pytest.MonkeyPatch, event: str) -> None:
    """The store refuses the record of the step whose event starts with ``event``."""
    real = Records.save

    def save(self: Records, inst: Instance, rev: int, what: str) -> int:
        if what.startswith(event):
            raise StoreUnavailable("injected: the store refuses the write")
        return real(self, inst, rev, what)
    monkeypatch.setattr(Records, "save", save)


@pytest.mark.parametrize(("operation", "undo"), [("pause", "resume"), ("resume", "pause")])
def test_a_pause_or_resume_not_recorded_is_undone(
        env: Env, operation: str, undo: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    insts = launch(env)
    if operation == "resume":
        insts.pause("web")
    state = env.instances().get("web").state
    _refuse_saves(monkeypatch, operation)
    with pytest.raises(StoreUnavailable):
        getattr(env.instances(), operation)("web")
    assert env.engine.calls[-2:] == [f"{operation} web", f"{undo} web"]
    assert env.instances().get("web").state == state


def test_a_live_resize_not_recorded_is_undone(env: Env,  # noqa: F811
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    launch(env)
    _refuse_saves(monkeypatch, "config")
    with pytest.raises(StoreUnavailable):
        env.instances().config_set("web", "limits.memory", "256MiB")
    assert env.engine.calls[-2:] == [f"resize web {256 << 20}", f"resize web {128 << 20}"]
    assert env.instances().get("web").spec.memory == 128 << 20


def test_a_live_rate_limit_not_recorded_is_lifted_again(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    _lan(env)
    launch(env, networks=["lan"])
    _refuse_saves(monkeypatch, "config")
    with pytest.raises(StoreUnavailable):
        env.instances().config_set("web", "limits.net", "100Mbit")
    shaped = [c for c in env.host.calls if c.startswith("shape ")]
    assert shaped[-2].endswith(" 100000000") and shaped[-1].endswith(" None"), shaped
    assert "net" not in env.instances().get("web").spec.limits
