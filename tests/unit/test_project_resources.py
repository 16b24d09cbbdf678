"""Images and networks belong to a project (issue 14, point 3): each project sees its own
and the ``default`` project's (shared read-only), changes only its own, and sees nothing
of another project's; records written before projects had them are ``default``'s.

Through the core with the fake engine and network host of test_core_instances, as the
identities of tokens of two projects (``ppn-a``, ``ppn-b``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from popek.core import views
from popek.core.auth import ADMIN, OPERATOR, VIEWER, Forbidden, Identity, allowed, host_admin
from popek.core.projects import ProjectNotEmpty
from popek.core.requests import (
    Attach,
    ImageDelete,
    ImageImport,
    ImageSign,
    Launch,
    NetworkCreate,
    NetworkDelete,
    ProjectDelete,
)
from popek.core.service import Core
from popek.errors import AlreadyExists, InvalidInput, NotFound, PopekError
from popek.images.store import PROJECTS_DIR
from popek.network import Network
from popek.network.model import host_name
from popek.state.schema import network_key
from unit.test_auth import core_as, make_project
from unit.test_core_instances import Env
from unit.test_images_manifest import make_image_dir

A, B = "ppn-a", "ppn-b"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    e = Env(tmp_path)
    make_project(e, A)
    make_project(e, B)
    yield e
    e.store.close()


def who(role: str, project: str = A) -> Identity:
    return Identity(f"token {role} of {project}", project, role)


def root(env: Env, project: str | None = None) -> Core:
    return core_as(env, host_admin(), project)


def as_(env: Env, role: str, project: str = A) -> Core:
    return core_as(env, who(role, project))


def names(rows: list[dict[str, object]]) -> list[tuple[object, object]]:
    return [(r["name"], r["project"]) for r in rows]


# -- the migration: records from before projects had networks and images ----------------
def test_a_network_record_without_a_project_is_defaults(env: Env) -> None:
    """A record as popek wrote it before (no ``project`` field) reads as ``default``'s,
    under its old key and name: nothing is moved, nothing lost, every project sees it."""
    old = {"name": "legacy", "subnet": "10.77.0.0/24", "gateway": "10.77.0.1",
           "bridge": "pk-0ld0ld00", "nat": True, "port_isolation": False, "ipv6_subnet": "",
           "created": "2026-01-01T00:00:00+00:00", "state": "ready", "owner": "",
           "dnsmasq_pid": 0, "dnsmasq_start": 0}
    env.store.put(network_key("legacy"), json.dumps(old).encode())
    svc = root(env).networks
    net = svc.get("legacy")
    assert (net.project, net.short, net.subnet, net.bridge, net.nat) == (
        "default", "legacy", "10.77.0.0/24", "pk-0ld0ld00", True)
    assert names(views.network_summaries(root(env))) == [("legacy", "default")]
    assert names(views.network_summaries(as_(env, VIEWER))) == [("legacy", "default")]
    assert svc.resolve("legacy", A).name == "legacy"
    # the record is written back whole, with its project
    assert json.loads(Network.from_json(json.dumps(old).encode()).to_json()) == {
        **old, "project": "default"}


def test_images_made_before_projects_are_defaults(env: Env, tmp_path: Path) -> None:
    """The images directory's images (where every image was) are ``default``'s, seen from
    every project; another project's live apart, in a directory no image can be named."""
    assert [(p, i.name) for p, i in env.images.visible("default")] == [("default", "minimal")]
    assert [(p, i.name) for p, i in env.images.visible(A)] == [("default", "minimal")]
    make_image_dir(tmp_path / "images" / PROJECTS_DIR / A, "tool")
    assert [i.name for i in env.images.list()] == ["minimal"]  # default's only
    assert [(p, i.name) for p, i in env.images.visible(A)] == [(A, "tool"),
                                                               ("default", "minimal")]
    assert [(p, i.name) for p, i in env.images.visible(B)] == [("default", "minimal")]
    assert sorted(i.name for i in env.images.every()) == ["minimal", "tool"]


# -- the roles ------------------------------------------------------------------------------
@pytest.mark.parametrize("action", ["network.create", "network.delete", "image.build",
                                    "image.import", "image.delete"])
def test_a_project_admin_makes_images_and_networks_of_its_project_only(action: str) -> None:
    assert allowed(who(ADMIN), action, A)
    assert not allowed(who(ADMIN), action, B)
    assert not allowed(who(OPERATOR), action, A)
    assert not allowed(who(VIEWER), action, A)
    assert allowed(host_admin(), action, B)


@pytest.mark.parametrize("action", ["network.create", "network.delete", "image.build",
                                    "image.import", "image.delete"])
def test_defaults_images_and_networks_are_the_host_admins_even_to_an_admin_of_default(
        action: str) -> None:
    """They are every project's: an admin token of ``default`` changes them no more than
    another project's admin does (it still runs default's instances)."""
    from popek.core.auth import authorize

    with pytest.raises(Forbidden, match="shared with every project: for the host admin"):
        authorize(who(ADMIN, "default"), action, "default")
    assert allowed(who(ADMIN, "default"), "instance.launch", "default")
    assert allowed(who(ADMIN, "default"), "profile.create", "default")
    assert allowed(host_admin(), action, "default")


def test_an_admin_of_default_deletes_no_shared_network(env: Env) -> None:
    root(env).handle(NetworkCreate("ppn-host"))
    with pytest.raises(Forbidden, match="shared with every project"):
        as_(env, ADMIN, "default").handle(NetworkDelete("ppn-host", force=True))
    with pytest.raises(Forbidden, match="shared with every project"):
        as_(env, ADMIN, "default").handle(NetworkCreate("ppn-other"))
    assert [n.name for n in root(env).networks.list()] == ["ppn-host"]


def test_signing_and_reads() -> None:
    from popek.core.auth import scope

    assert scope("image.sign", A) is None  # the host's keys: the host admin's
    assert not allowed(who(ADMIN), "image.sign", None)
    for action in ("image.list", "image.info", "network.list", "network.info"):
        assert allowed(who(VIEWER), action, A)
        assert not allowed(who(ADMIN), action, B)


# -- networks -------------------------------------------------------------------------------
def test_two_projects_networks_of_one_name_do_not_collide_on_the_host(env: Env) -> None:
    shared = root(env).handle(NetworkCreate("ppn-net"))
    mine = as_(env, ADMIN).handle(NetworkCreate("ppn-net"))
    theirs = as_(env, ADMIN, B).handle(NetworkCreate("ppn-net"))
    assert [n.name for n in (shared, mine, theirs)] == ["ppn-net", f"{A}.ppn-net",
                                                          f"{B}.ppn-net"]
    assert [n.short for n in (shared, mine, theirs)] == ["ppn-net"] * 3
    assert len({n.bridge for n in (shared, mine, theirs)}) == 3
    assert len({n.subnet for n in (shared, mine, theirs)}) == 3
    assert host_name(A, "ppn-net") == mine.name
    with pytest.raises(AlreadyExists, match=f"'ppn-net' already exists in project '{A}'"):
        as_(env, ADMIN).handle(NetworkCreate("ppn-net"))


def test_a_project_sees_its_networks_and_defaults_never_anothers(env: Env) -> None:
    root(env).handle(NetworkCreate("ppn-host"))
    as_(env, ADMIN).handle(NetworkCreate("ppn-a1"))
    as_(env, ADMIN, B).handle(NetworkCreate("ppn-b1"))
    for role in (VIEWER, OPERATOR, ADMIN):
        assert names(views.network_summaries(as_(env, role))) == [
            ("ppn-a1", A), ("ppn-host", "default")]
    assert names(views.network_summaries(as_(env, VIEWER, B))) == [
        ("ppn-b1", B), ("ppn-host", "default")]
    assert names(views.network_summaries(root(env))) == [("ppn-host", "default")]
    assert names(views.network_summaries(root(env, A))) == [("ppn-a1", A),
                                                             ("ppn-host", "default")]
    assert views.network_detail(as_(env, VIEWER), "ppn-host")["project"] == "default"
    assert views.network_detail(as_(env, VIEWER), "ppn-a1")["name"] == "ppn-a1"
    with pytest.raises(NotFound, match=f"'ppn-b1' not found in project '{A}'; existing "
                                       r"networks: ppn-a1, ppn-host \(default\)"):
        views.network_detail(as_(env, VIEWER), "ppn-b1")
    for sneaky in (f"{B}.ppn-b1", f"{A}.ppn-a1", "../ppn-b1"):  # host-wide names: never
        with pytest.raises(NotFound):
            views.network_detail(as_(env, VIEWER), sneaky)
    with pytest.raises(Forbidden):
        core_as(env, who(VIEWER), B).check("network.list")


def test_a_project_admin_never_deletes_defaults_or_anothers_network(env: Env) -> None:
    root(env).handle(NetworkCreate("ppn-host"))
    as_(env, ADMIN, B).handle(NetworkCreate("ppn-b1"))
    before = [n.name for n in root(env).networks.list()]
    with pytest.raises(NotFound, match="the default project's networks are shared read-only"):
        as_(env, ADMIN).handle(NetworkDelete("ppn-host"))
    with pytest.raises(NotFound, match=f"'ppn-b1' not found in project '{A}'"):
        as_(env, ADMIN).handle(NetworkDelete("ppn-b1"))
    with pytest.raises(Forbidden):
        as_(env, OPERATOR, B).handle(NetworkDelete("ppn-b1"))
    with pytest.raises(Forbidden):
        core_as(env, who(ADMIN), B).handle(NetworkDelete("ppn-b1"))
    assert [n.name for n in root(env).networks.list()] == before
    as_(env, ADMIN, B).handle(NetworkDelete("ppn-b1"))
    assert [n.name for n in root(env).networks.list()] == ["ppn-host"]


def test_instances_resolve_a_network_name_in_their_project_first(env: Env) -> None:
    root(env).handle(NetworkCreate("ppn-net"))
    root(env).handle(NetworkCreate("ppn-host"))
    as_(env, ADMIN).handle(NetworkCreate("ppn-net"))
    op = as_(env, OPERATOR)
    op.handle(Launch(image="minimal", name="web", memory=128 << 20, engine="fake",
                     networks=("ppn-net", "ppn-host")))
    ports = {p.network for p in op.networks.ports(f"{A}/web")}
    assert ports == {f"{A}.ppn-net", "ppn-host"}
    info = op.instances.info("web")
    assert sorted(p["network"] for p in info["ports"]) == ["ppn-host", "ppn-net"]
    with pytest.raises(NotFound, match="'ppn-nope' not found"):
        op.handle(Launch(image="minimal", name="web2", memory=128 << 20, engine="fake",
                         networks=("ppn-nope",)))
    # B's instance on default's network: A's viewer sees neither its port nor its lease
    as_(env, OPERATOR, B).handle(Launch(image="minimal", name="db", memory=128 << 20,
                                        engine="fake"))
    as_(env, OPERATOR, B).handle(Attach(network="ppn-host", instance="db"))
    seen = views.network_detail(as_(env, VIEWER), "ppn-host")
    assert [p["instance"] for p in seen["ports"]] == [f"{A}/web"]
    assert list(seen["leases"].values()) == [f"{A}/web"]
    assert [r["ports"] for r in views.network_summaries(as_(env, VIEWER))
            if r["name"] == "ppn-host"] == [1]
    full = views.network_detail(root(env), "ppn-host")
    assert sorted(p["instance"] for p in full["ports"]) == [f"{A}/web", f"{B}/db"]


# -- images ---------------------------------------------------------------------------------
def rootfs_tar(tmp_path: Path) -> Path:
    import tarfile

    src = tmp_path / "rootfs"
    (src / "bin").mkdir(parents=True, exist_ok=True)
    (src / "bin" / "sh").write_bytes(b"#!fake\n")
    out = tmp_path / "rootfs.tar"
    with tarfile.open(out, "w") as tar:
        tar.add(src, arcname=".")
    return out


def test_a_project_admin_imports_images_of_its_project_unsigned(env: Env,
                                                                 tmp_path: Path) -> None:
    tar = rootfs_tar(tmp_path)
    admin = as_(env, ADMIN)
    with pytest.raises(InvalidInput, match="may not sign images with the host's keys"):
        admin.handle(ImageImport(str(tar), "ppn-img"))
    built = admin.handle(ImageImport(str(tar), "ppn-img", sign=False))
    assert built.signature is None
    assert built.image.path.parent == env.images.base / PROJECTS_DIR / A
    assert names(views.image_summaries(as_(env, VIEWER))) == [("ppn-img", A),
                                                              ("minimal", "default")]
    assert names(views.image_summaries(as_(env, VIEWER, B))) == [("minimal", "default")]
    assert names(views.image_summaries(root(env))) == [("minimal", "default")]
    with pytest.raises(NotFound, match=f"image 'ppn-img' not found in project '{B}'"):
        env.images.resolve("ppn-img", B)
    with pytest.raises(Forbidden):
        as_(env, OPERATOR).handle(ImageImport(str(tar), "ppn-op", sign=False))
    with pytest.raises(Forbidden):
        as_(env, ADMIN).handle(ImageSign("ppn-img"))
    root(env, A).handle(ImageSign("ppn-img"))  # the host admin vouches for it
    # A's own image of a default name shadows it in A only
    admin.handle(ImageImport(str(tar), "minimal", sign=False))
    assert env.images.resolve("minimal", A)[0] == A
    assert env.images.resolve("minimal", B)[0] == "default"


def test_image_deletes_stay_in_their_project(env: Env, tmp_path: Path) -> None:
    tar = rootfs_tar(tmp_path)
    as_(env, ADMIN, B).handle(ImageImport(str(tar), "ppn-b-img", sign=False))
    with pytest.raises(NotFound, match=f"image 'minimal' not found in project '{A}'"):
        as_(env, ADMIN).handle(ImageDelete("minimal"))  # default's: read-only
    with pytest.raises(NotFound):
        as_(env, ADMIN).handle(ImageDelete("ppn-b-img"))  # B's: not there
    assert env.images.resolve("ppn-b-img", B)[0] == B
    assert (env.images.base / "minimal").is_dir()
    as_(env, ADMIN, B).handle(ImageDelete("ppn-b-img"))
    assert env.images.in_project(B).names() == []


def test_launch_resolves_the_image_in_the_project_first(env: Env, tmp_path: Path) -> None:
    op = as_(env, OPERATOR)
    op.handle(Launch(image="minimal", name="old", memory=128 << 20, engine="fake"))
    # default's image is in use by A's instance: the host admin cannot delete it
    with pytest.raises(PopekError, match=f"used by instance\\(s\\) {A}/old"):
        root(env).handle(ImageDelete("minimal"))
    # nor may A make its own 'minimal' under it (its next start would change image)
    with pytest.raises(InvalidInput, match="would replace it at their next start"):
        root(env, A).handle(ImageImport(str(rootfs_tar(tmp_path)), "minimal", sign=False))
    make_image_dir(env.images.base / PROJECTS_DIR / A, "ppn-vm")
    op.handle(Launch(image="ppn-vm", name="new", memory=128 << 20, engine="fake"))
    assert op.instances.get("new").spec.image == "ppn-vm"
    with pytest.raises(NotFound, match="image 'ppn-vm' not found in project"):
        as_(env, OPERATOR, B).handle(Launch(image="ppn-vm", name="x", memory=128 << 20,
                                            engine="fake"))
    with pytest.raises(PopekError, match="used by instance"):
        root(env, A).handle(ImageDelete("ppn-vm"))


def test_a_project_holding_networks_or_images_is_not_deleted(env: Env,
                                                            tmp_path: Path) -> None:
    as_(env, ADMIN).handle(NetworkCreate("ppn-net"))
    make_image_dir(env.images.base / PROJECTS_DIR / A, "ppn-img")
    with pytest.raises(ProjectNotEmpty, match="networks ppn-net; images ppn-img"):
        root(env).handle(ProjectDelete(A))
    as_(env, ADMIN).handle(NetworkDelete("ppn-net"))
    as_(env, ADMIN).handle(ImageDelete("ppn-img"))
    root(env).handle(ProjectDelete(A))
