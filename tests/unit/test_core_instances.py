"""The instance core without root: a fake engine, a fake network host, a real store.

``Instances`` takes its engines and its network service from factories; here
the engine is :class:`FakeEngine` (it records every call and keeps a
"process" per instance that a test can kill) and the network service runs
over the fake host of ``test_network_service``.  The state store, the trust
store, the policy, the audit log and the image store are the real ones in
``tmp_path``.  What cannot exist here: engine processes, so an engine
"process" is a flag in the fake (said once here, for every test below).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from popek import errors, proc
from popek.core.instances import Instances
from popek.core.lifecycle import State
from popek.core.records import owner_of
from popek.engines import Capability, ExecResult, LaunchSpec
from popek.engines.base import Liveness, Runtime
from popek.errors import (
    AlreadyExists,
    ConflictError,
    EngineError,
    InvalidInput,
    NotFound,
    StateError,
)
from popek.images import ImageStore
from popek.network import Networks
from popek.network.model import Port
from popek.state.owners import Owner
from popek.state.schema import UID_PREFIX, instance_key
from popek.state.store import KeyValue, Put, SQLiteStore
from popek.trust.imagesig import set_allow_unsigned
from popek.trust.keys import TrustStore
from unit.test_images_manifest import make_image_dir
from unit.test_network_service import FakeHost

#: a process that is certainly not alive: this very pid with a start time it never had
DEAD = Owner(os.getpid(), 1)


class FakeEngine:
    """An engine whose instances are flags: it records every call made to it."""

    name = "fake"
    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {Capability.PAUSE, Capability.EXEC, Capability.RESIZE, Capability.NETWORK_HOTPLUG})
    port_kind = "tap"
    volume_kind = ""
    id_range = 1

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.alive: dict[str, bool] = {}
        self.fail_start = False
        self.next_pid = 100

    def preflight(self, spec: LaunchSpec) -> None:
        self.calls.append(f"preflight {spec.name}")

    def create(self, spec: LaunchSpec) -> None:
        self.calls.append(f"create {spec.name}")
        spec.workdir.mkdir(parents=True, exist_ok=True)

    def start(self, spec: LaunchSpec, ready_timeout: float) -> Runtime:
        self.calls.append(f"start {spec.name} ports={len(spec.ports)}")
        if self.fail_start:
            raise EngineError(f"{spec.name}: the guest never became ready")
        self.alive[spec.name] = True
        self.next_pid += 1
        return Runtime(self.next_pid, 7, {"accel": "fake"})

    def stop(self, spec: LaunchSpec, runtime: Runtime, force: bool, timeout: float) -> str:
        self.calls.append(f"stop {spec.name}")
        self.alive[spec.name] = False
        return "forced" if force else "graceful"

    def pause(self, spec: LaunchSpec, runtime: Runtime) -> None:
        self.calls.append(f"pause {spec.name}")

    def resume(self, spec: LaunchSpec, runtime: Runtime) -> None:
        self.calls.append(f"resume {spec.name}")

    def liveness(self, spec: LaunchSpec, runtime: Runtime) -> Liveness:
        if self.alive.get(spec.name):
            return Liveness(True)
        return Liveness(False, "the fake process exited")

    def status(self, spec: LaunchSpec, runtime: Runtime) -> dict[str, Any]:
        return {"fake_status": "running" if self.alive.get(spec.name) else "gone"}

    def exec(self, spec: LaunchSpec, argv: list[str], stdin: bytes, timeout: float) -> ExecResult:
        self.calls.append(f"exec {spec.name} {' '.join(argv)}")
        return ExecResult(0, b"out", b"")

    def resize(self, spec: LaunchSpec, runtime: Runtime) -> None:
        self.calls.append(f"resize {spec.name} {spec.memory}")

    def attach_port(self, spec: LaunchSpec, runtime: Runtime, port: Port) -> None:
        self.calls.append(f"attach {spec.name} {port.network}")

    def detach_port(self, spec: LaunchSpec, runtime: Runtime, port: Port) -> None:
        self.calls.append(f"detach {spec.name} {port.network}")

    def cleanup(self, spec: LaunchSpec) -> None:
        self.calls.append(f"cleanup {spec.name}")
        self.alive[spec.name] = False

    def destroy(self, spec: LaunchSpec) -> None:
        self.calls.append(f"destroy {spec.name}")


class Env:
    """One host: a store, images, the fake engine and the fake network host."""

    def __init__(self, tmp: Path) -> None:
        self.store = SQLiteStore(tmp / "home" / "state.db")
        make_image_dir(tmp / "images", "minimal")
        self.images = ImageStore(root=tmp / "images", cache=tmp / "cache")
        set_allow_unsigned(TrustStore(self.store), "default", True, "test")
        self.engine = FakeEngine()
        self.host = FakeHost()
        self.net_builds = 0

    def networks(self, store: Any) -> Networks:
        self.net_builds += 1
        return Networks(store, reconcile=False, backend=self.host)

    def instances(self) -> Instances:
        """A new core, as each command builds one."""
        return Instances(self.store, self.images, engines=lambda _: self.engine,  # type: ignore[arg-type,return-value]
                         networks=self.networks)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    e = Env(tmp_path)
    yield e
    e.store.close()


def launch(env: Env, name: str = "web", **kw: Any) -> Instances:
    insts = env.instances()
    insts.launch("minimal", name, memory=128 << 20, engine="fake", **kw)
    return insts


def set_owner(env: Env, name: str, owner: Owner) -> None:
    inst = env.instances().get(name)
    env.store.put(owner_of(inst), owner.to_bytes())


def force_state(env: Env, name: str, state: State, runtime: bool = True) -> None:
    """Rewrite a record as a popek process that died mid-operation would have left it."""
    insts = env.instances()
    inst, rev = insts.records.load(name)
    inst.state = state
    if not runtime:
        inst.runtime = None
    insts.records.save(inst, rev, f"test: {state.value}")


# -- lifecycle -----------------------------------------------------------------------
def test_constructing_the_core_does_no_work(env: Env) -> None:
    launch(env)
    env.engine.alive["web"] = False  # the engine process died
    calls = list(env.engine.calls)
    env.instances()
    assert env.engine.calls == calls, "the constructor called the engine"
    assert env.instances().get("web").state == State.RUNNING  # nothing reconciled yet
    assert env.net_builds == 0


def test_lifecycle_through_every_state(env: Env) -> None:
    insts = launch(env)
    assert insts.get("web").state == State.RUNNING
    insts.pause("web")
    assert insts.get("web").state == State.PAUSED
    with pytest.raises(StateError, match="needs it to be one of: running"):
        insts.exec("web", ["true"])
    insts.resume("web")
    assert insts.exec("web", ["echo", "x"]).stdout == b"out"
    assert insts.stop("web") == "graceful"
    assert insts.get("web").state == State.STOPPED
    assert insts.get("web").runtime is None
    insts.start("web")
    assert insts.get("web").state == State.RUNNING
    with pytest.raises(StateError):
        insts.delete("web")  # running, no force
    insts.delete("web", force=True)
    with pytest.raises(NotFound):
        insts.get("web")
    assert [c.split()[0] for c in env.engine.calls] == [
        "preflight", "create", "start", "pause", "resume", "exec", "stop", "start",
        "stop", "cleanup", "destroy"]
    assert env.store.range(UID_PREFIX) == []
    assert env.store.range("/popek/owners/") == []
    assert not (Path(os.environ["POPEK_HOME"]) / "instances" / "default" / "web").exists()


def test_uids_are_distinct_and_freed(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranges are handed out round the slots: a freed one comes back only after the others
    (files its old instance left are not given to the next one at once)."""
    from popek.core import ids

    monkeypatch.setattr(ids, "VMM_UID_COUNT", 3)
    insts = launch(env, "a")
    launch(env, "b")
    uids = [insts.get("a").uid, insts.get("b").uid]
    assert uids == [ids.VMM_UID_BASE, ids.VMM_UID_BASE + 1]
    insts.delete("a", force=True)
    launch(env, "c")
    assert insts.get("c").uid == ids.VMM_UID_BASE + 2, "the next slot, not the one just freed"
    launch(env, "d")
    assert insts.get("d").uid == ids.VMM_UID_BASE, "round the slots, a freed range is used again"
    with pytest.raises(errors.PopekError, match="no free range of 1 host uids left"):
        launch(env, "e")
    assert not insts.records.exists("e")


def test_failed_launch_leaves_nothing(env: Env) -> None:
    env.engine.fail_start = True
    nets = env.networks(env.store)
    nets.create("lan", "10.99.0.0/24")
    with pytest.raises(EngineError, match="never became ready"):
        launch(env, networks=["lan"])
    assert env.store.range("/popek/instances/") == []
    assert env.store.range(UID_PREFIX) == []
    assert env.store.range("/popek/ports/") == []
    assert env.store.range("/popek/owners/") == []
    assert "cleanup web" in env.engine.calls


def test_launch_refuses_bad_input_before_any_engine_call(env: Env) -> None:
    with pytest.raises(InvalidInput, match="invalid instance name"):
        launch(env, "Bad_Name")
    with pytest.raises(NotFound, match="image"):
        env.instances().launch("nope", "web", engine="fake")
    launch(env)
    calls = list(env.engine.calls)
    with pytest.raises(AlreadyExists):
        launch(env)
    assert env.engine.calls == calls


def test_one_network_service_per_operation(env: Env) -> None:
    nets = env.networks(env.store)
    nets.create("lan", "10.99.0.0/24")
    nets.create("dmz", "10.98.0.0/24")
    env.net_builds = 0
    launch(env, networks=["lan", "dmz"])
    assert env.net_builds == 1
    insts = env.instances()
    insts.detach("web", "dmz")
    assert env.net_builds == 2
    assert [p.network for p in insts.nets.ports(insts.get("web"))] == ["lan"]
    assert any(c.startswith("shape ") for c in env.host.calls)


def test_config_set_resizes_a_running_instance_and_refuses_bad_values(env: Env) -> None:
    insts = launch(env)
    insts.config_set("web", "limits.memory", "256MiB")
    assert insts.get("web").spec.memory == 256 << 20
    assert env.engine.calls[-1] == f"resize web {256 << 20}"
    before = env.store.get(instance_key("default", "web"))
    with pytest.raises(InvalidInput, match="unknown key"):
        insts.config_set("web", "limits.gpu", "1")
    # the fake engine has no bounded writable layer (as a VM): refused, nothing changed
    with pytest.raises(InvalidInput, match="limits.disk applies to containers"):
        insts.config_set("web", "limits.disk", "1GiB")
    with pytest.raises(StateError, match="change the label of"):
        insts.config_set("web", "label", "other")
    assert env.store.get(instance_key("default", "web")) == before


# -- reconcile after each kind of crash ----------------------------------------------
def test_reconcile_marks_a_dead_engine_process_stopped(env: Env) -> None:
    launch(env)
    env.engine.alive["web"] = False
    insts = env.instances()
    assert insts.reconcile(["web"]) == ["web: stopped (the fake process exited)"]
    inst = insts.get("web")
    assert (inst.state, inst.reason, inst.runtime) == (
        State.STOPPED, "the fake process exited", None)
    assert insts.reconcile() == []


def test_reconcile_rolls_back_a_start_whose_popek_died_before_ready(env: Env) -> None:
    launch(env)
    force_state(env, "web", State.STARTING, runtime=False)
    set_owner(env, "web", DEAD)
    insts = env.instances()
    assert insts.reconcile() == ["web: interrupted start rolled back"]
    assert insts.get("web").state == State.STOPPED
    assert env.engine.calls[-1] == "cleanup web"
    assert insts.records.owner(insts.get("web")) is None


def test_reconcile_settles_an_interrupted_stop_whose_guest_still_runs(env: Env) -> None:
    launch(env)
    force_state(env, "web", State.STOPPING)
    set_owner(env, "web", DEAD)
    assert env.instances().reconcile() == ["web: interrupted operation settled as running"]
    assert env.instances().get("web").state == State.RUNNING


def test_reconcile_finishes_an_interrupted_delete(env: Env) -> None:
    launch(env)
    force_state(env, "web", State.DELETING)
    set_owner(env, "web", DEAD)
    assert env.instances().reconcile() == ["web: finished an interrupted delete"]
    with pytest.raises(NotFound):
        env.instances().get("web")
    assert env.store.range(UID_PREFIX) == []


def test_reconcile_leaves_an_intent_whose_owner_lives(env: Env) -> None:
    launch(env)
    force_state(env, "web", State.STARTING, runtime=False)
    set_owner(env, "web", Owner.me())
    calls = list(env.engine.calls)
    assert env.instances().reconcile() == []
    assert env.instances().get("web").state == State.STARTING
    assert env.engine.calls == calls


def test_reconcile_of_named_instances_touches_no_other(env: Env) -> None:
    launch(env, "a")
    launch(env, "b")
    env.engine.alive["a"] = env.engine.alive["b"] = False
    insts = env.instances()
    assert insts.reconcile(["a"]) == ["a: stopped (the fake process exited)"]
    assert insts.get("b").state == State.RUNNING


# -- the race of issue 11 ------------------------------------------------------------
class RacingStore(SQLiteStore):
    """A store that runs ``hook`` once, just before the first read of owner keys."""

    hook: Any = None

    def _fire(self, key: str) -> None:
        if key.startswith("/popek/owners/") and self.hook is not None:
            hook, self.hook = self.hook, None
            hook()

    def get(self, key: str) -> KeyValue | None:
        self._fire(key)
        return super().get(key)

    def range(self, prefix: str) -> list[KeyValue]:
        self._fire(prefix)
        return super().range(prefix)


def test_reconcile_interleaved_with_a_finishing_launch_leaves_it_running(
        env: Env, tmp_path: Path) -> None:
    """A reconcile reads the record (starting, owned by the launch); the launch then
    finishes (running, owner key dropped); the reconcile reads the owner key: gone.

    On the code of issue 11 the reconcile judged its stale copy (starting, no
    runtime, no owner) an interrupted start and called the engine's cleanup
    (``runc delete --force`` / QEMU killed) before its write lost the compare:
    this test failed there with "cleanup web" in the engine's calls.  Now the
    reconcile claims the record by its revision before it acts, the claim
    fails, and nothing is touched.
    """
    store = RacingStore(env.store.path)
    env.store = store
    insts = env.instances()
    # a launch that has written its intent (starting, owned by a live process)
    env.engine.fail_start = False
    inst, rev = insts.records.create("web", _spec(), 1, "1")
    runtime = env.engine.start(insts._launch_spec(inst, lookup=False), 1)

    def launch_finishes() -> None:
        inst.runtime = runtime
        insts.records.finish(inst, rev, State.RUNNING, "started")

    store.hook = launch_finishes
    calls = list(env.engine.calls)
    assert insts.reconcile() == []
    assert env.engine.calls == calls, "reconcile acted on a launch that had finished"
    assert insts.get("web").state == State.RUNNING
    assert env.engine.alive["web"]


def test_two_reconcilers_claim_a_dead_intent_once(env: Env, monkeypatch: pytest.MonkeyPatch
                                                   ) -> None:
    launch(env)
    force_state(env, "web", State.STARTING, runtime=False)
    set_owner(env, "web", DEAD)
    first, second = env.instances(), env.instances()
    inst, rev = first.records.load("web")
    assert first.records.claim(inst, rev)
    # the second runs in another popek process (here: init's identity stands for it)
    other = Owner(1, proc.start_time(1) or 0)
    with monkeypatch.context() as m:
        m.setattr(Owner, "me", classmethod(lambda cls: other))
        assert not second.records.claim(inst, rev), "a second process claimed it too"
        assert second.reconcile() == []
    assert env.engine.calls[-1] == "start web ports=0", "nobody acted before the claim"
    assert first.reconciler._settle(inst, rev, env.engine) == \
        "web: interrupted start rolled back"


def test_a_lost_compare_is_a_conflict_not_a_store_failure(env: Env) -> None:
    insts = launch(env)
    inst, rev = insts.records.load("web")
    env.store.txn([], [Put(inst.key, inst.to_json())])  # someone else wrote it
    with pytest.raises(ConflictError, match="changed by another operation") as exc:
        insts.records.save(inst, rev, "late")
    assert exc.value.exit_code == 5


def _spec() -> Any:
    from popek.core.model import InstanceSpec

    return InstanceSpec("minimal", "fake", 1, 128 << 20)


# -- a command's cost does not grow with the instance count ---------------------------
class CountingStore(SQLiteStore):
    """A store that counts the reads of whole instance ranges."""

    full_reads = 0

    def range(self, prefix: str) -> list[KeyValue]:
        if prefix.startswith("/popek/instances/"):
            self.full_reads += 1
        return super().range(prefix)


def test_launch_and_start_read_no_instance_records_but_their_own(env: Env) -> None:
    env.store = CountingStore(env.store.path)
    for i in range(3):
        launch(env, f"n{i}")
    insts = env.instances()
    insts.stop("n1")
    before = env.store.full_reads
    launch(env, "last")
    env.instances().start("n1")
    assert env.store.full_reads == before, "a launch or start read every instance record"
    active = {a.name: a for a in env.instances().records.active()}
    assert set(active) == {"n0", "n1", "n2", "last"}
    assert active["last"].cpus == tuple(env.instances().get("last").runtime.details["cpus"])


def test_the_active_index_follows_every_state_change(env: Env) -> None:
    insts = launch(env)
    assert [a.name for a in insts.records.active()] == ["web"]
    insts.stop("web")
    assert insts.records.active() == []
    insts.start("web")
    env.engine.alive["web"] = False
    insts.reconcile()
    assert insts.records.active() == []
    insts.start("web")
    insts.delete("web", force=True)
    assert insts.records.active() == [] and env.store.range("/popek/active/") == []


def test_an_index_missing_from_an_older_store_is_built_once(env: Env) -> None:
    launch(env, "a")
    launch(env, "b")
    env.instances().stop("b")
    env.store.delete("/popek/active/", prefix=True)
    env.store.delete("/popek/active-index")
    assert [a.name for a in env.instances().records.active()] == ["a"]


POLICY = """version = 2
mode = "enforcing"
labels = ["default", "bank-a", "bank-b"]

[[conflict]]
name = "banks"
labels = ["bank-a", "bank-b"]
"""


def test_a_denial_caused_by_a_dead_instance_is_settled_and_decided_again(env: Env) -> None:
    from popek.trust.policy import PolicyDenied, PolicyStore

    PolicyStore(TrustStore(env.store)).apply(POLICY, None)
    launch(env, "a", label="bank-a")
    with pytest.raises(PolicyDenied, match="conflicts with running label 'bank-a'"):
        launch(env, "b", label="bank-b")
    env.engine.alive["a"] = False  # a died; its record still says running
    launch(env, "b", label="bank-b")
    insts = env.instances()
    assert insts.get("a").state == State.STOPPED
    assert insts.get("b").state == State.RUNNING


def test_list_reconciles_every_instance_reading_each_record_once(env: Env) -> None:
    env.store = CountingStore(env.store.path)
    launch(env, "a")
    launch(env, "b")
    launch(env, "c")
    force_state(env, "c", State.DELETING)
    set_owner(env, "c", DEAD)
    env.engine.alive["a"] = False
    insts = env.instances()
    before = env.store.full_reads
    listed = {i.name: i for i in insts.settled()}
    assert env.store.full_reads == before + 1
    assert set(listed) == {"a", "b"}, "the interrupted delete of c was finished"
    assert (listed["a"].state, listed["a"].reason) == (State.STOPPED, "the fake process exited")
    assert listed["b"].state == State.RUNNING
