"""A popek process killed at each step of attaching or detaching a volume (issue 15.6).

The process is real and really killed (SIGKILL, in a forked child) at each step: after
the volume is marked, after the instance's record lists it, after the engine plugged it
in; and, detaching, before and after the engine unplugged it and after the record
dropped it.  What cannot exist here is the VM: the engine is the fake of
``test_core_instances`` (its "process" a flag), with disk hot-plug.  After the kill,
the storage's reconcile decides by the instance's record: the volume is attached to the
instance exactly when its record lists it, never left busy, never lost; and a detach or
attach afterwards works.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest

from popek.core.instances import Instances
from popek.engines import Capability, LaunchSpec
from popek.engines.base import Runtime
from popek.state.store import SQLiteStore
from popek.storage.service import Storage
from unit.test_core_instances import Env, FakeEngine, env  # noqa: F401 - the fixture

MiB = 1 << 20


class DiskEngine(FakeEngine):
    """The fake engine with block volumes plugged in and out; it kills its own process at
    the step ``kill`` names (``attach-before``, ``attach-after``, ``detach-...``)."""

    capabilities: ClassVar[frozenset[Capability]] = FakeEngine.capabilities | {
        Capability.DISK_HOTPLUG}
    volume_kind = "block"
    kill = ""

    def _step(self, what: str, when: str) -> None:
        if self.kill == f"{what}-{when}":
            os.kill(os.getpid(), signal.SIGKILL)

    def start(self, spec: LaunchSpec, ready_timeout: float) -> Runtime:
        runtime = super().start(spec, ready_timeout)
        runtime.details["disks"] = {}  # as the real engines record their disks
        return runtime

    def attach_disk(self, spec: LaunchSpec, runtime: Runtime, ref: str, files: list[str],
                    path: str = "", key: str = "") -> None:
        self._step("attach", "before")
        runtime.details.setdefault("disks", {})[ref] = {"slot": 0}
        self.calls.append(f"attach_disk {spec.name} {ref}")
        self._step("attach", "after")

    def detach_disk(self, spec: LaunchSpec, runtime: Runtime, ref: str) -> None:
        self._step("detach", "before")
        runtime.details.get("disks", {}).pop(ref, None)
        self.calls.append(f"detach_disk {spec.name} {ref}")
        self._step("detach", "after")

    def grow_disk(self, spec: LaunchSpec, runtime: Runtime, ref: str, size: int) -> None:
        self.calls.append(f"grow_disk {spec.name} {ref} {size}")


@pytest.fixture
def vm(env: Env) -> Env:  # noqa: F811 - the fixture imported above
    env.engine = DiskEngine()
    env.instances().launch("minimal", "web", memory=128 << 20, engine="fake")
    Storage(env.store).create_volume("local", "default", "v", 16 * MiB)
    return env


def killed(host: Env, act: Callable[[Instances], object], kill: str = "",
           save_event: str = "") -> None:
    """Run ``act`` in a forked child that is SIGKILLed at step ``kill`` of the engine, or
    just before its instance record is saved with ``save_event``."""
    path = Path(host.store.path)
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            from popek.core.records import Records

            host.store = SQLiteStore(path)  # its own connection
            assert isinstance(host.engine, DiskEngine)
            host.engine.kill = kill
            real = Records.save

            def save(self: Records, inst: object, rev: int, event: str) -> int:
                if save_event and event.startswith(save_event):
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(self, inst, rev, event)  # type: ignore[arg-type]

            Records.save = save  # type: ignore[method-assign]
            act(host.instances())
        finally:
            os._exit(3)  # not killed: the step was never reached
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def settled(host: Env) -> tuple[str, str, list[str]]:
    """After a reconcile: the volume's state and holder, and the volumes the record lists."""
    storage = host.instances().volumes.reconciled()
    vol = storage.volume("local", "default", "v")
    return vol.state, vol.attached, host.instances().get("web").spec.volumes


@pytest.mark.parametrize(("kill", "save_event", "held"), [
    ("", "volume local/v attached", False),  # marked, not recorded
    ("attach-before", "", True),  # recorded, not plugged in
    ("attach-after", "", True),  # plugged in, the record's runtime not saved
])
def test_an_attach_killed_midway_is_settled_by_the_record(vm: Env, kill: str, save_event: str,
                                                          held: bool) -> None:
    killed(vm, lambda insts: insts.attach_volume("web", "local/v"), kill, save_event)
    before = Storage(vm.store).volume("local", "default", "v")
    assert before.state == "attaching" and before.attached == "default/web"  # the intent
    assert settled(vm) == ("ready", "default/web" if held else "",
                           ["local/v"] if held else [])
    insts = vm.instances()
    if held:  # the detach finishes it (plugged in or not)
        insts.detach_volume("web", "local/v")
    else:  # free: attached again at once
        insts.attach_volume("web", "local/v")
        insts.detach_volume("web", "local/v")
    assert settled(vm) == ("ready", "", [])


def test_a_vm_started_by_an_earlier_popek_keeps_its_disks_until_stopped(vm: Env) -> None:
    """Its runtime record says nothing of disks: popek cannot know what QEMU holds, so an
    unplug is refused rather than the volume freed under the running VM."""
    from popek.errors import StateError

    insts = vm.instances()
    insts.attach_volume("web", "local/v")
    inst, rev = insts.records.load("web")
    assert inst.runtime is not None
    del inst.runtime.details["disks"]
    insts.records.save(inst, rev, "test: as an earlier popek recorded it")
    with pytest.raises(StateError, match="started by an earlier popek"):
        insts.detach_volume("web", "local/v")
    assert settled(vm) == ("ready", "default/web", ["local/v"])


@pytest.mark.parametrize(("kill", "save_event", "held"), [
    ("detach-before", "", True),  # not unplugged
    ("detach-after", "", True),  # unplugged, the record not saved
    ("", "volume local/v detached", True),  # killed as the record is saved
])
def test_a_detach_killed_midway_is_settled_by_the_record(vm: Env, kill: str, save_event: str,
                                                         held: bool) -> None:
    vm.instances().attach_volume("web", "local/v")
    killed(vm, lambda insts: insts.detach_volume("web", "local/v"), kill, save_event)
    assert Storage(vm.store).volume("local", "default", "v").state == "detaching"
    assert settled(vm) == ("ready", "default/web", ["local/v"])
    vm.instances().detach_volume("web", "local/v")  # works again, unplugged or not
    assert settled(vm) == ("ready", "", [])


def test_a_detach_killed_after_its_record_frees_the_volume(vm: Env) -> None:
    """Killed after the record dropped the volume, before the volume was freed."""
    vm.instances().attach_volume("web", "local/v")

    def detach_then_die(insts: Instances) -> None:
        def die(*_args: object) -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        Storage.detach = die  # type: ignore[method-assign]
        insts.detach_volume("web", "local/v")

    killed(vm, detach_then_die)
    assert Storage(vm.store).volume("local", "default", "v").state == "detaching"
    assert settled(vm) == ("ready", "", [])


def test_a_live_attach_and_detach_plug_through_the_engine(vm: Env) -> None:
    insts = vm.instances()
    insts.attach_volume("web", "local/v")
    assert "attach_disk web local/v" in vm.engine.calls
    assert insts.get("web").runtime.details["disks"] == {"local/v": {"slot": 0}}  # type: ignore[union-attr]
    insts.detach_volume("web", "local/v")
    assert "detach_disk web local/v" in vm.engine.calls
    assert settled(vm) == ("ready", "", [])


def test_a_paused_vm_is_not_asked_to_release_a_disk(vm: Env) -> None:
    """A paused guest cannot release a disk: refused at once (not a 30 s wait), nothing
    changed; resumed, the detach works."""
    from popek.errors import StateError

    insts = vm.instances()
    insts.attach_volume("web", "local/v")
    insts.pause("web")
    with pytest.raises(StateError, match="popek resume web first: the guest must release"):
        insts.detach_volume("web", "local/v")
    assert "detach_disk web local/v" not in vm.engine.calls
    assert settled(vm) == ("ready", "default/web", ["local/v"])
    insts.resume("web")
    insts.detach_volume("web", "local/v")
    assert settled(vm) == ("ready", "", [])
