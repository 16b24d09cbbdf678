"""Configuration as incus has it: ``-c KEY=VALUE``, ``config set/unset``, profiles (no root).

The launch order (built-in defaults, then each profile in order, then the shorthand
options, then ``-c``), the checks of keys and values before anything is made,
``config set`` of several keys at once (all or none), ``config unset`` falling back to
the profiles, profile create/edit/delete through the core (audited), and the refusal
to delete a profile an instance was launched with.  The fake engine and store of
test_core_instances.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from popek.core import config as cfg
from popek.core.profiles import Profile, Profiles, for_launch, from_doc, parse_document
from popek.core.requests import (
    ConfigSet,
    ConfigUnset,
    Launch,
    ProfileCreate,
    ProfileDelete,
    ProfileEdit,
)
from popek.core.service import Core
from popek.errors import AlreadyExists, InvalidInput, NotFound, StateError
from popek.network import Networks
from popek.state.schema import instance_key, profile_key
from unit.test_core_instances import Env


@pytest.fixture
def core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Core, Env]]:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    env = Env(tmp_path)
    yield Core(env.store, env.instances()), env
    env.store.close()


def audit(tmp: Path) -> list[dict[str, Any]]:
    log = tmp / "home" / "audit" / "log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()]


# -- key parsing and checks -------------------------------------------------------------
def test_pairs_are_parsed_and_the_last_of_a_key_wins() -> None:
    assert cfg.parse_pairs(["limits.memory=1GiB", "limits.cpu=2", "limits.cpu=1",
                            "label=a=b"]) == {
        "limits.memory": "1GiB", "limits.cpu": "1", "label": "a=b"}


@pytest.mark.parametrize(("items", "message"), [
    (["limits.memory"], "invalid -c 'limits.memory': use KEY=VALUE with KEY one of "
                        "limits.memory, limits.cpu"),
    (["=1"], "invalid -c '=1': use KEY=VALUE"),
    (["limits.gpu=1"], "unknown key 'limits.gpu'; allowed: limits.memory, limits.cpu, "
                       "limits.pids, limits.net, limits.disk, limits.disk.read_bps, "
                       "limits.disk.write_bps, limits.disk.read_iops, limits.disk.write_iops, "
                       "label"),
])
def test_bad_pairs_are_one_line_naming_the_keys(items: list[str], message: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        cfg.parse_pairs(items)
    assert message in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize(("config", "message"), [
    ({"limits.memory": "lots"}, "invalid limits.memory 'lots'"),
    ({"limits.cpu": "two"}, "invalid limits.cpu 'two': expected a whole number"),
    ({"limits.pids": "3"}, "from 16 to"),
    ({"limits.net": "fast"}, "invalid network rate 'fast'"),
    ({"label": "Bad Label"}, "invalid label 'Bad Label'"),
    ({"limits.gpu": "1"}, "unknown key 'limits.gpu'; allowed:"),
])
def test_a_bad_value_at_launch_creates_nothing(core: tuple[Core, Env], config: dict[str, str],
                                               message: str) -> None:
    c, env = core
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(")):
        c.handle(Launch("minimal", "web", engine="fake", config=config))
    assert env.store.get(instance_key("default", "web")) is None
    assert not any(call.startswith("create") for call in env.engine.calls)


# -- the order of a launch ------------------------------------------------------------
def test_profiles_apply_in_order_then_shorthands_then_c(core: tuple[Core, Env]) -> None:
    c, env = core
    p = Profiles(env.store)
    p.create(Profile("small", config={"limits.memory": "128MiB", "limits.cpu": "1",
                                      "limits.pids": "100"}))
    p.create(Profile("big", config={"limits.memory": "256MiB", "limits.net": "10Mbit",
                                    "label": "web"}))
    spec, _ = for_launch(env.store, "container", ["small", "big"], {}, {}, ())
    assert (spec.memory, spec.vcpus, spec.limits) == (
        256 << 20, 1, {"pids": 100, "net": 10_000_000})
    spec, _ = for_launch(env.store, "container", ["big", "small"], {}, {}, ())
    assert spec.memory == 128 << 20 and spec.label == "web"  # the later profile wins
    # a shorthand given beats the profiles; -c beats the shorthand (as incus's -t vs -c)
    spec, _ = for_launch(env.store, "container", ["big"], {"memory": 192 << 20}, {}, ())
    assert spec.memory == 192 << 20
    spec, _ = for_launch(env.store, "container", ["big"], {"memory": 192 << 20},
                         {"limits.memory": "160MiB"}, ())
    assert spec.memory == 160 << 20
    # nothing given: the built-in defaults (a container: 1024 processes; a VM: none)
    spec, _ = for_launch(env.store, "container", [], {}, {}, ())
    assert (spec.memory, spec.vcpus, spec.limits, spec.label) == (
        512 << 20, 1, {"pids": 1024}, "default")
    assert for_launch(env.store, "qemu", [], {}, {}, ())[0].limits == {}


def test_a_launch_records_its_profiles_and_gets_their_networks(core: tuple[Core, Env]) -> None:
    c, env = core
    nets = Networks(env.store, reconcile=False, backend=env.host)
    nets.create("lan", "10.99.0.0/24")
    nets.create("dmz", "10.98.0.0/24")
    c.handle(ProfileCreate("web", config={"limits.memory": "128MiB"},
                           networks=("lan", "dmz")))
    inst = c.handle(Launch("minimal", "w1", engine="fake", profiles=("web",),
                           networks=("dmz=10.98.0.9",), config={"limits.cpu": "1"}))
    assert inst.spec.profiles == ["web"]
    assert inst.spec.memory == 128 << 20
    ports = {p.network: p.ipv4 for p in c.instances.nets.ports(inst)}
    assert ports == {"lan": ports["lan"], "dmz": "10.98.0.9"}  # --network wins over the profile


def test_a_missing_profile_refuses_the_launch(core: tuple[Core, Env]) -> None:
    c, env = core
    Profiles(env.store).create(Profile("one"))
    with pytest.raises(NotFound, match=r"profile 'two' not found \(profiles: one;"):
        c.handle(Launch("minimal", "web", engine="fake", profiles=("one", "two")))
    assert env.store.get(instance_key("default", "web")) is None


# -- config set, unset, show ----------------------------------------------------------
def test_config_set_of_several_keys_is_all_or_nothing(core: tuple[Core, Env]) -> None:
    c, env = core
    c.handle(Launch("minimal", "web", engine="fake", memory=128 << 20))
    c.handle(ConfigSet("web", values={"limits.memory": "256MiB", "limits.cpu": "1"}))
    assert c.instances.config_show("web")["limits.memory"] == "256MiB"
    assert env.engine.calls[-1] == f"resize web {256 << 20}"  # one resize for both keys
    before = env.store.get(instance_key("default", "web"))
    calls = list(env.engine.calls)
    with pytest.raises(InvalidInput, match="from 16 to"):
        c.handle(ConfigSet("web", values={"limits.memory": "192MiB", "limits.pids": "3"}))
    after = env.store.get(instance_key("default", "web"))
    assert before is not None and after is not None and after.value == before.value
    assert env.engine.calls == calls  # the good key was not applied either


def shown(c: Core) -> dict[str, str]:
    """``config show web``: the keys this test sets (other keys may be there too)."""
    keys = ("limits.memory", "limits.cpu", "limits.pids", "limits.net", "label")
    return {k: v for k, v in c.instances.config_show("web").items() if k in keys}


def test_config_unset_falls_back_to_the_profiles_then_the_defaults(
        core: tuple[Core, Env]) -> None:
    c, env = core
    c.handle(ProfileCreate("p", config={"limits.memory": "192MiB"}))
    c.handle(Launch("minimal", "web", engine="fake", profiles=("p",), config={
        "limits.memory": "128MiB", "limits.net": "10Mbit", "limits.pids": "200"}))
    assert shown(c) == {"limits.memory": "128MiB", "limits.cpu": "1", "limits.pids": "200",
                        "limits.net": "10Mbit", "label": "default"}
    c.handle(ConfigUnset("web", keys=("limits.memory", "limits.net", "limits.pids")))
    assert shown(c) == {"limits.memory": "192MiB", "limits.cpu": "1", "label": "default"}
    with pytest.raises(InvalidInput, match="unknown key 'nope'"):
        c.handle(ConfigUnset("web", keys=("limits.cpu", "nope")))


# -- profiles --------------------------------------------------------------------------
def test_profile_documents_are_checked(core: tuple[Core, Env]) -> None:
    doc = parse_document("description: small\nconfig:\n  limits.cpu: 2\n  limits.memory: 1GiB\n"
                         "networks: [lan]\n")
    assert from_doc("p", doc) == Profile("p", "small", {"limits.cpu": "2",
                                                        "limits.memory": "1GiB"}, ["lan"])
    assert from_doc("p", parse_document('{"config": {}}')) == Profile("p")
    for text, message in [
        ("[1, 2]", "a mapping of description, config, networks"),
        ("colour: red", "unknown field 'colour'"),
        ("name: other", "names profile 'other', not 'p'"),
        ("networks: [lan=10.0.0.1]", "a static address belongs to one instance"),
        ("config: {limits.memory: huge}", "invalid limits.memory 'huge'"),
        ("config: {limits.gpu: 1}", "unknown key 'limits.gpu'"),
        ("config: [a]", "a mapping of KEY: VALUE"),
        ("{a: [", "not JSON or YAML"),
    ]:
        with pytest.raises(InvalidInput, match=message.replace("[", r"\[")):
            from_doc("p", parse_document(text))


def test_profile_requests_are_audited_and_delete_is_refused_in_use(
        core: tuple[Core, Env], tmp_path: Path) -> None:
    c, env = core
    c.handle(ProfileCreate("p", description="d", config={"limits.cpu": "1"}))
    with pytest.raises(AlreadyExists, match="profile 'p' already exists"):
        c.handle(ProfileCreate("p"))
    c.handle(ProfileEdit("p", config={"limits.memory": "128MiB"}, networks=()))
    assert Profiles(env.store).get("p") == Profile("p", "", {"limits.memory": "128MiB"}, [])
    c.handle(Launch("minimal", "a", engine="fake", profiles=("p",)))
    c.handle(Launch("minimal", "b", engine="fake", profiles=("p",)))
    with pytest.raises(StateError, match=r"cannot delete profile 'p': it is in use by "
                                         r"instance\(s\) a, b"):
        c.handle(ProfileDelete("p"))
    assert env.store.get(profile_key("default", "p")) is not None
    c.instances.delete("a", force=True)
    c.instances.delete("b", force=True)
    c.handle(ProfileDelete("p"))
    with pytest.raises(NotFound, match="profile 'p' not found"):
        c.handle(ProfileDelete("p"))
    recs = [(r["op"], r["target"], r["result"].split(":")[0]) for r in audit(tmp_path)
            if r["op"].startswith("profile.") and r["result"] != "started"]
    assert recs == [("profile.create", "p", "ok"), ("profile.create", "p", "error"),
                    ("profile.edit", "p", "ok"), ("profile.delete", "p", "error"),
                    ("profile.delete", "p", "ok"), ("profile.delete", "p", "error")]
    created = next(r for r in audit(tmp_path) if r["op"] == "profile.create")
    assert created["change"] == 'description="d" config={"limits.cpu":"1"} networks=[]'


@pytest.mark.parametrize(("argv", "request_", "stdin"), [
    (["profile", "create", "p", "-c", "limits.cpu=1", "--network", "lan"],
     ProfileCreate("p", config={"limits.cpu": "1"}, networks=("lan",)), ""),
    (["profile", "create", "p", "-c", "limits.memory=lots"],
     ProfileCreate("p", config={"limits.memory": "lots"}), ""),
    (["profile", "delete", "ghost"], ProfileDelete("ghost"), ""),
])
def test_the_cli_and_the_library_leave_the_same_profile_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], request_: Any,
        stdin: str) -> None:
    from unit.test_service_audit import cli, mutating, records

    cli_home, lib_home = tmp_path / "cli", tmp_path / "lib"
    monkeypatch.setenv("POPEK_HOME", str(lib_home))
    proc = cli(cli_home, *argv, stdin=stdin)
    try:
        Core().handle(request_)
        failed = False
    except (InvalidInput, NotFound):
        failed = True
    assert (proc.returncode != 0) == failed, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == failed  # one line, or none
    assert mutating(records(cli_home)) == mutating(records(lib_home)) != []


def test_profile_edit_reads_a_document_on_stdin(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from unit.test_service_audit import cli

    home = tmp_path / "home"
    assert cli(home, "profile", "create", "p").returncode == 0
    proc = cli(home, "profile", "edit", "p",
               stdin="description: one CPU\nconfig:\n  limits.cpu: 1\n")
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(cli(home, "profile", "show", "p", "--format", "json").stdout)
    assert shown == {"name": "p", "description": "one CPU", "config": {"limits.cpu": "1"},
                     "networks": [], "used_by": []}
    bad = cli(home, "profile", "edit", "p", stdin="config: {limits.gpu: 1}\n")
    assert bad.returncode == 2 and bad.stderr.startswith("Error: unknown key 'limits.gpu'")
