"""Mandatory access control between instances: labels, conflict sets, type enforcement.

Every instance carries one *label*.  The policy, a TOML document, says:

* ``labels``: the labels that exist; an instance with any other label may not run;
* ``[[conflict]]`` sets (Chinese Wall): labels of one set never run on the
  same host at once (an instance of ``bank-a`` blocks every ``bank-b``);
* ``[[share]]`` rules (type enforcement): which labels may share a
  ``network`` or a ``volume``, and which may use a host ``channel``
  (shared folders: host directories mounted into a container).  Nothing is
  shared unless a rule allows it, not even between instances of one label.

``mode`` is ``enforcing`` or ``permissive`` (decisions that would deny are
recorded and allowed).  A policy has a ``version`` that must increase at each
apply; it is signed with a ``policy`` key and stored in one write, so a
reader sees the old policy or the new one, never a mix.  It is verified each
time it is loaded: a policy whose signature fails is not used, and every
decision is then a denial.

:func:`decide` is the one place that decides; callers give it the subject
(the instance label), the action and the object, plus the facts it needs
(labels running on the host, labels already on the network).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from popek.errors import DENIED, InvalidInput, PopekError
from popek.names import check_label
from popek.state.schema import POLICY_FLOOR_KEY, POLICY_KEY
from popek.state.store import Put
from popek.trust.keys import TrustError, TrustStore, canonical, iso, now

FLOOR_KEY = POLICY_FLOOR_KEY  # highest version applied; never decreases
MODES = ("enforcing", "permissive")
SHARE_KINDS = ("network", "volume", "channel")
ACTIONS = ("run", "network", "volume", "channel")
DEFAULT_LABEL = "default"
# The policy in force until an administrator applies one: the label
# "default" exists and its instances may share networks and volumes; no host
# channels; no conflicts.
DEFAULT_POLICY = """\
version = 0
mode = "enforcing"
labels = ["default"]

[[share]]
kind = "network"
labels = ["default"]

[[share]]
kind = "volume"
labels = ["default"]
"""


class PolicyDenied(PopekError):
    """The access control policy refuses the operation; the message says which rule."""

    exit_code = DENIED


@dataclass(frozen=True)
class Policy:
    """A parsed, validated policy."""

    version: int
    mode: str
    labels: frozenset[str]
    conflicts: tuple[tuple[str, frozenset[str]], ...] = ()
    shares: tuple[tuple[str, frozenset[str]], ...] = ()
    text: str = field(default="", compare=False)

    def may_share(self, kind: str, a: str, b: str) -> bool:
        """Whether one rule of ``kind`` covers both labels."""
        return any(k == kind and a in ls and b in ls for k, ls in self.shares)

    def conflicts_with(self, label: str) -> dict[str, str]:
        """Every label that may not run beside ``label``, mapped to the set that says so."""
        out: dict[str, str] = {}
        for name, ls in self.conflicts:
            if label in ls:
                out.update({other: name for other in ls if other != label})
        return out


#: :data:`DEFAULT_POLICY` parsed (a unit test holds them equal): most hosts run
#: under it, and building it directly spares each command the TOML parser
DEFAULT = Policy(0, "enforcing", frozenset({DEFAULT_LABEL}), (),
                 (("network", frozenset({DEFAULT_LABEL})), ("volume", frozenset({DEFAULT_LABEL}))),
                 DEFAULT_POLICY)


def _labels(value: object, where: str) -> frozenset[str]:
    if not isinstance(value, list) or not value or not all(isinstance(x, str) for x in value):
        raise InvalidInput(f"policy: {where} must be a non-empty list of label strings")
    for x in value:
        check_label(x)
    return frozenset(value)


def parse(text: str) -> Policy:
    """Parse and validate a policy document; :class:`InvalidInput` says what is wrong."""
    import tomllib  # only applying or checking a policy parses TOML

    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"policy is not valid TOML: {exc}") from exc
    unknown = set(doc) - {"version", "mode", "labels", "conflict", "share"}
    if unknown:
        raise InvalidInput(f"policy: unknown key(s) {', '.join(sorted(unknown))}; allowed: "
                           "version, mode, labels, conflict, share")
    version = doc.get("version")
    if type(version) is not int or version < 0:
        raise InvalidInput("policy: 'version' must be a non-negative integer")
    mode = doc.get("mode", "enforcing")
    if mode not in MODES:
        raise InvalidInput(f"policy: mode {mode!r} is not one of {', '.join(MODES)}")
    labels = _labels(doc.get("labels"), "'labels'")
    for table in ("conflict", "share"):
        if not isinstance(doc.get(table, []), list):
            raise InvalidInput(f"policy: '{table}' must be an array of tables ([[{table}]])")
    conflicts = []
    for i, c in enumerate(doc.get("conflict", []), 1):
        if not isinstance(c, dict) or set(c) - {"name", "labels"}:
            raise InvalidInput(f"policy: conflict {i} may only have 'name' and 'labels'")
        ls = _labels(c.get("labels"), f"conflict {i} 'labels'")
        if len(ls) < 2:
            raise InvalidInput(f"policy: conflict {i} needs at least two labels")
        conflicts.append((str(c.get("name", f"conflict-{i}")), ls))
    shares = []
    for i, r in enumerate(doc.get("share", []), 1):
        if not isinstance(r, dict) or set(r) - {"kind", "labels"}:
            raise InvalidInput(f"policy: share rule {i} may only have 'kind' and 'labels'")
        if r.get("kind") not in SHARE_KINDS:
            raise InvalidInput(f"policy: share rule {i} kind {r.get('kind')!r} is not one of "
                               f"{', '.join(SHARE_KINDS)}")
        shares.append((str(r["kind"]), _labels(r.get("labels"), f"share rule {i} 'labels'")))
    for where, ls in [*conflicts, *shares]:
        undeclared = ls - labels
        if undeclared:
            raise InvalidInput(f"policy: {where} names undeclared label(s) "
                               f"{', '.join(sorted(undeclared))}; declare them in 'labels'")
    return Policy(version, mode, labels, tuple(conflicts), tuple(shares), text)


class PolicyStore:
    """The signed policy in force, kept in the state store."""

    def __init__(self, trust: TrustStore) -> None:
        self.trust = trust

    def apply(self, text: str, key: str | None = None) -> Policy:
        """Check, sign and install ``text`` in one write; return the new policy.

        Raises :class:`InvalidInput` for a bad document or a version that
        does not increase.
        """
        pol = parse(text)
        # the highest version ever applied, even when the stored policy is broken: never go back
        in_force = self._floor() or 0
        if pol.version <= in_force:
            raise InvalidInput(f"policy version {pol.version} must be greater than the version "
                               f"in force ({in_force})")
        body = {"version": pol.version, "text": text, "applied": iso(now())}
        kid, sig = self.trust.sign(key or self.trust.host_key("policy"), "policy",
                                   canonical(body))
        self.trust.store.txn([], [
            Put(POLICY_KEY, canonical({**body, "signer": kid, "signature": sig})),
            Put(FLOOR_KEY, str(pol.version).encode())])
        return pol

    def _floor(self) -> int | None:
        """The highest version applied (``None`` before the first apply)."""
        kv = self.trust.store.get(FLOOR_KEY)
        try:
            return int(kv.value) if kv else None
        except ValueError:
            return None

    def current(self) -> Policy:
        """The policy in force, its signature checked; the default when none was applied.

        Raises :class:`TrustError` when the stored policy's signature fails.
        """
        kv = self.trust.store.get(POLICY_KEY)
        if kv is None:
            return DEFAULT
        try:
            doc = json.loads(kv.value)
            body = {"version": doc["version"], "text": doc["text"], "applied": doc["applied"]}
            signer, sig = str(doc["signer"]), str(doc["signature"])
        except (ValueError, KeyError, TypeError) as exc:
            raise TrustError(f"the stored policy record is malformed ({exc})") from None
        self.trust.verify(signer, "policy", canonical(body), sig)
        floor = self._floor()
        if floor is not None and body["version"] != floor:
            raise TrustError(f"the stored policy has version {body['version']} but version "
                             f"{floor} was applied last: an older policy was put back")
        try:
            return parse(str(doc["text"]))
        except InvalidInput as exc:
            raise TrustError(f"the stored policy does not parse: {exc}") from None

    def info(self) -> dict[str, object]:
        """What ``popek policy show`` prints besides the text."""
        kv = self.trust.store.get(POLICY_KEY)
        if kv is None:
            return {"version": 0, "applied": "", "signer": "", "source": "built-in default"}
        try:
            doc = json.loads(kv.value)
            doc["signer"] = str(doc["signer"])
        except (ValueError, KeyError, TypeError):
            return {"version": "?", "applied": "", "signer": "", "source": "malformed record"}
        key = self.trust.by_id(doc["signer"])
        return {"version": doc["version"], "applied": doc["applied"],
                "signer": key.name if key else doc["signer"][:16], "source": "applied"}


@dataclass(frozen=True)
class Decision:
    """The outcome of one check."""

    allowed: bool
    enforced: bool  # False in permissive mode: a denial that was let through
    reason: str

    @property
    def verdict(self) -> str:
        """allow, deny, or would-deny (permissive)."""
        if self.allowed and self.enforced:
            return "allow"
        return "deny" if not self.allowed else "would-deny"


def decide(policy: Policy, label: str, action: str, obj: str,
           running: Iterable[str] = (), sharers: Iterable[str] = ()) -> Decision:
    """Decide whether an instance labelled ``label`` may do ``action`` on ``obj``.

    ``run`` (launch, start): ``running`` are the labels of the instances
    running on the host.  ``network``/``volume``: ``sharers`` are the labels
    of the instances already using ``obj``.  ``channel``: a host channel
    named by ``obj``.
    """
    if action not in ACTIONS:
        raise InvalidInput(f"unknown policy action {action!r}; allowed: {', '.join(ACTIONS)}")
    reason = ""
    if label not in policy.labels:
        reason = (f"label {label!r} is not declared by policy version {policy.version} "
                  f"(declared: {', '.join(sorted(policy.labels))}); to use it, add it to "
                  "'labels' in a policy file and run 'popek policy apply FILE' "
                  "('popek policy show' prints the policy in force)")
    elif action == "run":
        walls = policy.conflicts_with(label)
        # ``running`` is read only when the label has a conflict set: it may be lazy
        clash = sorted({other for other in running if other in walls}) if walls else []
        if clash:
            reason = (f"label {label!r} conflicts with running label {clash[0]!r} "
                      f"(conflict set {walls[clash[0]]!r})")
    elif action == "channel":
        if not any(k == "channel" and label in ls for k, ls in policy.shares):
            reason = f"label {label!r} may not use host channels such as {obj}"
    else:
        if not any(k == action and label in ls for k, ls in policy.shares):
            reason = f"label {label!r} may not use a {action} ({obj}) under this policy"
        else:
            bad = sorted({o for o in sharers if not policy.may_share(action, label, o)})
            if bad:
                reason = (f"label {label!r} may not share {action} {obj} with label "
                          f"{bad[0]!r}")
    if not reason:
        return Decision(True, True, "allowed")
    if policy.mode == "permissive":
        return Decision(True, False, reason)
    return Decision(False, True, reason)


def check_signed(trust: TrustStore) -> Policy:
    """The policy in force; a stored policy that fails its check is an error, never skipped."""
    try:
        return PolicyStore(trust).current()
    except TrustError as exc:
        raise PolicyDenied(f"the stored access control policy failed its check ({exc}); "
                           "every operation it governs is refused until a valid policy "
                           "is applied") from exc
