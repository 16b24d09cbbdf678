"""Shared volumes (issue 15.3: "attached to one running instance at a time unless marked
shared"): the rules, the record with several holders, and a process killed at each step
of attaching or detaching one holder of several.

Real SQLite store and real files (qemu-img, mkfs.ext4); the instances of the killed
processes run on the fake engine of ``test_core_instances`` (a container's mount cannot
be made without root: tests/integration/test_shared_volumes.py mounts real ones).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from popek.core.instances import Instances
from popek.engines import Capability
from popek.errors import InvalidInput, StateError
from popek.state.store import SQLiteStore
from popek.storage import sharing
from popek.storage.model import SHARED, Volume
from popek.storage.service import Storage
from unit.test_core_instances import Env, env  # noqa: F401 - the fixture
from unit.test_volume_attach_killed import DiskEngine, killed

MiB = 1 << 20


# -- the rules (pure) ------------------------------------------------------------------


def vol(kind: str = "filesystem", attached: str = "", shared_with: tuple[str, ...] = (),
        shared: bool = True) -> Volume:
    return Volume("local", "default", "v", 16 * MiB, kind, "now", attached=attached,
                  shared_with=list(shared_with), config={SHARED: "true"} if shared else {})


@pytest.mark.parametrize(("text", "value"), [("true", True), ("false", False),
                                             (" TRUE ", True)])
def test_the_shared_key_takes_true_or_false(text: str, value: bool) -> None:
    assert sharing.parse(text) is value


@pytest.mark.parametrize("text", ["yes", "1", "", "shared"])
def test_any_other_word_is_refused(text: str) -> None:
    with pytest.raises(InvalidInput, match=r"invalid security.shared .*allowed: true, false"):
        sharing.parse(text)


def test_holders_are_added_in_order_and_the_next_takes_the_first_place() -> None:
    v = sharing.with_holder(vol(), "default/a")
    v = sharing.with_holder(v, "default/b")
    v = sharing.with_holder(v, "default/c")
    assert (v.attached, v.shared_with, v.holders()) == (
        "default/a", ["default/b", "default/c"], ["default/a", "default/b", "default/c"])
    assert sharing.with_holder(v, "default/b").holders() == v.holders()  # held already
    v = sharing.without_holder(v, "default/a")
    assert (v.attached, v.shared_with) == ("default/b", ["default/c"])
    v = sharing.without_holder(v, "default/x")  # not a holder: unchanged
    assert v.holders() == ["default/b", "default/c"]
    v = sharing.without_holder(sharing.without_holder(v, "default/c"), "default/b")
    assert (v.attached, v.shared_with, v.holders()) == ("", [], [])


def test_a_volume_not_marked_shared_has_one_holder() -> None:
    v = sharing.with_holder(vol(shared=False), "default/a")
    with pytest.raises(StateError, match=r"attached to default/a.*unless marked shared "
                                         r"\(popek storage volume set local v "
                                         r"security.shared=true"):
        sharing.with_holder(v, "default/b")


@pytest.mark.parametrize(("driver", "why"), [
    ("dir", "a qcow2 file written by two QEMUs at once has its metadata corrupted"),
    ("ceph", "an RBD image is plugged into one VM at a time for now"),
])
def test_a_block_volume_is_never_marked_shared(driver: str, why: str) -> None:
    with pytest.raises(InvalidInput, match=f"cannot mark block volume v shared: {why}.*only "
                                           "filesystem volumes"):
        sharing.check_mark(vol("block", shared=False), True, driver)
    sharing.check_mark(vol("block", shared=False), False, driver)  # unmarking: fine


def test_unmarking_a_volume_held_by_two_names_them() -> None:
    with pytest.raises(StateError, match="held by default/a, default/b.*detach it from all "
                                         "but one first"):
        sharing.check_mark(vol(attached="default/a", shared_with=("default/b",)), False, "dir")
    sharing.check_mark(vol(attached="default/a"), False, "dir")  # one holder: fine


def test_an_intent_is_about_the_holder_it_names() -> None:
    v = vol(attached="default/a", shared_with=("default/b",))
    assert sharing.subject(v) == "default/a"  # a record of before: its first holder
    v.pending = "default/b"
    assert sharing.subject(v) == "default/b"


def test_a_record_of_before_reads_without_other_holders() -> None:
    old = (b'{"pool": "local", "project": "default", "name": "v", "size": 16777216, '
           b'"type": "filesystem", "attached": "default/a"}')
    v = Volume.from_json(old)
    assert (v.holders(), v.shared()) == (["default/a"], False)
    assert Volume.from_json(v.to_json()) == v


# -- the service -------------------------------------------------------------------------


@pytest.fixture
def storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Storage]:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    store = SQLiteStore(tmp_path / "home" / "state.db")
    yield Storage(store)
    store.close()


def test_a_shared_volume_is_held_by_several_and_deleted_by_none(storage: Storage) -> None:
    storage.create_volume("local", "default", "fs", 16 * MiB, "filesystem")
    storage.attach("local", "default", "fs", "default/a")
    with pytest.raises(StateError, match="attached to default/a"):
        storage.attach("local", "default", "fs", "default/b")
    info = storage.set_config("local", "default", "fs", {SHARED: "true"})
    assert info.shared()
    shown = storage.volume_info("local", "default", "fs")
    assert (shown["shared"], shown["config"], shown["holders"]) == (
        True, {SHARED: "true"}, ["default/a"])
    storage.attach("local", "default", "fs", "default/b")
    assert storage.volume("local", "default", "fs").holders() == ["default/a", "default/b"]
    with pytest.raises(StateError, match="attached to default/a, default/b.*popek storage "
                                         "volume detach local/fs a; popek storage volume "
                                         "detach local/fs b"):
        storage.delete_volume("local", "default", "fs")
    with pytest.raises(StateError, match="held by default/a, default/b"):
        storage.set_config("local", "default", "fs", {SHARED: "false"})
    assert storage.volume("local", "default", "fs").shared()  # nothing changed
    storage.detach("local", "default", "fs", "default/a")
    v = storage.volume("local", "default", "fs")
    assert (v.attached, v.shared_with, v.state) == ("default/b", [], "ready")
    assert not storage.set_config("local", "default", "fs", {SHARED: "false"}).shared()
    assert storage.volume_info("local", "default", "fs")["config"] == {}
    storage.detach("local", "default", "fs", "default/b")
    storage.delete_volume("local", "default", "fs")
    assert storage.volumes() == []


def test_marking_is_refused_for_a_block_volume_and_changes_nothing(storage: Storage) -> None:
    storage.create_volume("local", "default", "b", 16 * MiB, "block")
    with pytest.raises(InvalidInput, match="cannot mark block volume b shared"):
        storage.set_config("local", "default", "b", {SHARED: "true",
                                                     "limits.disk.write_bps": "1MiB"})
    assert storage.volume("local", "default", "b").config == {}  # not even the limit
    with pytest.raises(InvalidInput, match="invalid security.shared 'on'"):
        storage.set_config("local", "default", "b", {SHARED: "on"})


def test_a_volume_is_made_shared_at_create_or_refused_and_not_made(storage: Storage
                                                                  ) -> None:
    v = storage.create_volume("local", "default", "fs", 16 * MiB, "filesystem", shared=True)
    assert v.shared() and storage.volume("local", "default", "fs").config == {SHARED: "true"}
    with pytest.raises(InvalidInput, match="cannot mark block volume b shared"):
        storage.create_volume("local", "default", "b", 16 * MiB, "block", shared=True)
    assert [x.name for x in storage.volumes()] == ["fs"]


def test_a_limit_set_beside_the_mark_keeps_it(storage: Storage) -> None:
    storage.create_volume("local", "default", "fs", 16 * MiB, "filesystem")
    storage.set_config("local", "default", "fs", {SHARED: "true"})
    v = storage.set_config("local", "default", "fs", {"limits.disk.write_bps": "1MiB"})
    assert v.config == {SHARED: "true", "limits.disk.write_bps": str(MiB)}


def test_a_second_holders_intent_leaves_the_first_alone(storage: Storage) -> None:
    """An attach intent names its holder: a reconcile that frees it keeps the others."""
    storage.create_volume("local", "default", "fs", 16 * MiB, "filesystem")
    storage.set_config("local", "default", "fs", {SHARED: "true"})
    storage.attach("local", "default", "fs", "default/a")
    held = storage.attach("local", "default", "fs", "default/b", intent=True)
    assert (held.state, held.pending, held.holders()) == ("attaching", "default/b",
                                                          ["default/a", "default/b"])
    with pytest.raises(StateError, match="attaching"):  # one attach at a time
        storage.attach("local", "default", "fs", "default/c")
    storage.detach("local", "default", "fs", "default/a")  # another holder: intent kept
    v = storage.volume("local", "default", "fs")
    assert (v.state, v.holders()) == ("attaching", ["default/b"])
    storage.settle_attachment("local", "default", "fs")
    v = storage.volume("local", "default", "fs")
    assert (v.state, v.pending, v.holders()) == ("ready", "", ["default/b"])


# -- a process killed while attaching or detaching one holder of two (issue 15.6) --------


class FsEngine(DiskEngine):
    """The fake engine taking filesystem volumes (a container's), hot-plugged."""

    capabilities: ClassVar[frozenset[Capability]] = DiskEngine.capabilities
    volume_kind = "filesystem"


@pytest.fixture
def two(env: Env) -> Env:  # noqa: F811 - the fixture imported above
    env.engine = FsEngine()
    insts = env.instances()
    for name in ("a", "b"):
        insts.launch("minimal", name, memory=128 << 20, engine="fake")
    storage = Storage(env.store)
    storage.create_volume("local", "default", "v", 16 * MiB, "filesystem")
    storage.set_config("local", "default", "v", {SHARED: "true"})
    insts.attach_volume("a", "local/v")
    return env


def settled(host: Env) -> tuple[str, list[str], list[str], list[str]]:
    """After a reconcile: the volume's state and holders, and what a's and b's records
    list."""
    storage = host.instances().volumes.reconciled()
    v = storage.volume("local", "default", "v")
    insts = host.instances()
    return v.state, v.holders(), insts.get("a").spec.volumes, insts.get("b").spec.volumes


@pytest.mark.parametrize(("kill", "save_event", "held"), [
    ("", "volume local/v attached", False),  # marked, not recorded
    ("attach-before", "", True),  # recorded, not plugged in
    ("attach-after", "", True),  # plugged in, the record's runtime not saved
])
def test_a_second_attach_killed_midway_keeps_the_first_holder(two: Env, kill: str,
                                                              save_event: str,
                                                              held: bool) -> None:
    killed(two, lambda insts: insts.attach_volume("b", "local/v"), kill, save_event)
    before = Storage(two.store).volume("local", "default", "v")
    assert (before.state, before.pending) == ("attaching", "default/b")
    assert settled(two) == ("ready", ["default/a", "default/b"] if held else ["default/a"],
                            ["local/v"], ["local/v"] if held else [])
    insts = two.instances()
    if not held:
        insts.attach_volume("b", "local/v")
    insts.detach_volume("b", "local/v")
    assert settled(two) == ("ready", ["default/a"], ["local/v"], [])


@pytest.mark.parametrize(("who", "kill", "save_event", "left"), [
    ("a", "detach-before", "", ["default/a", "default/b"]),  # not unplugged
    ("a", "detach-after", "", ["default/a", "default/b"]),  # unplugged, record not saved
    ("b", "detach-after", "", ["default/a", "default/b"]),
    ("a", "", "volume local/v detached", ["default/a", "default/b"]),  # as it is saved
])
def test_a_detach_of_one_holder_killed_midway_keeps_the_other(two: Env, who: str, kill: str,
                                                              save_event: str,
                                                              left: list[str]) -> None:
    insts = two.instances()
    insts.attach_volume("b", "local/v")
    killed(two, lambda i: i.detach_volume(who, "local/v"), kill, save_event)
    before = Storage(two.store).volume("local", "default", "v")
    assert (before.state, before.pending) == ("detaching", f"default/{who}")
    assert settled(two) == ("ready", left, ["local/v"], ["local/v"])
    two.instances().detach_volume(who, "local/v")  # works again
    other = "b" if who == "a" else "a"
    assert settled(two)[1] == [f"default/{other}"]


def test_a_detach_killed_after_its_record_frees_only_that_holder(two: Env) -> None:
    two.instances().attach_volume("b", "local/v")

    def detach_then_die(insts: Instances) -> None:
        def die(*_args: object) -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        Storage.detach = die  # type: ignore[method-assign]
        insts.detach_volume("a", "local/v")

    killed(two, detach_then_die)
    assert settled(two) == ("ready", ["default/b"], [], ["local/v"])


def test_a_launch_takes_a_shared_volume_held_by_another(two: Env) -> None:
    insts = two.instances()
    insts.launch("minimal", "c", memory=128 << 20, engine="fake", volumes=["local/v"])
    assert Storage(two.store).volume("local", "default", "v").holders() == [
        "default/a", "default/c"]
    insts.delete("c", force=True)
    assert Storage(two.store).volume("local", "default", "v").holders() == ["default/a"]
