"""Requests on the host as a whole: take this home off it (reset), bring it back (boot)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from popek.core.service import NOT_AUDITED, Progress, Request, _noop

if TYPE_CHECKING:
    from popek.core.hostcare import Report
    from popek.core.service import Core


@dataclass(frozen=True)
class HostReset(Request["Report"]):
    """Remove what this home made on the host (see :func:`popek.core.hostcare.reset`).

    ``purge``: delete the instances and networks too; the caller then removes
    the home with :func:`popek.core.hostcare.remove_home` (after this
    request's audit record, which lives in it, is written).
    """

    op = "host.reset"
    shown = ("purge",)
    purge: bool = False

    def target(self) -> str:
        """This home."""
        from popek import paths

        return str(paths.home())

    def run(self, core: Core) -> Report:
        """Reset."""
        from popek.core.hostcare import reset

        return reset(core, self.purge)


@dataclass(frozen=True)
class HostBoot(Request["Report"]):
    """Settle records, bring networks back, start ``boot.autostart`` instances."""

    op = "host.boot"
    progress: Progress = field(default=_noop, metadata=NOT_AUDITED, compare=False)

    def target(self) -> str:
        """This home."""
        from popek import paths

        return str(paths.home())

    def run(self, core: Core) -> Report:
        """Boot."""
        from popek.core.hostcare import boot

        return boot(core, self.progress)
