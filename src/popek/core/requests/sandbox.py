"""Running an application in a sandbox (bubblewrap), as a request.

The sandbox is not an instance engine behind :class:`popek.engines.Engine`:
it has no record, no lifecycle and no state; it is a foreground process
whose stdio and exit code are the caller's.  So it is a service of its own
(:mod:`popek.engines.sandbox`), reached through one of two requests, both the
operation ``sandbox.run``: :class:`SandboxRun` on the caller's stdio (the
CLI), :class:`SandboxCapture` with its output and exit code as the result
(the API's ``POST /1.0/sandboxes/run``, as an instance's exec without a
terminal).  Host paths (``ro``, ``rw``) are bound for the host admin only: a
project's token may not reach into the host's files.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from popek.core.service import NOT_AUDITED, Request

if TYPE_CHECKING:
    from popek.core.service import Core
    from popek.engines.base import ExecResult
    from popek.engines.sandbox import RunOptions

R = TypeVar("R")
#: the most of each of stdout and stderr a captured run keeps (the rest is read and dropped)
MAX_OUTPUT = 8 << 20


@dataclass(frozen=True)
class _Sandbox(Request[R]):
    """What both sandbox requests share: the command, its profile and the options."""

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

    def options(self, core: Core) -> RunOptions:
        """The run's options, checked (InvalidInput; Forbidden: host paths for a token)."""
        from popek.core.auth import Forbidden
        from popek.engines.sandbox import RunOptions, check_bind_path
        from popek.errors import InvalidInput

        if self.timeout is not None and self.timeout <= 0:
            raise InvalidInput(f"--timeout {self.timeout:g}: allowed: a number of seconds > 0")
        if (self.ro or self.rw) and not core.identity.host_admin:
            raise Forbidden(f"denied: {core.identity.label()} ({core.identity.role}) may not "
                            "bind host paths (ro, rw) into a sandbox: for the host admin only")
        return RunOptions(
            network=self.network,
            ro=tuple(check_bind_path(p, "--ro") for p in self.ro),
            rw=tuple(check_bind_path(p, "--rw") for p in self.rw),
            memory=self.memory, timeout=self.timeout,
            env={k: os.environ[k] for k in ("TERM", "LANG") if k in os.environ})


@dataclass(frozen=True)
class SandboxRun(_Sandbox[int]):
    """Run ``command`` under ``profile`` on the caller's stdio; return its exit code."""

    def run(self, core: Core) -> int:
        """Check the options, then run it."""
        from popek.engines.sandbox import run as run_sandbox

        return run_sandbox(self.profile, self.options(core), list(self.command))


@dataclass(frozen=True)
class SandboxCapture(_Sandbox["ExecResult"]):
    """Run ``command`` under ``profile`` with ``stdin`` as its input; the result is its
    exit code and output (at most :data:`MAX_OUTPUT` bytes of each stream kept)."""

    stdin: bytes = field(default=b"", metadata=NOT_AUDITED, compare=False)

    def run(self, core: Core) -> ExecResult:
        """Check the options, then run it with pipes for its output."""
        from popek.engines.base import ExecResult
        from popek.engines.sandbox import run as run_sandbox

        options = self.options(core)
        with contextlib.ExitStack() as stack:
            fd = os.memfd_create("popek-sandbox-stdin")
            stack.callback(os.close, fd)
            os.write(fd, self.stdin)
            os.lseek(fd, 0, os.SEEK_SET)
            out, err = _Drain("stdout"), _Drain("stderr")
            stack.callback(err.close)
            stack.callback(out.close)
            code = run_sandbox(self.profile, options, list(self.command),
                               stdio=(fd, out.write_end, err.write_end))
            result = ExecResult(code, out.finish(), err.finish())
        return result


class _Drain:
    """A pipe whose read end a thread empties into a buffer of at most MAX_OUTPUT bytes."""

    def __init__(self, name: str) -> None:
        self.read_end, self.write_end = os.pipe()
        self.data = bytearray()
        self.dropped = 0
        self._thread = threading.Thread(target=self._read, name=f"sandbox-{name}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while chunk := os.read(self.read_end, 65536):
            room = MAX_OUTPUT - len(self.data)
            self.data += chunk[:room]
            self.dropped += max(0, len(chunk) - room)

    def _close_write(self) -> None:
        if self.write_end >= 0:
            os.close(self.write_end)
            self.write_end = -1

    def finish(self) -> bytes:
        """Everything read once the application ended (a note if some was dropped)."""
        self._close_write()
        self._thread.join(10)  # what the sandbox's leftovers write after this is dropped
        if self.dropped:
            self.data += (f"\npopek: {self.dropped} more bytes of output dropped (at most "
                          f"{MAX_OUTPUT >> 20} MiB kept)\n").encode()
        return bytes(self.data)

    def close(self) -> None:
        """Close both ends (after :meth:`finish`, or when the run failed)."""
        self._close_write()
        if not self._thread.is_alive():
            os.close(self.read_end)
