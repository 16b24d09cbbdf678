"""``/1.0/admin``: the host admin's ``popek admin`` commands (no token may use them).

- ``POST /1.0/admin/backup``: a consistent copy of the state store and the
  private keys, streamed back as the file ``popek admin backup`` writes;
- ``POST /1.0/admin/reset`` (``?purge=true``) and ``POST /1.0/admin/boot``:
  what the host was given back or brought back (``done``, ``failed``).

A backup is not a request of the core (it copies the store the core stands
on), so it is checked here as ``host.backup``: the host admin's alone.
Restore has no endpoint: it replaces the store under every popek process,
the server's own connections included (a server cannot give its store up
while it serves), so it is done on the host with the server stopped
(``systemctl stop popek-api; popek admin restore FILE``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from popek.api.runner import session
from popek.api.scope import identity

router = APIRouter(prefix="/1.0/admin", tags=["admin"])

def _report(report: Any) -> dict[str, Any]:
    return {"done": list(report.done), "failed": list(report.failed)}


@router.post("/backup", response_class=Response,
             responses={200: {"content": {"application/octet-stream": {}}}})
def backup(request: Request) -> Response:
    """The backup file of the state store and the private keys (it holds private keys)."""
    from popek.state.backup import backup as run

    with session(identity(request)) as core:
        core.check("host.backup")
    with tempfile.TemporaryDirectory(prefix="popek-backup-") as tmp:
        path = Path(tmp) / "backup"
        info = run(path)
        data = path.read_bytes()
    return Response(data, media_type="application/octet-stream",
                    headers={"X-Popek-Revision": str(info.revision),
                             "Content-Disposition": "attachment; filename=popek-backup"})


@router.post("/reset")
def reset(request: Request, purge: bool = False) -> dict[str, Any]:
    """Remove what this home made on the host (``popek admin reset --yes``; ``purge``:
    its instances and networks too, though the home's files stay: a server runs in it)."""
    from popek.core.requests.admin import HostReset

    with session(identity(request)) as core:
        return _report(core.handle(HostReset(purge=purge)))


@router.post("/boot")
def boot(request: Request) -> dict[str, Any]:
    """Bring this home back after the host booted (``popek admin boot``)."""
    from popek.core.requests.admin import HostBoot

    with session(identity(request)) as core:
        return _report(core.handle(HostBoot()))
