"""``GET /1.0/events``: a websocket of lifecycle changes, operations and audit records.

Each message is one JSON event of :mod:`popek.core.events`; a token's holder
gets its own project's only.  ``?types=`` a
comma-separated list of ``lifecycle``, ``operation``, ``audit`` keeps those.
A thread per client reads the store's change log (the store is used by the
thread that opened it only) and hands the events to the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from popek.api.scope import identity, seen
from popek.core.events import TYPES, EventReader, project_of
from popek.errors import InvalidInput

router = APIRouter(prefix="/1.0", tags=["events"])

#: how often a client's thread looks at the change log (seconds)
POLL_S = 0.2


def _types(text: str) -> set[str]:
    chosen = {t.strip() for t in text.split(",") if t.strip()} or set(TYPES)
    unknown = chosen - set(TYPES)
    if unknown:
        raise InvalidInput(f"unknown event type {sorted(unknown)[0]!r}; allowed: "
                           f"{', '.join(TYPES)}")
    return chosen


def _reader(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[dict[str, Any] | None],
            stop: threading.Event, ready: threading.Event) -> None:
    from popek.state import open_store
    from popek.trust.audit import log_path

    store = open_store()
    try:
        reader = EventReader(store, log_path())
        ready.set()
        while not stop.wait(POLL_S):
            for ev in reader.poll():
                loop.call_soon_threadsafe(queue.put_nowait, ev)
    except Exception:  # the store failed: the client's stream ends
        loop.call_soon_threadsafe(queue.put_nowait, None)
    finally:
        ready.set()
        close = getattr(store, "close", None)
        if close is not None:
            close()


@router.websocket("/events")
async def events(ws: WebSocket, types: str = "") -> None:
    """Stream events as they happen, from the moment the socket is accepted."""
    try:
        wanted = _types(types)
    except InvalidInput as exc:
        await ws.close(code=1008, reason=str(exc)[:120])
        return
    project = seen(identity(ws))
    await ws.accept()
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=_reader, args=(loop, queue, stop, ready),
                              name="events", daemon=True)
    thread.start()
    await asyncio.to_thread(ready.wait)
    await ws.send_text(json.dumps({"type": "hello", "types": sorted(wanted)}))
    closed = asyncio.ensure_future(_closed(ws))
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, closed}, return_when=asyncio.FIRST_COMPLETED)
            if closed in done:
                getter.cancel()
                return
            ev = getter.result()
            if ev is None:
                await ws.close(code=1011)
                return
            if ev["type"] in wanted and (project is None or project_of(ev) == project):
                await ws.send_text(json.dumps(ev, default=str))
    except (WebSocketDisconnect, RuntimeError):
        return
    finally:
        stop.set()
        closed.cancel()


async def _closed(ws: WebSocket) -> None:
    """Return when the client closes the socket (what it sends is ignored)."""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
