"""Projects (issue 14.3): instances scoped by project, quotas checked before anything is
made, a project deleted only when empty.  On the fake engine of test_core_instances."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from popek.core.instances import Instances
from popek.core.projects import DEFAULT_DISK_KEY, ProjectNotEmpty, Projects, QuotaExceeded
from popek.core.requests import ConfigSet, Launch, ProjectCreate, ProjectDelete
from popek.core.service import Core
from popek.engines import Capability
from popek.errors import WRONG_STATE, AlreadyExists, InvalidInput, NotFound
from popek.state.schema import INSTANCES_PREFIX, UID_PREFIX, project_config_key
from popek.trust.imagesig import set_allow_unsigned
from popek.trust.keys import TrustStore
from unit.test_core_instances import Env

MIB = 1 << 20


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    e = Env(tmp_path)
    for p in ("hauth-a", "hauth-b"):
        Projects(e.store).create(p)
        set_allow_unsigned(TrustStore(e.store), p, True, "test")
    yield e
    e.store.close()


def core(env: Env, project: str = "hauth-a") -> Core:
    c = Core(env.store, project=project)
    c.__dict__["instances"] = Instances(
        env.store, env.images, engines=lambda _: env.engine,  # type: ignore[arg-type,return-value]
        networks=env.networks, project=project)
    return c


def launch(env: Env, name: str, project: str = "hauth-a", vcpus: int = 1,
           memory: int = 128 * MIB) -> None:
    core(env, project).handle(Launch(image="minimal", name=name, vcpus=vcpus, memory=memory,
                                     engine="fake"))


def test_instances_live_in_their_project(env: Env) -> None:
    launch(env, "web", "hauth-a")
    launch(env, "web", "hauth-b")  # the same name in another project
    launch(env, "db", "hauth-b")
    assert [i["name"] for i in core(env, "hauth-a").instances.summaries()] == ["web"]
    assert [(i["project"], i["name"]) for i in core(env, "hauth-b").instances.summaries()] == [
        ("hauth-b", "db"), ("hauth-b", "web")]
    assert len(core(env, "default").instances.summaries(None)) == 3
    assert core(env, "default").instances.summaries() == []
    with pytest.raises(NotFound, match="'db' not found in project 'hauth-a'; existing "
                                       "instances: web"):
        core(env, "hauth-a").instances.get("db")
    assert env.store.get(f"{INSTANCES_PREFIX}hauth-b/db") is not None


def test_launch_in_a_project_that_does_not_exist_is_refused(env: Env) -> None:
    with pytest.raises(NotFound, match="project 'nope' not found; existing projects: "
                                       "default, hauth-a, hauth-b"):
        launch(env, "web", "nope")
    assert env.store.range(INSTANCES_PREFIX) == []


@pytest.mark.parametrize(("key", "value", "kw", "needs"), [
    ("limits.instances", "1", {}, "limits.instances=1 exceeded: 1 used, a new instance needs "
                                  "1 more (2 in all)"),
    ("limits.cpu", "3", {"vcpus": 2}, "limits.cpu=3 exceeded: 2 used, a new instance needs 2 "
                                      "more (4 in all)"),
    ("limits.memory", "200MiB", {}, "limits.memory=200MiB exceeded: 128MiB used, a new "
                                    "instance needs 128MiB more (256MiB in all)"),
])
def test_a_quota_refuses_a_launch_and_nothing_is_created(env: Env, key: str, value: str,
                                                         kw: dict[str, int],
                                                         needs: str) -> None:
    launch(env, "one", **kw)  # type: ignore[arg-type]
    Projects(env.store).set("hauth-a", key, value)
    before = {kv.key for kv in env.store.range("/popek/")}
    calls = len(env.engine.calls)
    with pytest.raises(QuotaExceeded, match=re.escape(needs)) as err:
        launch(env, "two", **kw)  # type: ignore[arg-type]
    assert "project 'hauth-a' quota" in str(err.value) and "\n" not in str(err.value)
    assert [c for c in env.engine.calls[calls:] if not c.startswith("preflight")] == []
    after = {kv.key for kv in env.store.range("/popek/")} - {"/popek/audit/head"}
    assert after <= before
    assert not any(k.startswith(UID_PREFIX) and k not in before for k in after)
    launch(env, "two", "hauth-b", **kw)  # type: ignore[arg-type]  # another project's own
    Projects(env.store).set("hauth-a", key, "")  # unset: no limit
    launch(env, "two", **kw)  # type: ignore[arg-type]


def test_a_config_change_that_grows_past_a_quota_is_refused(env: Env) -> None:
    launch(env, "one", memory=128 * MIB)
    launch(env, "two", memory=128 * MIB)
    Projects(env.store).set("hauth-a", "limits.memory", "384MiB")
    with pytest.raises(QuotaExceeded, match="256MiB used, the change needs 256MiB more"):
        core(env).handle(ConfigSet("one", "limits.memory", "384MiB"))
    assert core(env).instances.get("one").spec.memory == 128 * MIB
    core(env).handle(ConfigSet("one", "limits.memory", "256MiB"))  # fits exactly
    Projects(env.store).set("hauth-a", "limits.memory", "64MiB")  # below what is used
    core(env).handle(ConfigSet("one", "limits.memory", "192MiB"))  # shrinking stays allowed


def test_the_disk_quota_counts_container_disks(env: Env) -> None:
    env.engine.capabilities = env.engine.capabilities | {Capability.DISK_LIMIT}  # a container
    Projects(env.store).set("hauth-a", "limits.disk", "1GiB")
    launch_disk = Launch(image="minimal", name="c1", memory=128 * MIB, engine="fake",
                         limits={"disk": 768 * MIB})
    core(env).handle(launch_disk)
    with pytest.raises(QuotaExceeded, match="limits.disk=1GiB exceeded: 768MiB used"):
        core(env).handle(Launch(image="minimal", name="c2", memory=128 * MIB, engine="fake",
                                limits={"disk": 512 * MIB}))


def test_project_keys_are_checked(env: Env) -> None:
    projects = Projects(env.store)
    for key, value, why in [("limits.cpus", "1", "unknown project key 'limits.cpus'"),
                            ("limits.instances", "-1", "must be a whole number"),
                            ("limits.memory", "lots", "limits.memory"),
                            (DEFAULT_DISK_KEY, "1KiB", "must be from 64MiB")]:
        with pytest.raises(InvalidInput, match=why):
            projects.set("hauth-a", key, value)
    with pytest.raises(NotFound):
        projects.set("nope", "limits.cpu", "2")
    assert projects.quotas("hauth-a") == {}


def test_a_record_of_an_earlier_version_keeps_its_container_default(env: Env) -> None:
    env.store.put(project_config_key("default"), json.dumps({"limits.disk": 80 * MIB}).encode())
    assert Projects(env.store).disk("default") == 80 * MIB
    assert Projects(env.store).quotas("default") == {}


def test_projects_are_created_once_and_deleted_only_when_empty(env: Env) -> None:
    root = core(env, "default")
    with pytest.raises(AlreadyExists):
        root.handle(ProjectCreate("hauth-a"))
    with pytest.raises(AlreadyExists, match="always exists"):
        root.handle(ProjectCreate("default"))
    with pytest.raises(InvalidInput, match="invalid project name"):
        root.handle(ProjectCreate("Bad_Name"))
    launch(env, "web")
    launch(env, "db")
    with pytest.raises(ProjectNotEmpty, match="project 'hauth-a' is not empty: it holds instances "
                                         "db, web; delete them first") as err:
        root.handle(ProjectDelete("hauth-a"))
    assert err.value.exit_code == WRONG_STATE
    assert Projects(env.store).exists("hauth-a")
    with pytest.raises(InvalidInput, match="cannot be deleted"):
        root.handle(ProjectDelete("default"))
    root.handle(ProjectDelete("hauth-b"))
    assert Projects(env.store).names() == ["default", "hauth-a"]
    with pytest.raises(NotFound):
        root.handle(ProjectDelete("hauth-b"))


def test_a_project_holding_volumes_is_kept_and_its_key_goes_with_it(env: Env) -> None:
    """An encrypted volume's key is its project's: the project is not deleted while it
    holds a volume (the key would go and the volume be unreadable), and the key goes
    once the project does."""
    from popek.core.requests import VolumeCreate, VolumeDelete
    from popek.trust.secrets import Secrets

    root = core(env, "default")
    rec = core(env, "hauth-b").handle(VolumeCreate("local", "sec", 16 * MIB, encrypt=True))
    assert rec["encrypted"] is True and Secrets().has_key("hauth-b")
    with pytest.raises(ProjectNotEmpty, match="it holds volumes local/sec"):
        root.handle(ProjectDelete("hauth-b"))
    assert Secrets().has_key("hauth-b")
    core(env, "hauth-b").handle(VolumeDelete("local", "sec"))
    root.handle(ProjectDelete("hauth-b"))
    assert not Secrets().has_key("hauth-b") and not Projects(env.store).exists("hauth-b")
