"""``/1.0/sandboxes``: ``popek sandbox profiles --format json`` and ``popek sandbox run``.

A sandbox run is one command with no terminal, as an instance's exec: the
answer carries its exit code, stdout and stderr (:class:`popek.core.requests.
SandboxCapture`), audited as ``sandbox.run``.  Over the API the run has a
timeout (60 seconds unless asked; exit code 124 when it expires), and host
paths (``ro``, ``rw``) are bound for the host admin only.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from popek.api.instances import bad
from popek.api.runner import session
from popek.api.scope import identity
from popek.core import views
from popek.core.service import MAX_TIMEOUT
from popek.errors import InvalidInput

router = APIRouter(prefix="/1.0/sandboxes", tags=["sandboxes"])


@router.get("/profiles")
def list_profiles(request: Request) -> list[dict[str, Any]]:
    """The sandbox profiles (a profile that does not load: with its error)."""
    with session(identity(request)) as core:
        core.check("sandbox.list")
    return views.sandbox_profiles()


class RunBody(BaseModel):
    """``popek sandbox run``'s options and command, and the command's input."""

    model_config = ConfigDict(extra="forbid")
    command: list[str] = Field(min_length=1, max_length=4096)
    profile: str = Field(default="default", min_length=1, max_length=64)
    network: bool = False
    ro: list[str] = Field(default=[], max_length=64)
    rw: list[str] = Field(default=[], max_length=64)
    memory: int | str | None = None
    timeout: float = Field(default=60.0, gt=0, le=MAX_TIMEOUT)
    stdin: str = ""


def _memory(value: int | str | None) -> int | None:
    from popek.units import parse_size

    if isinstance(value, int) and value <= 0:
        raise bad("memory", f"invalid memory {value}: must be a positive number of bytes")
    if value is None or isinstance(value, int):
        return value
    try:
        return parse_size(value, "memory")
    except InvalidInput as exc:
        raise bad("memory", str(exc)) from exc


@router.post("/run")
def run(request: Request, body: RunBody) -> dict[str, Any]:
    """Run a command in a sandbox: its exit code and output (not interactive)."""
    from popek.core.requests import SandboxCapture

    if any("\0" in a for a in body.command):
        raise bad("command", "invalid command: an argument holds a NUL byte")
    req = SandboxCapture(command=tuple(body.command), profile=body.profile,
                         network=body.network, ro=tuple(body.ro), rw=tuple(body.rw),
                         memory=_memory(body.memory), timeout=body.timeout,
                         stdin=body.stdin.encode())
    with session(identity(request)) as core:
        result = core.handle(req)
    return {"exit_code": result.exit_code,
            "stdout": result.stdout.decode(errors="replace"),
            "stderr": result.stderr.decode(errors="replace")}
