"""``/1.0/operations``: long work the API started, to poll or wait on.

Recorded in the state store (:mod:`popek.core.operations`): they outlive the
server; one whose server died is ``failure`` with ``the server stopped while
it ran``.
"""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request

from popek.api.runner import session
from popek.core.operations import Operations, check_id
from popek.core.service import MAX_TIMEOUT

router = APIRouter(prefix="/1.0/operations", tags=["operations"])


@router.get("")
def list_operations() -> list[dict[str, Any]]:
    """Every operation recorded, oldest first."""
    with session() as core:
        return Operations(core.store).all()


@router.get("/{op_id}")
def get_operation(op_id: str) -> dict[str, Any]:
    """One operation: its status, progress, result or error."""
    with session() as core:
        return Operations(core.store).get(op_id)


@router.get("/{op_id}/wait")
async def wait_operation(request: Request, op_id: str,
                         timeout: Annotated[float, Query(ge=0, le=MAX_TIMEOUT)] = 60.0,
                         ) -> dict[str, Any]:
    """The operation once it has finished, or as it is after ``timeout`` seconds."""
    check_id(op_id)
    await anyio.to_thread.run_sync(get_operation, op_id)  # NotFound at once
    await anyio.to_thread.run_sync(request.app.state.runner.wait, op_id, timeout,
                                   abandon_on_cancel=True)
    return await anyio.to_thread.run_sync(get_operation, op_id)
