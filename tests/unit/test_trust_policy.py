"""Mandatory access control: policy parsing, decide(), and the signed policy store (no root)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popek.errors import InvalidInput, PopekError
from popek.trust.keys import TrustError, TrustStore, canonical
from popek.trust.policy import (
    ACTIONS,
    DEFAULT_POLICY,
    POLICY_KEY,
    Decision,
    Policy,
    PolicyDenied,
    PolicyStore,
    check_signed,
    decide,
    parse,
)

BANKS = """\
version = 3
mode = "enforcing"
labels = ["default", "bank-a", "bank-b", "bank-c", "web", "db", "dev"]

[[conflict]]
name = "banks"
labels = ["bank-a", "bank-b", "bank-c"]

[[share]]
kind = "network"
labels = ["web", "db"]

[[share]]
kind = "network"
labels = ["default"]

[[share]]
kind = "volume"
labels = ["db"]

[[share]]
kind = "channel"
labels = ["dev"]
"""


def policy_text(version: int, mode: str = "enforcing", extra: str = "") -> str:
    return f'version = {version}\nmode = "{mode}"\nlabels = ["default", "a", "b"]\n{extra}'


# -- parse ----------------------------------------------------------------------------


def test_parse_a_full_policy() -> None:
    pol = parse(BANKS)
    assert pol.version == 3 and pol.mode == "enforcing"
    assert "bank-b" in pol.labels and len(pol.labels) == 7
    assert pol.conflicts == (("banks", frozenset({"bank-a", "bank-b", "bank-c"})),)
    assert ("volume", frozenset({"db"})) in pol.shares
    assert pol.text == BANKS
    assert pol.conflicts_with("bank-a") == {"bank-b": "banks", "bank-c": "banks"}
    assert pol.conflicts_with("web") == {}
    assert pol.may_share("network", "web", "db")
    assert not pol.may_share("volume", "web", "db")


def test_default_policy() -> None:
    pol = parse(DEFAULT_POLICY)
    assert (pol.version, pol.mode, pol.labels) == (0, "enforcing", frozenset({"default"}))
    assert decide(pol, "default", "network", "n", sharers=["default"]).verdict == "allow"
    assert decide(pol, "default", "volume", "v", sharers=["default"]).verdict == "allow"
    assert decide(pol, "default", "channel", "/home").verdict == "deny"
    assert decide(pol, "default", "run", "vm", running=["default"]).verdict == "allow"


def test_mode_defaults_to_enforcing_and_conflict_names_default() -> None:
    pol = parse('version = 1\nlabels = ["a", "b"]\n[[conflict]]\nlabels = ["a", "b"]\n')
    assert pol.mode == "enforcing"
    assert pol.conflicts == (("conflict-1", frozenset({"a", "b"})),)


def test_text_does_not_take_part_in_equality() -> None:
    assert parse("version = 1\nlabels = ['a']\n") == parse('labels = ["a"]\n\nversion = 1\n')


@pytest.mark.parametrize(("text", "message"), [
    ("version = ", "not valid TOML"),
    ('version = 1\nlabels = ["a"]\nowner = "me"\n', "unknown key(s) owner; allowed: version"),
    ('version = 1\nlabels = ["a"]\nzz = 1\naa = 2\n', "unknown key(s) aa, zz"),
    ('labels = ["a"]\n', "'version' must be a non-negative integer"),
    ('version = -1\nlabels = ["a"]\n', "'version' must be a non-negative integer"),
    ('version = "2"\nlabels = ["a"]\n', "'version' must be a non-negative integer"),
    ('version = 1.5\nlabels = ["a"]\n', "'version' must be a non-negative integer"),
    ('version = true\nlabels = ["a"]\n', "'version' must be a non-negative integer"),
    ('version = 1\nmode = "lenient"\nlabels = ["a"]\n',
     "mode 'lenient' is not one of enforcing, permissive"),
    ("version = 1\n", "'labels' must be a non-empty list of label strings"),
    ("version = 1\nlabels = []\n", "'labels' must be a non-empty list"),
    ('version = 1\nlabels = "a"\n', "'labels' must be a non-empty list"),
    ("version = 1\nlabels = [1]\n", "'labels' must be a non-empty list"),
    ('version = 1\nlabels = ["Bad Label"]\n', "invalid label 'Bad Label'"),
    ('version = 1\nlabels = ["1abc"]\n', "invalid label '1abc'"),
    ('version = 1\nlabels = ["a", "b"]\n[[conflict]]\nlabels = ["a", "b"]\nwhy = "x"\n',
     "conflict 1 may only have 'name' and 'labels'"),
    ('version = 1\nlabels = ["a", "b"]\n[[conflict]]\nlabels = ["a"]\n',
     "conflict 1 needs at least two labels"),
    ('version = 1\nlabels = ["a", "b"]\n[[conflict]]\nlabels = ["a", "a"]\n',
     "conflict 1 needs at least two labels"),
    ('version = 1\nlabels = ["a", "b"]\n[[conflict]]\nname = "x"\n',
     "conflict 1 'labels' must be a non-empty list"),
    ('version = 1\nlabels = ["a", "b"]\n[[share]]\nkind = "disk"\nlabels = ["a"]\n',
     "share rule 1 kind 'disk' is not one of network, volume, channel"),
    ('version = 1\nlabels = ["a", "b"]\n[[share]]\nlabels = ["a"]\n',
     "share rule 1 kind None is not one of"),
    ('version = 1\nlabels = ["a"]\n[[share]]\nkind = "volume"\nlabels = ["a"]\nrw = true\n',
     "share rule 1 may only have 'kind' and 'labels'"),
    ('version = 1\nlabels = ["a"]\n[[share]]\nkind = "volume"\nlabels = ["a"]\n'
     '[[share]]\nkind = "network"\nlabels = []\n', "share rule 2 'labels' must be a non-empty"),
    ('version = 1\nlabels = ["a", "b"]\n[[conflict]]\nname = "w"\nlabels = ["a", "zz", "c"]\n',
     "w names undeclared label(s) c, zz; declare them in 'labels'"),
    ('version = 1\nlabels = ["a"]\n[[share]]\nkind = "network"\nlabels = ["a", "ghost"]\n',
     "undeclared label(s) ghost"),
])
def test_parse_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse(text)
    assert message in str(err.value)


@pytest.mark.parametrize("text", [
    'version = 1\nlabels = ["a"]\nconflict = 5\n',
    'version = 1\nlabels = ["a"]\nshare = true\n',
])
def test_scalar_conflict_or_share_is_a_clear_error(text: str) -> None:
    with pytest.raises(InvalidInput, match="policy"):
        parse(text)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_parse_never_fails_with_anything_but_invalid_input(text: str) -> None:
    try:
        pol = parse(text)
    except InvalidInput:
        return
    assert isinstance(pol, Policy)


# -- decide ---------------------------------------------------------------------------


def test_conflict_sets_block_running_beside_each_other() -> None:
    pol = parse(BANKS)
    d = decide(pol, "bank-a", "run", "vm1", running=["web", "bank-b"])
    assert (d.allowed, d.enforced, d.verdict) == (False, True, "deny")
    assert d.reason == "label 'bank-a' conflicts with running label 'bank-b' (conflict set 'banks')"
    assert decide(pol, "bank-b", "run", "vm", running=["bank-a"]).verdict == "deny"  # symmetric
    assert decide(pol, "bank-a", "run", "vm", running=["bank-a", "web"]).verdict == "allow"
    assert decide(pol, "bank-a", "run", "vm", running=[]).verdict == "allow"
    assert decide(pol, "web", "run", "vm", running=["bank-a", "bank-b"]).verdict == "allow"
    both = decide(pol, "bank-a", "run", "vm", running=["bank-c", "bank-b"])
    assert "'bank-b'" in both.reason  # the first clash, sorted


def test_network_share_rules() -> None:
    pol = parse(BANKS)
    assert decide(pol, "web", "network", "net1", sharers=["db", "web"]).verdict == "allow"
    assert decide(pol, "web", "network", "net1").verdict == "allow"  # alone on it
    d = decide(pol, "web", "network", "net1", sharers=["db", "default"])
    assert d.verdict == "deny"
    assert d.reason == "label 'web' may not share network net1 with label 'default'"
    d = decide(pol, "bank-a", "network", "net1")
    assert d.verdict == "deny"
    assert d.reason == "label 'bank-a' may not use a network (net1) under this policy"
    # a share of one kind does not grant another
    assert decide(pol, "web", "volume", "vol1").verdict == "deny"
    assert decide(pol, "db", "volume", "vol1", sharers=["db"]).verdict == "allow"
    assert decide(pol, "db", "volume", "vol1", sharers=["web"]).verdict == "deny"


def test_nothing_is_shared_without_a_rule_not_even_within_a_label() -> None:
    pol = parse('version = 1\nlabels = ["a", "b"]\n[[share]]\nkind = "network"\nlabels = ["b"]\n')
    assert decide(pol, "a", "network", "n", sharers=["a"]).verdict == "deny"
    assert decide(pol, "a", "volume", "v").verdict == "deny"
    assert decide(pol, "b", "network", "n", sharers=["b"]).verdict == "allow"


def test_host_channels_need_a_channel_rule() -> None:
    pol = parse(BANKS)
    assert decide(pol, "dev", "channel", "/srv/code").verdict == "allow"
    d = decide(pol, "web", "channel", "/srv/code")
    assert d.verdict == "deny"
    assert d.reason == "label 'web' may not use host channels such as /srv/code"


def test_undeclared_labels_may_do_nothing() -> None:
    pol = parse(BANKS)
    for action in ACTIONS:
        d = decide(pol, "ghost", action, "x")
        assert d.verdict == "deny"
        assert d.reason.startswith("label 'ghost' is not declared by policy version 3")
        assert "bank-a, bank-b" in d.reason
        # the refusal says how to declare it (issue 13.7)
        assert d.reason.endswith("run 'popek policy apply FILE' ('popek policy show' prints "
                                 "the policy in force)")
    # an undeclared label already on a network blocks sharing with it
    assert decide(pol, "web", "network", "n", sharers=["ghost"]).verdict == "deny"


def test_unknown_action() -> None:
    with pytest.raises(InvalidInput, match="unknown policy action 'fly'; allowed: run, network"):
        decide(parse(BANKS), "web", "fly", "x")


def test_permissive_mode_gives_would_deny() -> None:
    pol = parse(BANKS.replace('"enforcing"', '"permissive"'))
    d = decide(pol, "bank-a", "run", "vm", running=["bank-b"])
    assert (d.allowed, d.enforced, d.verdict) == (True, False, "would-deny")
    assert "conflicts with running label 'bank-b'" in d.reason
    ok = decide(pol, "web", "network", "n", sharers=["db"])
    assert (ok.allowed, ok.enforced, ok.verdict, ok.reason) == (True, True, "allow", "allowed")
    assert decide(pol, "ghost", "channel", "x").verdict == "would-deny"


def test_verdicts() -> None:
    assert Decision(True, True, "").verdict == "allow"
    assert Decision(False, True, "r").verdict == "deny"
    assert Decision(True, False, "r").verdict == "would-deny"


LABELS = ["a", "b", "c", "d"]
label_sets = st.lists(st.sampled_from(LABELS), min_size=1, max_size=4, unique=True)


@st.composite
def policies(draw: st.DrawFn) -> str:
    declared = draw(label_sets)
    out = f"version = 1\nlabels = {json.dumps(declared)}\n"
    walls = st.lists(st.sampled_from(declared), min_size=2, max_size=4, unique=True)
    for ls in draw(st.lists(walls, max_size=2)) if len(declared) > 1 else []:
        out += f"[[conflict]]\nlabels = {json.dumps(ls)}\n"
    for kind in draw(st.lists(st.sampled_from(["network", "volume", "channel"]), max_size=4)):
        out += f'[[share]]\nkind = "{kind}"\nlabels = {json.dumps(draw(label_sets_of(declared)))}\n'
    return out


def label_sets_of(declared: list[str]) -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(declared), min_size=1, max_size=4, unique=True)


@settings(max_examples=60, deadline=None)
@given(text=policies(), label=st.sampled_from([*LABELS, "zz"]),
       action=st.sampled_from(ACTIONS), others=st.lists(st.sampled_from([*LABELS, "zz"]),
                                                         max_size=4))
def test_permissive_lets_through_exactly_what_enforcing_denies(
        text: str, label: str, action: str, others: list[str]) -> None:
    enforcing = parse(text)
    permissive = parse(text.replace("version = 1\n", 'version = 1\nmode = "permissive"\n'))
    assert permissive.mode == "permissive"
    e = decide(enforcing, label, action, "obj", running=others, sharers=others)
    p = decide(permissive, label, action, "obj", running=others, sharers=others)
    assert p.allowed
    assert e.reason == p.reason
    assert (e.verdict == "allow") == (p.verdict == "allow")
    assert (e.verdict == "deny") == (p.verdict == "would-deny")
    # sharing is symmetric and running beside a conflicting label is symmetric
    if action in ("network", "volume") and others and e.verdict == "allow":
        for o in others:
            assert decide(enforcing, o, action, "obj", sharers=[label]).verdict == "allow"
    if action == "run" and label in enforcing.labels:
        for o in others:
            if o in enforcing.labels:
                assert (decide(enforcing, o, "run", "x", running=[label]).verdict
                        == decide(enforcing, label, "run", "x", running=[o]).verdict)


# -- the signed policy store -------------------------------------------------------------


def test_default_policy_until_one_is_applied(trust: TrustStore) -> None:
    ps = PolicyStore(trust)
    assert ps.current() == parse(DEFAULT_POLICY)
    assert check_signed(trust) == parse(DEFAULT_POLICY)
    assert ps.info() == {"version": 0, "applied": "", "signer": "",
                         "source": "built-in default"}


def test_apply_signs_and_stores(trust: TrustStore) -> None:
    ps = PolicyStore(trust)
    pol = ps.apply(BANKS)
    assert pol == parse(BANKS)
    assert ps.current() == pol and check_signed(trust) == pol
    doc = json.loads(trust.store.get(POLICY_KEY).value)  # type: ignore[union-attr]
    assert doc["version"] == 3 and doc["text"] == BANKS
    key = trust.by_name("host-policy")
    assert key.role == "policy" and doc["signer"] == key.id
    body = {"version": doc["version"], "text": doc["text"], "applied": doc["applied"]}
    assert trust.verify(doc["signer"], "policy", canonical(body), doc["signature"]) == key
    info = ps.info()
    assert (info["version"], info["signer"], info["source"]) == (3, "host-policy", "applied")


def test_apply_with_a_named_policy_key(trust: TrustStore) -> None:
    trust.keygen("admin-policy", "policy")
    ps = PolicyStore(trust)
    ps.apply(policy_text(1), key="admin-policy")
    assert ps.info()["signer"] == "admin-policy"
    assert [k.name for k in trust.all()] == ["admin-policy"]  # no host key was made


def test_apply_refuses_a_key_of_another_role(trust: TrustStore) -> None:
    trust.keygen("imgkey", "image")
    with pytest.raises(TrustError, match="has role 'image', not 'policy'"):
        PolicyStore(trust).apply(policy_text(1), key="imgkey")
    assert trust.store.get(POLICY_KEY) is None


def test_versions_must_increase(trust: TrustStore) -> None:
    ps = PolicyStore(trust)
    with pytest.raises(InvalidInput, match=r"version 0 must be greater than .* \(0\)"):
        ps.apply(policy_text(0))
    ps.apply(policy_text(5))
    for v in (5, 4, 0):
        with pytest.raises(InvalidInput, match=rf"version {v} must be greater than the "
                                               r"version in force \(5\)"):
            ps.apply(policy_text(v, mode="permissive"))
    assert ps.current().version == 5 and ps.current().mode == "enforcing"
    assert ps.apply(policy_text(6)).version == 6
    assert ps.current().version == 6


def test_bad_policy_changes_nothing(trust: TrustStore) -> None:
    ps = PolicyStore(trust)
    ps.apply(policy_text(1))
    before = trust.store.get(POLICY_KEY)
    with pytest.raises(InvalidInput):
        ps.apply('version = 2\nlabels = ["a"]\nmode = "off"\n')
    assert trust.store.get(POLICY_KEY) == before


def _tamper(trust: TrustStore, **changes: object) -> None:
    kv = trust.store.get(POLICY_KEY)
    assert kv is not None
    trust.store.put(POLICY_KEY, canonical({**json.loads(kv.value), **changes}))


@pytest.mark.parametrize("changes", [
    {"text": policy_text(2, mode="permissive")},
    {"text": policy_text(2) + '[[share]]\nkind = "channel"\nlabels = ["a"]\n'},
    {"version": 99},
    {"applied": "2000-01-01T00:00:00Z"},
    {"signature": "AAAA"},
    {"signature": "not base64!"},
    {"signer": "ab" * 32},
])
def test_tampered_stored_policy_is_refused(trust: TrustStore,
                                           changes: dict[str, object]) -> None:
    ps = PolicyStore(trust)
    ps.apply(policy_text(2))
    _tamper(trust, **changes)
    with pytest.raises(TrustError):
        ps.current()
    with pytest.raises(PolicyDenied, match="failed its check.*every operation it governs is "
                                           "refused") as err:
        check_signed(trust)
    assert isinstance(err.value.__cause__, TrustError)
    assert err.value.exit_code == 4


def test_policy_signed_by_a_revoked_key_is_refused(trust: TrustStore) -> None:
    PolicyStore(trust).apply(policy_text(1))
    trust.revoke("host-policy")
    with pytest.raises(PolicyDenied, match="revoked"):
        check_signed(trust)


def test_a_failing_policy_can_be_replaced_but_never_by_an_older_version(
        trust: TrustStore) -> None:
    ps = PolicyStore(trust)
    ps.apply(policy_text(2))
    _tamper(trust, version=7)  # a forged record's version does not count: the applied one does
    with pytest.raises(PolicyDenied):
        check_signed(trust)
    with pytest.raises(InvalidInput, match=r"in force \(2\)"):
        ps.apply(policy_text(2))
    ps.apply(policy_text(3))
    assert check_signed(trust).version == 3


@pytest.mark.parametrize("value", [b"garbage", b"{}", b'{"version": 1, "text": "x"}'])
def test_malformed_stored_policy_is_denied(trust: TrustStore, value: bytes) -> None:
    PolicyStore(trust).apply(policy_text(1))
    trust.store.put(POLICY_KEY, value)
    with pytest.raises(PolicyDenied):
        check_signed(trust)


def test_a_corrupt_stored_policy_can_be_replaced(trust: TrustStore) -> None:
    trust.store.put(POLICY_KEY, b"garbage")
    ps = PolicyStore(trust)
    ps.apply(policy_text(1))
    assert check_signed(trust).version == 1


def test_errors_are_popek_errors() -> None:
    assert issubclass(PolicyDenied, PopekError)


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(v=st.integers(min_value=1, max_value=10**6))
def test_apply_round_trips_any_version(trust: TrustStore, v: int) -> None:
    ps = PolicyStore(trust)
    kv = trust.store.get(POLICY_KEY)
    in_force = json.loads(kv.value)["version"] if kv else 0
    if v <= in_force:
        with pytest.raises(InvalidInput):
            ps.apply(policy_text(v))
        return
    assert ps.apply(policy_text(v)).version == v
    assert check_signed(trust).version == v


def test_the_built_in_default_policy_is_its_text_parsed() -> None:
    from popek.trust.policy import DEFAULT, DEFAULT_POLICY

    assert parse(DEFAULT_POLICY) == DEFAULT
    assert DEFAULT.text == DEFAULT_POLICY
