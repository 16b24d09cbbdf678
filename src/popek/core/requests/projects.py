"""Requests on projects and API tokens (see :mod:`popek.core.projects`, :mod:`popek.core.auth`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from popek.core.service import Request

if TYPE_CHECKING:
    from popek.core.auth import Token
    from popek.core.service import Core


@dataclass(frozen=True)
class ProjectCreate(Request[None]):
    """Make project ``name`` (no quotas, the built-in defaults)."""

    op = "project.create"
    name: str

    def run(self, core: Core) -> None:
        """Create it; AlreadyExists when it is there."""
        from popek.core.projects import Projects

        Projects(core.store).create(self.name)


@dataclass(frozen=True)
class ProjectDelete(Request[None]):
    """Delete project ``name``; refused while it holds instances, profiles, networks,
    images or volumes.  Its volume key goes with it."""

    op = "project.delete"
    name: str

    def run(self, core: Core) -> None:
        """Delete it, under the lock launches hold while they write their record."""
        from popek.core.access import decision_lock
        from popek.core.projects import Projects
        from popek.network.model import Network
        from popek.state.schema import NETWORKS_PREFIX

        with decision_lock():
            held = [i.name for i in core.instances.all(self.name)]
            nets = [n.short for n in (Network.from_json(kv.value)
                                      for kv in core.store.range(NETWORKS_PREFIX))
                    if n.project == self.name]
            images = core.images.in_project(self.name).names() if self.name != "default" \
                else []
            from popek.storage.service import Storage
            from popek.trust.secrets import Secrets

            vols = [f"{v.pool}/{v.name}" for v in Storage(core.store).volumes(None, self.name)]
            Projects(core.store).delete(self.name, held, nets, images, vols)
        Secrets().remove(self.name)  # no volume is left that it opens


@dataclass(frozen=True)
class TokenCreate(Request[tuple["Token", str]]):
    """Make an API token of ``project`` with ``role``; the result holds its secret (once)."""

    op = "token.create"
    shown = ("project", "role", "console", "days")
    project: str
    role: str
    console: bool = False
    token_name: str | None = None
    days: float | None = None

    def target(self) -> str:
        """The token's name (its id is made by the request)."""
        return self.token_name or ""

    def run(self, core: Core) -> tuple[Token, str]:
        """Create it, in a project that exists."""
        from popek.core.auth import Tokens, expiry
        from popek.core.projects import Projects

        when = expiry(self.days)
        Projects(core.store).require(self.project)
        return Tokens(core.store).create(self.project, self.role, self.console,
                                         self.token_name, when)


@dataclass(frozen=True)
class TokenRevoke(Request["Token"]):
    """Revoke API token ``id`` (its record stays, listed as revoked)."""

    op = "token.revoke"
    id: str

    def target(self) -> str:
        """The token's id."""
        return self.id

    def run(self, core: Core) -> Token:
        """Revoke it (a token of another project is not found for a project admin)."""
        from popek.core.auth import Tokens

        mine = None if core.identity.host_admin else core.identity.project
        return Tokens(core.store).revoke(self.id, mine)
