"""Requests on profiles: create, edit (replace) and delete (see :mod:`popek.core.profiles`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from popek.core.service import Request

if TYPE_CHECKING:
    from popek.core.profiles import Profile
    from popek.core.service import Core


@dataclass(frozen=True)
class _ProfileDoc(Request["Profile"]):
    """A request carrying a whole profile: its description, config keys and networks."""

    shown = ("description", "config", "networks")
    name: str
    description: str = ""
    config: dict[str, str] = field(default_factory=dict)
    networks: tuple[str, ...] = ()

    def profile(self) -> Profile:
        """The profile the request describes (checked when stored)."""
        from popek.core.profiles import Profile

        return Profile(self.name, self.description, dict(self.config), list(self.networks))


@dataclass(frozen=True)
class ProfileCreate(_ProfileDoc):
    """Create profile ``name`` with config keys and networks (an empty one by default)."""

    op = "profile.create"

    def run(self, core: Core) -> Profile:
        """Create it; :class:`popek.errors.AlreadyExists` when the name is taken."""
        from popek.core.profiles import Profiles

        return Profiles(core.store, core.project).create(self.profile())


@dataclass(frozen=True)
class ProfileEdit(_ProfileDoc):
    """Replace profile ``name`` with the document ``profile edit`` read (all its fields).

    Instances launched with it keep their values; those launched later get the new ones.
    """

    op = "profile.edit"

    def run(self, core: Core) -> Profile:
        """Replace it; :class:`popek.errors.NotFound` when there is none."""
        from popek.core.profiles import Profiles

        return Profiles(core.store, core.project).replace(self.profile())


@dataclass(frozen=True)
class ProfileDelete(Request[None]):
    """Delete profile ``name``; refused while an instance was launched with it."""

    op = "profile.delete"
    name: str

    def run(self, core: Core) -> None:
        """Delete it, under the lock launches hold while they write their record."""
        from popek.core.access import decision_lock
        from popek.core.profiles import Profiles, users

        with decision_lock():
            used = users(core.instances.all(), self.name)
            Profiles(core.store, core.project).delete(self.name, used)
