"""The one service boundary of popek: typed requests, handled and audited in core.

Every mutating operation (instances, images, networks, trust, policy,
sandboxes) and every session with a guest is a :class:`Request`: a frozen
dataclass that names its operation (``op``), its target and its parameters,
and knows how to run against a :class:`Core`.  :meth:`Core.handle` is the
only way front ends run one: it appends an audit record of the intent
(``started``), reconciles what the request touches, runs it, and appends one
of its outcome, whether the request was allowed, denied or failed.  So the
CLI, a program that imports popek and the REST server leave the same records
for the same request::

    from popek.core.requests import Launch, Stop
    from popek.core.service import Core

    core = Core()
    core.handle(Launch(image="minimal", name="web", memory=256 << 20))
    core.handle(Stop(name="web"))

The record's ``params`` is the digest of the request's fields, those marked
``audit=False`` left out (progress callbacks, the bytes of a command's
stdin); ``change`` shows the fields a request lists in ``shown`` in words;
``result`` is ``started``, then ``ok``, ``denied: ...`` (the policy or a
trust check refused), or ``error: TYPE: message``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Iterable
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from popek import paths
from popek.errors import PopekError, StoreUnavailable, no_space
from popek.state import open_store
from popek.state.store import StateStore

if TYPE_CHECKING:
    from popek.core.auth import Identity
    from popek.core.instances import Instances
    from popek.core.listings import Listings
    from popek.images import ImageStore
    from popek.network import Networks
    from popek.trust.audit import AuditLog
    from popek.trust.keys import TrustStore

R = TypeVar("R")
Progress = Callable[[str], None]


#: the metadata of a request field left out of the audit record's parameters
NOT_AUDITED = {"audit": False}


def _noop(_: str) -> None:
    pass


#: the longest wait a request may ask for (a week, in seconds)
MAX_TIMEOUT = 7 * 24 * 3600


def check_timeout(value: float, what: str = "timeout") -> float:
    """``value`` when it is a number of seconds from 0 to :data:`MAX_TIMEOUT`; else InvalidInput."""
    from popek.errors import InvalidInput

    if not isinstance(value, int | float) or not 0 <= value <= MAX_TIMEOUT:  # nan fails too
        raise InvalidInput(f"invalid {what} {value!r}: must be a number of seconds from 0 "
                           f"to {MAX_TIMEOUT}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Request(Generic[R]):
    """One operation asked of popek; subclasses set ``op`` and implement :meth:`run`."""

    #: the audited operation, e.g. ``instance.launch``, ``network.create``
    op: ClassVar[str] = ""
    #: the request changes nothing and is a session with a guest (still audited)
    session: ClassVar[bool] = False
    #: the fields shown in words in the audit record's ``change`` (never a secret)
    shown: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        """Check what every request shares: a ``*timeout`` is a finite number of seconds.

        ``nan`` made every wait end at once and ``inf`` overflowed a timer thread
        (a traceback on the user's terminal); both are refused here, at the boundary.
        """
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("timeout") and value is not None:
                check_timeout(value)

    def target(self) -> str:
        """The object of the request (an instance, image, network, key...)."""
        return str(getattr(self, "name", ""))

    def params(self) -> dict[str, Any]:
        """The request's audited fields."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("audit", True):
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def change(self) -> str:
        """What the request changes, in words: its :attr:`shown` fields as ``name=value``."""
        parts = []
        for name in self.shown:
            value = getattr(self, name)
            value = list(value) if isinstance(value, tuple) else value
            parts.append(f"{name}={json.dumps(value, separators=(',', ':'), default=str)}")
        return " ".join(parts)

    def reconciles(self) -> Iterable[str] | None:
        """The instances to reconcile before running: ``[]`` none, ``None`` every one."""
        return []

    def run(self, core: Core) -> R:
        """Carry the request out (called by :meth:`Core.handle` only)."""
        raise NotImplementedError


def result_of(exc: BaseException | None) -> str:
    """The audit record's ``result`` for a request that raised ``exc`` (``None``: ok)."""
    if exc is None:
        return "ok"
    from popek.core.auth import AuthError
    from popek.trust.keys import TrustError
    from popek.trust.policy import PolicyDenied

    if isinstance(exc, AuthError):  # its message begins with "denied:"
        return str(exc)[:500]
    if isinstance(exc, PolicyDenied | TrustError):
        return f"denied: {exc}"[:500]
    if isinstance(exc, KeyboardInterrupt):
        return "error: interrupted"
    return f"error: {type(exc).__name__}: {exc}"[:500]


def warn_unaudited(exc: BaseException, failure: BaseException | str | None) -> None:
    """Warn that an audit record was not written, unless ``failure`` already says why.

    A command that failed because the store is damaged or unavailable cannot
    write its record to that store either: its one error line is enough.
    ``failure`` is what the command failed with (the CLI has only its text).
    """
    if isinstance(failure, StoreUnavailable) and isinstance(exc, StoreUnavailable):
        return
    full = no_space(exc, paths.home())
    if full is not None and "no space left" in str(failure or ""):
        return  # the command's own error already says the disk is full
    exc = full or exc
    if str(exc) and str(exc) in str(failure or ""):
        return
    print(f"popek: warning: the audit log was not written: {exc}", file=sys.stderr)


class Core:
    """popek on one host, as one identity sees it: the stores, and the handler of every request.

    ``identity`` is who asks (:func:`popek.core.auth.host_admin` by default: root
    on the host); ``project`` the project its instance requests act in (the
    identity's own, ``default`` for the host admin when not given).
    """

    def __init__(self, store: StateStore | None = None, instances: Instances | None = None,
                 images: ImageStore | None = None, identity: Identity | None = None,
                 project: str | None = None, listings: Listings | None = None) -> None:
        """Open the state store under ``POPEK_HOME`` (or use the given parts).

        ``listings``: the instance listings a long-running front end keeps
        (:mod:`popek.core.listings`; the API server's), given to :attr:`instances`.
        """
        from popek.core.auth import ALL_PROJECTS, host_admin
        from popek.names import DEFAULT_PROJECT

        self.store: StateStore = store or open_store()
        self.identity: Identity = identity or host_admin()
        own = self.identity.project
        self.project: str = project or (DEFAULT_PROJECT if own == ALL_PROJECTS else own)
        self._instances = instances
        self._images = images
        self._listings = listings
        #: audit records this core appended (front ends check it: see cli.entry)
        self.audited = 0
        #: the core a core of another project was made from (it counts its records too)
        self._origin: Core | None = None

    def in_project(self, project: str) -> Core:
        """This core acting in ``project`` (the same store and identity): itself when it
        already does.  Records it appends count in this core's :attr:`audited` too."""
        if project == self.project:
            return self
        other = Core(self.store, images=self._images, identity=self.identity, project=project,
                     listings=self._listings)
        other._origin = self
        return other

    def _count(self) -> None:
        self.audited += 1
        if self._origin is not None:
            self._origin._count()

    @cached_property
    def instances(self) -> Instances:
        """The instance service (no reconcile until a request asks for it)."""
        if self._instances is not None:
            return self._instances
        from popek.core.instances import Instances

        return Instances(self.store, self._images, project=self.project,
                         listings=self._listings)

    @cached_property
    def images(self) -> ImageStore:
        """The image store of this host."""
        return self.instances.images

    @cached_property
    def trust(self) -> TrustStore:
        """The trust store (keys, signatures) over the state store."""
        return self.instances.guard.trust

    @cached_property
    def networks(self) -> Networks:
        """The network service (built once; it reconciles the host network)."""
        return self.instances.nets.service

    @cached_property
    def audit(self) -> AuditLog:
        """The audit log of this host."""
        return self.instances.guard.audit

    def handle(self, request: Request[R]) -> R:
        """Reconcile what ``request`` touches, run it, audit it; return its result.

        A record with the result ``started`` is written before anything is
        done, so a command killed midway still leaves its record; when it
        cannot be written the request is not run.  Raises what the request
        raised, after the failure was audited.  A request the identity may
        not make (:func:`popek.core.auth.authorize`) is audited as denied and
        raises :class:`popek.core.auth.Forbidden`; nothing runs.
        """
        self.authorize(request)
        self._intend(request)
        error: BaseException | None = None
        try:
            names = request.reconciles()
            if names is None or list(names):
                self.instances.reconcile(None if names is None else list(names))
            return request.run(self)
        except OSError as exc:  # a full POPEK_HOME is one line, not an internal fault
            full = no_space(exc, paths.home())
            error = full or exc
            if full is None:
                raise
            raise full from exc
        except (Exception, KeyboardInterrupt) as exc:  # internal faults too, then raised
            error = exc
            raise
        finally:
            self._record(request, error)

    def project_of(self, request: Request[Any]) -> str | None:
        """The project ``request`` acts in (``None``: a host-wide request)."""
        from popek.core.auth import scope

        asked = getattr(request, "project", None)
        return scope(request.op, asked if isinstance(asked, str) and asked else self.project)

    def authorize(self, request: Request[Any]) -> None:
        """Raise Forbidden (audited as denied) unless this core's identity may make ``request``."""
        from popek.core.auth import Forbidden, authorize

        try:
            authorize(self.identity, request.op, self.project_of(request))
        except Forbidden as exc:
            self._record(request, exc)
            raise

    def check(self, action: str, project: str | None = None) -> None:
        """Raise Forbidden unless this identity may do ``action`` (a read such as
        ``instance.list``) in ``project`` (this core's by default); not audited."""
        from popek.core.auth import authorize

        authorize(self.identity, action, project or self.project)

    def _who(self, request: Request[Any]) -> dict[str, str]:
        return {"identity": self.identity.label(), "project": self.project_of(request) or ""}

    def _intend(self, request: Request[Any]) -> None:
        from popek.trust.audit import STARTED, log_path

        try:
            self.audit.append(request.op, request.target(), request.params(), STARTED,
                              request.change(), **self._who(request))
        except OSError as exc:
            raise no_space(exc, paths.home()) or StoreUnavailable(
                f"cannot write the audit log {log_path()}: {exc}; nothing was done") from exc
        self._count()

    def _record(self, request: Request[Any], error: BaseException | None) -> None:
        try:
            self.audit.append(request.op, request.target(), request.params(), result_of(error),
                              request.change(), **self._who(request))
            self._count()
        except (OSError, PopekError) as exc:
            warn_unaudited(exc, error)
