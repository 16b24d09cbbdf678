"""API tokens and roles (issue 14.3): only a hash is stored, verify refuses what it must,
authorize's table holds, and Core.handle enforces it and audits who asked."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from popek.core import auth
from popek.core.auth import (
    ADMIN,
    OPERATOR,
    VIEWER,
    Forbidden,
    Identity,
    TokenRejected,
    Tokens,
    allowed,
    authorize,
    host_admin,
)
from popek.core.instances import Instances
from popek.core.projects import Projects
from popek.core.requests import (
    KeyGen,
    Launch,
    ProjectCreate,
    ProjectSet,
    Stop,
    TokenCreate,
    TokenRevoke,
)
from popek.core.service import Core
from popek.errors import DENIED, InvalidInput, NotFound
from popek.state.schema import TOKENS_PREFIX
from popek.state.store import SQLiteStore
from popek.trust.imagesig import set_allow_unsigned
from popek.trust.keys import TrustStore
from unit.test_core_instances import Env


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "state.db")
    yield s
    s.close()


# -- tokens ---------------------------------------------------------------------------
def test_only_the_hash_of_the_secret_is_stored(store: SQLiteStore) -> None:
    token, secret = Tokens(store).create("default", VIEWER, name="ci")
    stored = b"".join(kv.value for kv in store.range("/popek/"))
    assert secret.encode() not in stored
    assert secret.split(".")[2].encode() not in stored
    assert json.loads(store.range(TOKENS_PREFIX)[0].value)["hash"] == \
        hashlib.sha256(secret.encode()).hexdigest() == token.hash
    assert "hash" not in token.public()


def test_verify_gives_the_identity_of_its_project_and_role(store: SQLiteStore) -> None:
    token, secret = Tokens(store).create("default", OPERATOR, console=True, name="ci")
    who = Tokens(store).verify(secret)
    assert who == Identity(f"token ci ({token.id})", "default", OPERATOR, True)
    assert not who.host_admin


@pytest.mark.parametrize("bad", ["", "nonsense", "pk1.abc.def", "pk1..x", "pk1.a.b.c"])
def test_unknown_secrets_are_rejected_with_the_denied_code(store: SQLiteStore,
                                                           bad: str) -> None:
    Tokens(store).create("default", ADMIN)
    with pytest.raises(TokenRejected, match="not known") as err:
        Tokens(store).verify(bad)
    assert err.value.exit_code == DENIED


def test_a_wrong_secret_of_a_known_id_is_rejected(store: SQLiteStore) -> None:
    _, secret = Tokens(store).create("default", ADMIN)
    forged = secret[:-4] + ("AAAA" if not secret.endswith("AAAA") else "BBBB")
    with pytest.raises(TokenRejected, match="not known"):
        Tokens(store).verify(forged)


def test_verify_compares_in_constant_time(store: SQLiteStore,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    token, secret = Tokens(store).create("default", ADMIN)
    Tokens(store).verify(secret)
    assert calls == [(token.hash, token.hash)]
    with pytest.raises(TokenRejected):
        Tokens(store).verify("pk1.000000000000.nope")  # unknown id: compared all the same
    assert len(calls) == 2


def test_a_revoked_token_is_rejected_and_stays_listed(store: SQLiteStore) -> None:
    tokens = Tokens(store)
    token, secret = tokens.create("default", ADMIN, name="old")
    tokens.revoke(token.id)
    with pytest.raises(TokenRejected, match="revoked"):
        tokens.verify(secret)
    assert [t.revoked is not None for t in tokens.list()] == [True]
    with pytest.raises(NotFound, match="existing tokens"):
        tokens.revoke("nosuch")


def test_an_expired_token_is_rejected(store: SQLiteStore,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    token, secret = Tokens(store).create("default", ADMIN,
                                         expires=datetime.now(UTC) + timedelta(days=1))
    Tokens(store).verify(secret)
    later = datetime.now(UTC) + timedelta(days=2)
    monkeypatch.setattr(auth, "_now", lambda: later)
    with pytest.raises(TokenRejected, match="expired"):
        Tokens(store).verify(secret)


@pytest.mark.parametrize(("kw", "why"), [({"role": "king"}, "invalid role"),
                                         ({"project": "Bad!"}, "invalid project name"),
                                         ({"name": "no spaces"}, "invalid token name")])
def test_bad_token_requests_change_nothing(store: SQLiteStore, kw: dict[str, str],
                                           why: str) -> None:
    args = {"project": "default", "role": VIEWER, **kw}
    with pytest.raises(InvalidInput, match=why):
        Tokens(store).create(args.pop("project"), args.pop("role"), **args)  # type: ignore[arg-type]
    assert Tokens(store).list() == []


def test_a_project_admin_lists_and_revokes_only_its_own_tokens(store: SQLiteStore) -> None:
    tokens = Tokens(store)
    a, _ = tokens.create("default", ADMIN)
    Projects(store).create("hauth-b")
    b, _ = tokens.create("hauth-b", ADMIN)
    assert [t.id for t in tokens.list("hauth-b")] == [b.id]
    with pytest.raises(NotFound) as err:
        tokens.revoke(a.id, "hauth-b")
    assert a.id not in str(err.value).split("not found")[1]  # no id of another project shown
    assert tokens.get(a.id).revoked is None


# -- the table -------------------------------------------------------------------------
def who(role: str, project: str = "hauth-a", console: bool = False) -> Identity:
    return Identity(f"token {role}", project, role, console)


@pytest.mark.parametrize("action", ["instance.launch", "instance.stop", "instance.delete",
                                    "config.set", "network.attach", "profile.create",
                                    "token.create", "project.set", "session.exec"])
def test_a_viewer_cannot_mutate(action: str) -> None:
    with pytest.raises(Forbidden, match="a viewer may only read"):
        authorize(who(VIEWER, console=True), action, "hauth-a")
    authorize(who(VIEWER), "instance.list", "hauth-a")
    authorize(who(VIEWER), "instance.info", "hauth-a")


@pytest.mark.parametrize("role", [VIEWER, OPERATOR, ADMIN])
@pytest.mark.parametrize("action", ["instance.list", "instance.info", "instance.launch",
                                    "instance.stop", "session.console"])
def test_no_role_reaches_another_project(role: str, action: str) -> None:
    with pytest.raises(Forbidden, match="belongs to project 'hauth-a'"):
        authorize(who(role, console=True), action, "hauth-b")


def test_an_operator_runs_instances_but_changes_nothing_else() -> None:
    op = who(OPERATOR)
    for action in ("instance.launch", "instance.stop", "config.set", "network.attach",
                   "sandbox.run"):
        assert allowed(op, action, "hauth-a"), action
    for action in ("profile.create", "token.create", "project.set"):
        assert not allowed(op, action, "hauth-a"), action
    for action in ("network.create", "trust.keygen", "policy.apply", "project.create",
                   "image.build", "host.reset"):
        assert not allowed(op, action, auth.scope(action, "hauth-a")), action


def test_a_project_admin_manages_its_project_not_the_host() -> None:
    admin = who(ADMIN)
    for action in ("instance.launch", "profile.create", "token.create", "token.revoke"):
        assert allowed(admin, action, "hauth-a"), action
    assert not allowed(admin, "project.set", "hauth-a")  # its own quotas: the host's call
    for action in ("network.create", "trust.add", "policy.apply", "project.delete"):
        assert not allowed(admin, action, None), action


@pytest.mark.parametrize("action", ["session.console", "session.exec"])
def test_console_and_exec_need_the_grant(action: str) -> None:
    assert not allowed(who(OPERATOR), action, "hauth-a")
    assert not allowed(who(ADMIN), action, "hauth-a")
    assert allowed(who(OPERATOR, console=True), action, "hauth-a")
    assert allowed(who(ADMIN, console=True), action, "hauth-a")
    assert not allowed(who(VIEWER, console=True), action, "hauth-a")


def test_the_host_admin_may_do_everything_everywhere() -> None:
    root = host_admin()
    assert root.host_admin and root.name == "root@host"
    for action in ("instance.launch", "session.exec", "policy.apply", "project.delete"):
        assert allowed(root, action, "hauth-b") and allowed(root, action, None)


# -- through the core: enforced and audited ----------------------------------------------
@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    e = Env(tmp_path)
    yield e
    e.store.close()


def make_project(env: Env, name: str) -> None:
    """A project whose unsigned test image may launch (trust is per project)."""
    Projects(env.store).create(name)
    set_allow_unsigned(TrustStore(env.store), name, True, "test")


def core_as(env: Env, identity: Identity | None = None, project: str | None = None) -> Core:
    core = Core(env.store, identity=identity, project=project)
    core.__dict__["instances"] = Instances(
        env.store, env.images, engines=lambda _: env.engine,  # type: ignore[arg-type,return-value]
        networks=env.networks, project=core.project)
    return core


def audit(env: Env, tmp_path: Path) -> list[dict[str, Any]]:
    log = tmp_path / "home" / "audit" / "log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_records_name_the_identity_and_project(env: Env, tmp_path: Path) -> None:
    core_as(env).handle(ProjectCreate("hauth-a"))
    set_allow_unsigned(TrustStore(env.store), "hauth-a", True, "test")
    _, secret = core_as(env).handle(TokenCreate("hauth-a", OPERATOR, token_name="ci"))
    me = Tokens(env.store).verify(secret)
    core_as(env, me).handle(Launch(image="minimal", name="web", memory=128 << 20,
                                   engine="fake"))
    recs = audit(env, tmp_path)
    assert [(r["op"], r["identity"], r.get("project")) for r in recs
            if r["result"] == "ok"] == [
        ("project.create", "root@host", None),
        ("token.create", "root@host", "hauth-a"),
        ("instance.launch", me.name, "hauth-a")]
    assert secret not in (tmp_path / "home" / "audit" / "log.jsonl").read_text()


def test_a_denied_request_is_audited_and_runs_nothing(env: Env, tmp_path: Path) -> None:
    make_project(env, "hauth-a")
    core_as(env, project="hauth-a").handle(Launch(image="minimal", name="web",
                                                   memory=128 << 20, engine="fake"))
    viewer = who(VIEWER)
    calls = len(env.engine.calls)
    with pytest.raises(Forbidden) as err:
        core_as(env, viewer).handle(Stop("web"))
    assert err.value.exit_code == DENIED
    assert len(env.engine.calls) == calls
    assert core_as(env, project="hauth-a").instances.get("web").state.value == "running"
    last = audit(env, tmp_path)[-1]
    assert (last["op"], last["identity"], last["project"]) == ("instance.stop", viewer.name,
                                                              "hauth-a")
    assert last["result"].startswith("denied:")
    for request in (KeyGen("k9", "image", 30), ProjectSet("hauth-a", "limits.cpu", "64"),
                    TokenCreate("hauth-a", ADMIN)):
        with pytest.raises(Forbidden):
            core_as(env, who(OPERATOR)).handle(request)
    assert Tokens(env.store).list() == [] and Projects(env.store).quotas("hauth-a") == {}


def test_an_operator_of_one_project_sees_nothing_of_another(env: Env) -> None:
    for p in ("hauth-a", "hauth-b"):
        make_project(env, p)
    core_as(env, project="hauth-b").handle(Launch(image="minimal", name="secret",
                                                   memory=128 << 20, engine="fake"))
    mine = core_as(env, who(OPERATOR, "hauth-a"))
    assert mine.project == "hauth-a" and mine.instances.summaries() == []
    with pytest.raises(NotFound):
        mine.handle(Stop("secret"))  # its own project has no such instance
    with pytest.raises(Forbidden):
        core_as(env, who(OPERATOR, "hauth-a"), project="hauth-b").handle(Stop("secret"))
    with pytest.raises(Forbidden):
        core_as(env, who(OPERATOR, "hauth-a"), project="hauth-b").check("instance.list")
    token, _ = core_as(env).handle(TokenCreate("hauth-b", ADMIN))
    with pytest.raises(NotFound):
        core_as(env, who(ADMIN, "hauth-a")).handle(TokenRevoke(token.id))
    assert Tokens(env.store).get(token.id).revoked is None


def test_a_core_in_another_project_keeps_the_identity_and_counts_its_records(
        env: Env, tmp_path: Path) -> None:
    make_project(env, "hauth-a")
    root = core_as(env)
    assert root.in_project("default") is root
    there = root.in_project("hauth-a")
    assert (there.project, there.identity, there.store) == ("hauth-a", root.identity, env.store)
    there.handle(ProjectSet("hauth-a", "limits.cpu", "4"))
    assert root.audited == there.audited == 2  # started, ok
    assert audit(env, tmp_path)[-1]["project"] == "hauth-a"
