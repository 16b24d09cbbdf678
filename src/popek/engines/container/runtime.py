"""Driving an OCI runtime (runc or crun) through its command line.

Only the runtime's stable CLI is used (``run -d``, ``state`` (JSON),
``kill``, ``pause``, ``resume``, ``update``, ``exec``, ``delete``).  popek keeps
each runtime's state under ``POPEK_HOME/oci/<runtime>`` so that it never
mixes with containers of other tools.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import IO, Any

from popek import proc
from popek.engines.container.cgroups import is_v2
from popek.errors import EngineError, InvalidInput
from popek.proc import run

RUNTIMES = ("auto", "runc", "crun")
PACKAGES = {"runc": "runc", "crun": "crun"}


def choose(requested: str) -> str:
    """Resolve ``auto`` (crun on a pure cgroup v2 host, runc otherwise) and check the binary.

    crun 1.8 refuses hybrid cgroup v1/v2 hosts, so ``auto`` never picks it there.
    """
    if requested not in RUNTIMES:
        raise InvalidInput(f"unknown runtime {requested!r}; allowed: {', '.join(RUNTIMES)}")
    if requested == "auto":
        order = ("crun", "runc") if is_v2() else ("runc",)
        for name in order:
            if proc.tool(name):
                return name
        raise EngineError("no OCI runtime found: install the Debian package runc "
                          "(make demo does it)")
    if not proc.tool(requested):
        raise EngineError(f"OCI runtime {requested!r} not found in {proc.TOOL_PATH}; install "
                          f"the Debian package {PACKAGES[requested]}")
    return requested


class OciRuntime:
    """One OCI runtime binary with popek's private state directory."""

    def __init__(self, name: str, state_root: Path) -> None:
        """Bind the runtime ``name`` (``runc``/``crun``) to ``state_root``."""
        self.name = name
        self.root = state_root / name

    def binary(self) -> str:
        """The path of the runtime binary that runs (what the launch measurement hashes)."""
        return proc.tool(self.name) or self.name

    def _argv(self, *args: str) -> list[str]:
        return [self.name, "--root", str(self.root), *args]

    def call(self, *args: str, timeout: float = 30.0) -> str:
        """Run a runtime command; return its stdout or raise :class:`EngineError`."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            proc = run(self._argv(*args), timeout, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EngineError(f"{self.name} {args[0]} failed: {exc}") from exc
        if proc.returncode != 0:
            msg = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no message"
            raise EngineError(f"{self.name} {args[0]} failed: {msg}")
        return str(proc.stdout)

    def run_detached(self, cid: str, bundle: Path, pidfile: Path, log: IO[bytes]) -> None:
        """Create and start container ``cid`` from ``bundle``; its init writes to ``log``."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        err_path = bundle / "runtime.err"
        with open(err_path, "wb") as err:
            proc = run(
                self._argv("run", "--detach", "--pid-file", str(pidfile), "--bundle",
                           str(bundle), cid),
                60.0, stdin=subprocess.DEVNULL, stdout=log, stderr=err,
            )
        if proc.returncode != 0:
            text = err_path.read_text(errors="replace").strip().splitlines()
            raise EngineError(f"{self.name} could not start the container: "
                              f"{text[-1] if text else 'no message'}")

    def knows(self, cid: str) -> bool:
        """Whether the runtime has a record of ``cid`` (runc and crun both keep a
        container's state in ROOT/ID: without it the runtime does not know it)."""
        return (self.root / cid).exists()

    def state(self, cid: str) -> dict[str, Any] | None:
        """Return the runtime's JSON state of ``cid``, or ``None`` if it does not know it."""
        if not self.knows(cid):
            return None  # and a call costs milliseconds
        try:
            out = self.call("state", cid)
        except EngineError:
            return None
        data: dict[str, Any] = json.loads(out)
        return data

    def exec_argv(self, cid: str, argv: list[str], tty: bool, env: list[str]) -> list[str]:
        """Return the argv that runs ``argv`` in ``cid`` (the caller runs it)."""
        extra = ["--tty"] if tty else []
        for e in env:
            extra += ["--env", e]
        return self._argv("exec", *extra, "--", cid, *argv)
