"""Who asks, and what they may do: identities, roles, API tokens and :func:`authorize`.

Every request popek handles is asked by an :class:`Identity`: the host admin
(root on the host, through the CLI or the local socket: :func:`host_admin`)
or the holder of an API token (:class:`Tokens`) or of a trusted TLS client
certificate (:mod:`popek.core.certificates`), which belongs to one project and
carries one role.  :meth:`popek.core.service.Core.handle` calls
:func:`authorize` before it runs a request and audits a refusal as ``denied``.

The roles (a token's ``console`` grant is separate from its role):

==============================  =======  ========  =====  ==========
action                          viewer   operator  admin  host admin
==============================  =======  ========  =====  ==========
read its project (list, info)   yes      yes       yes    yes
instance.*, config.*, volume.*  no       yes       yes    yes
network.attach / detach         no       yes       yes    yes
sandbox.run                     no       yes       yes    yes
session.console / session.exec  no       grant     grant  yes
session.attest (a read)         yes      yes       yes    yes
profile.*                       no       no        yes    yes
token.*, certificate.* (its     no       no        yes    yes
own project)
network.create / delete,        no       no        yes    yes
image.build / import / delete
(its own project's, not
``default``'s)
project.set (quotas), project.  no       no        no     yes
create / delete, storage.create
/ delete (pools)
image.sign, trust.*, policy.*,  no       no        no     yes
audit.*, host.*
anything in another project     no       no        no     yes
==============================  =======  ========  =====  ==========

Images and networks belong to a project (incus's ``features.images`` and
``features.networks``, always on): a project sees its own and the ``default``
project's, which are shared read-only (only the host admin, acting in
``default``, changes them, not an admin of ``default``: they are every
project's); a project admin builds, imports and deletes images and creates and
deletes networks of its own project only.  Signing stays with the host admin
(the host's keys vouch for an image), as do trust keys and the policy, which
are host-wide.

Tokens: the secret is ``pk1.ID.RANDOM`` (256 random bits), shown once by
:meth:`Tokens.create`; the store keeps only its SHA-256 under
``/popek/tokens/ID``.  :meth:`Tokens.verify` finds the record by the id in the
secret and compares the hashes in constant time (:func:`hmac.compare_digest`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

from popek.errors import DENIED, InvalidInput, NotFound, PopekError
from popek.names import DEFAULT_PROJECT, validate_name
from popek.state.schema import TOKENS_PREFIX, token_key
from popek.state.store import Compare, Put, StateStore

ADMIN, OPERATOR, VIEWER = "admin", "operator", "viewer"
ROLES = (ADMIN, OPERATOR, VIEWER)
#: the project of the host admin: every project
ALL_PROJECTS = "*"
#: the name the host admin acts under in audit records
HOST_ADMIN = "root@host"
#: the verbs of an action that only reads (``instance.list``, ``project.show``...)
READ_VERBS = frozenset({"list", "show", "info", "get", "log", "read", "attest", "events",
                        "metrics", "config"})
#: what an operator may change in its own project (besides reading)
OPERATOR_PREFIXES = ("instance.", "config.", "sandbox.", "volume.")
OPERATOR_ACTIONS = frozenset({"network.attach", "network.detach"})
#: what needs the console grant (and a role that may operate instances)
SESSION_ACTIONS = frozenset({"session.console", "session.exec"})
#: what a project admin may change besides what an operator may
ADMIN_PREFIXES = ("profile.", "token.", "certificate.", "image.")
ADMIN_ACTIONS = frozenset({"network.create", "network.delete"})
#: the changes of what ``default`` shares with every project: the host admin's, even there
SHARED_PREFIXES = ("image.", "network.create", "network.delete")
#: the actions on what every project shares (host-wide: their project is ``None``)
HOST_WIDE_PREFIXES = ("trust.", "policy.", "host.", "audit.")
HOST_WIDE_ACTIONS = frozenset({"image.sign", "project.create", "project.delete",
                               "storage.create", "storage.delete"})
#: the longest a token may live, in days
MAX_DAYS = 3650
SECRET_PREFIX = "pk1"


class AuthError(PopekError):
    """Authentication or authorization refused the request (exit code :data:`DENIED`)."""

    exit_code = DENIED


class TokenRejected(AuthError):
    """A token secret is unknown, revoked or expired (the API answers 401)."""


class Forbidden(AuthError):
    """The identity may not do that action in that project (the API answers 403)."""


@dataclass(frozen=True)
class Identity:
    """Who asks: a token's holder or the host admin (project :data:`ALL_PROJECTS`)."""

    name: str
    project: str
    role: str
    console: bool = False

    @property
    def host_admin(self) -> bool:
        """Whether this is the host admin, allowed everything in every project."""
        return self.project == ALL_PROJECTS and self.role == ADMIN

    def label(self) -> str:
        """How audit records name it: ``root@host`` or ``token NAME (ID)``."""
        return self.name


def host_admin() -> Identity:
    """The identity of root on the host (the local CLI, the local socket)."""
    return Identity(HOST_ADMIN, ALL_PROJECTS, ADMIN, True)


def is_read(action: str) -> bool:
    """Whether ``action`` (``domain.verb``) only reads."""
    return action.rpartition(".")[2] in READ_VERBS


def scope(action: str, project: str | None) -> str | None:
    """The project ``action`` acts in: ``project``, or ``None`` when the action is host-wide."""
    if action.startswith(HOST_WIDE_PREFIXES) or action in HOST_WIDE_ACTIONS:
        return None
    return project


def _allowed(identity: Identity, action: str, project: str | None) -> str:
    """Why ``identity`` may not do ``action`` in ``project``; empty when it may."""
    if identity.host_admin:
        return ""
    if identity.role not in ROLES:
        return f"unknown role {identity.role!r}"
    if project is not None and project != identity.project:
        return f"it belongs to project {identity.project!r}, not {project!r}"
    if action in SESSION_ACTIONS:
        if identity.role == VIEWER:
            return "a viewer may only read"
        return "" if identity.console else "it has no console/exec grant"
    if is_read(action):
        return ""
    if identity.role == VIEWER:
        return "a viewer may only read"
    if project is None:
        return "it is a host-wide change, for the host admin only"
    if action.startswith(OPERATOR_PREFIXES) or action in OPERATOR_ACTIONS:
        return ""
    if project == DEFAULT_PROJECT and action.startswith(SHARED_PREFIXES):
        return ("the default project's images and networks are shared with every project: "
                "for the host admin only")
    if identity.role == ADMIN and (action.startswith(ADMIN_PREFIXES)
                                   or action in ADMIN_ACTIONS):
        return ""
    if action.startswith(ADMIN_PREFIXES) or action in ADMIN_ACTIONS:
        return f"an operator may not do {action} (for a project admin)"
    who = "an operator" if identity.role == OPERATOR else "a project admin"
    return f"{who} may not do {action} (for the host admin only)"


def allowed(identity: Identity, action: str, project: str | None) -> bool:
    """Whether :func:`authorize` lets ``identity`` do ``action`` in ``project``."""
    return not _allowed(identity, action, project)


def authorize(identity: Identity, action: str, project: str | None) -> None:
    """Raise :class:`Forbidden` unless ``identity`` may do ``action`` in ``project``.

    ``action`` is a request's ``op`` (``instance.launch``) or a read
    (``instance.list``); ``project`` is the project acted in, ``None`` for a
    host-wide action.  The table is in this module's docstring.
    """
    why = _allowed(identity, action, project)
    if why:
        where = f" in project {project!r}" if project is not None else ""
        raise Forbidden(f"denied: {identity.label()} ({identity.role}) may not do "
                        f"{action}{where}: {why}")


def check_role(role: str) -> str:
    """``role`` when it is one of :data:`ROLES`; else InvalidInput."""
    if role not in ROLES:
        raise InvalidInput(f"invalid role {role!r}; allowed: {', '.join(ROLES)}")
    return role


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Token:
    """A token's record, as stored and listed (``hash``: SHA-256 of its secret)."""

    id: str
    name: str
    project: str
    role: str
    console: bool
    created: str
    expires: str | None
    revoked: str | None
    hash: str

    def to_json(self) -> bytes:
        """The stored form."""
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Token:
        """Read a stored record."""
        return cls(**json.loads(data))

    def public(self) -> dict[str, object]:
        """What ``token list`` shows: every field but the hash."""
        out: dict[str, object] = asdict(self)
        del out["hash"]
        return out

    def identity(self) -> Identity:
        """The identity a request made with this token acts under."""
        return Identity(f"token {self.name} ({self.id})", self.project, self.role, self.console)


#: a record verify compares against when the secret names no token (same work either way)
_NO_HASH = _hash("no such token")


class Tokens:
    """The API tokens of this host, in the state store."""

    def __init__(self, store: StateStore) -> None:
        """Over ``store``."""
        self.store = store

    def create(self, project: str, role: str, console: bool = False, name: str | None = None,
               expires: datetime | None = None) -> tuple[Token, str]:
        """Make a token; return its record and its secret (shown once, never stored)."""
        validate_name(project, "project name")
        check_role(role)
        token_id = secrets.token_hex(6)
        if name is not None:
            validate_name(name, "token name")
        if expires is not None and expires <= _now():
            raise InvalidInput("a token's expiry must be in the future")
        secret = f"{SECRET_PREFIX}.{token_id}.{secrets.token_urlsafe(32)}"
        token = Token(id=token_id, name=name or f"token-{token_id}", project=project,
                      role=role, console=bool(console), created=_iso(_now()),
                      expires=_iso(expires) if expires else None, revoked=None,
                      hash=_hash(secret))
        key = token_key(token_id)
        res = self.store.txn([Compare(key, "version", "==", 0)], [Put(key, token.to_json())])
        if not res.succeeded:  # 48 random bits collided: vanishingly rare; one more try
            return self.create(project, role, console, name, expires)
        return token, secret

    def get(self, token_id: str, project: str | None = None) -> Token:
        """The token ``token_id`` (of ``project``, if given); NotFound names the known ones
        (of ``project``: nothing of another project shows)."""
        kv = self.store.get(token_key(token_id)) if token_id.isalnum() else None
        token = Token.from_json(kv.value) if kv is not None else None
        if token is None or (project is not None and token.project != project):
            known = ", ".join(t.id for t in self.list(project)) or "none"
            raise NotFound(f"token {token_id!r} not found; existing tokens: {known}")
        return token

    def list(self, project: str | None = None) -> list[Token]:
        """Every token (of ``project``), revoked ones too, by creation time."""
        tokens = [Token.from_json(kv.value) for kv in self.store.range(TOKENS_PREFIX)]
        return sorted((t for t in tokens if project is None or t.project == project),
                      key=lambda t: (t.created, t.id))

    def revoke(self, token_id: str, project: str | None = None) -> Token:
        """Revoke token ``token_id`` (of ``project``, if given; its record stays, listed
        as revoked); return it."""
        token = self.get(token_id, project)
        if token.revoked:
            return token
        done = Token(**{**asdict(token), "revoked": _iso(_now())})
        self.store.put(token_key(token_id), done.to_json())
        return done

    def verify(self, secret: str) -> Identity:
        """The identity of ``secret``; :class:`TokenRejected` when unknown, revoked or expired."""
        parts = secret.split(".") if isinstance(secret, str) else []
        kv = None
        if len(parts) == 3 and parts[0] == SECRET_PREFIX and parts[1].isalnum():
            kv = self.store.get(token_key(parts[1]))
        token = Token.from_json(kv.value) if kv is not None else None
        given = _hash(secret if isinstance(secret, str) else "")
        match = hmac.compare_digest(given, token.hash if token else _NO_HASH)
        if token is None or not match:
            raise TokenRejected("denied: the token is not known (check it, or make one with "
                                "popek token create)")
        if token.revoked:
            raise TokenRejected(f"denied: token {token.name} ({token.id}) was revoked on "
                                f"{token.revoked}")
        if token.expires and datetime.fromisoformat(token.expires) <= _now():
            raise TokenRejected(f"denied: token {token.name} ({token.id}) expired on "
                                f"{token.expires}")
        return token.identity()


def expiry(days: float | None) -> datetime | None:
    """The expiry ``days`` from now (``None``: never); InvalidInput outside 1 second..10 years."""
    if days is None:
        return None
    if not isinstance(days, int | float) or not 0 < days <= MAX_DAYS:
        raise InvalidInput(f"invalid expiry {days!r} days: must be more than 0 and at most "
                           f"{MAX_DAYS}")
    return _now() + timedelta(days=days)


__all__ = ["ADMIN", "ALL_PROJECTS", "DEFAULT_PROJECT", "HOST_ADMIN", "OPERATOR", "ROLES",
           "VIEWER", "AuthError", "Forbidden", "Identity", "Token", "TokenRejected", "Tokens",
           "allowed", "authorize", "check_role", "expiry", "host_admin", "is_read", "scope"]
