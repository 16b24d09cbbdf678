"""Running an application in a sandbox (bubblewrap), as a request.

The sandbox is not an instance engine behind :class:`popek.engines.Engine`:
it has no record, no lifecycle and no state; it is a foreground process
whose stdio and exit code are the caller's.  So it is a service of its own
(:mod:`popek.engines.sandbox`), reached through this one request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from popek.core.service import Request

if TYPE_CHECKING:
    from popek.core.service import Core


@dataclass(frozen=True)
class SandboxRun(Request[int]):
    """Run ``command`` under ``profile`` on the caller's stdio; return its exit code."""

    op = "sandbox.run"
    shown = ("profile", "network", "ro", "rw", "memory", "timeout")
    command: tuple[str, ...]
    profile: str = "default"
    network: bool = False
    ro: tuple[str, ...] = ()
    rw: tuple[str, ...] = ()
    memory: int | None = None
    timeout: float | None = None

    def target(self) -> str:
        """The command line."""
        return " ".join(self.command)

    def run(self, core: Core) -> int:
        """Check the options, then run it."""
        import os

        from popek.engines.sandbox import RunOptions, check_bind_path
        from popek.engines.sandbox import run as run_sandbox
        from popek.errors import InvalidInput

        if self.timeout is not None and self.timeout <= 0:
            raise InvalidInput(f"--timeout {self.timeout:g}: allowed: a number of seconds > 0")
        options = RunOptions(
            network=self.network,
            ro=tuple(check_bind_path(p, "--ro") for p in self.ro),
            rw=tuple(check_bind_path(p, "--rw") for p in self.rw),
            memory=self.memory, timeout=self.timeout,
            env={k: os.environ[k] for k in ("TERM", "LANG") if k in os.environ})
        return run_sandbox(self.profile, options, list(self.command))
