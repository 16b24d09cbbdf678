"""``/1.0/operations``: long work the API started, to poll or wait on.

Recorded in the state store (:mod:`popek.core.operations`): they outlive the
server; one whose server died is ``failure`` with ``the server stopped while
it ran``.  A token's holder sees its own project's operations only.
"""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request

from popek.api.runner import session
from popek.api.scope import identity, seen
from popek.core.auth import Identity
from popek.core.operations import Operations, check_id
from popek.core.service import MAX_TIMEOUT

router = APIRouter(prefix="/1.0/operations", tags=["operations"])


@router.get("")
def list_operations(request: Request) -> list[dict[str, Any]]:
    """Every operation recorded, oldest first."""
    who = identity(request)
    with session(who) as core:
        return Operations(core.store).all(seen(who))


def _get(who: Identity, op_id: str) -> dict[str, Any]:
    with session(who) as core:
        return Operations(core.store).get(op_id, seen(who))


@router.get("/{op_id}")
def get_operation(request: Request, op_id: str) -> dict[str, Any]:
    """One operation: its status, progress, result or error."""
    return _get(identity(request), op_id)


@router.get("/{op_id}/wait")
async def wait_operation(request: Request, op_id: str,
                         timeout: Annotated[float, Query(ge=0, le=MAX_TIMEOUT)] = 60.0,
                         ) -> dict[str, Any]:
    """The operation once it has finished, or as it is after ``timeout`` seconds."""
    check_id(op_id)
    who = identity(request)
    await anyio.to_thread.run_sync(_get, who, op_id)  # NotFound at once
    await anyio.to_thread.run_sync(request.app.state.runner.wait, op_id, timeout,
                                   abandon_on_cancel=True)
    return await anyio.to_thread.run_sync(_get, who, op_id)
