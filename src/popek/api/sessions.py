"""Websockets of an instance's console and of an interactive ``exec`` (with a terminal).

``/1.0/instances/NAME/console`` (``?rows=&cols=&project=``) attaches to the
console (a VM's serial line, a login shell on a terminal in a container);
``/1.0/instances/NAME/exec`` (``?command=ARG`` once per argument,
``&tty=true&rows=&cols=&project=``) runs a command; non-interactive exec stays
``POST /1.0/instances/NAME/exec``.  Both are the core's audited requests
(:class:`~popek.core.requests.Console`, :class:`~popek.core.requests.Exec`
with a ``relay``) and need the identity's console grant.

Frames, client to server: binary is input; text is a JSON control message:
``{"type": "resize", "rows": R, "cols": C}``, ``{"type": "eof"}`` (end of
input), ``{"type": "detach"}`` (the console: the instance runs on; closing
the socket detaches too).  Server to client: binary is output (for exec the
first byte is the stream, 1 stdout or 2 stderr, then the bytes; the console's
is the raw bytes), and a last text message ``{"type": "exit", "exit_code": N}``
(exec), ``{"type": "detached"}`` or ``{"type": "closed"}`` (the console
ended on its own), or ``{"type": "error", "error": {code, message, field}}``,
then the close.  A request refused before the upgrade (no console grant:
403, audited as denied; 404; 409 not running; 400) gets the HTTP status and
the error body of every other route instead of a websocket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, HTTPException, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse

from popek.api.auth import identify
from popek.api.errors import body, status_of
from popek.api.runner import session
from popek.core.auth import Identity
from popek.core.operations import error_body
from popek.core.service import Core
from popek.core.service import Request as CoreRequest
from popek.errors import InvalidInput, PopekError

router = APIRouter(prefix="/1.0/instances", tags=["sessions"])

#: output chunks queued for a slow client before its descriptors are read no more
BACKLOG = 64
#: the largest window accepted (rows and columns)
MAX_SIZE = 4096
_READ = 1 << 16


def _size(rows: str | None, cols: str | None) -> tuple[int, int]:
    out = []
    for field, text, default in (("rows", rows, 24), ("cols", cols, 80)):
        value = default if not text else (int(text) if text.isdigit() else 0)
        if not 1 <= value <= MAX_SIZE:
            exc = InvalidInput(f"invalid {field} {text!r}: a whole number from 1 to {MAX_SIZE}")
            exc.field = field  # type: ignore[attr-defined]
            raise exc
        out.append(value)
    return out[0], out[1]


async def _refuse(ws: WebSocket, exc: BaseException) -> None:
    """Answer the upgrade request with an HTTP error instead of a websocket."""
    if isinstance(exc, HTTPException):
        response = JSONResponse(body("unauthenticated" if exc.status_code == 401 else "denied",
                                     str(exc.detail)), status_code=exc.status_code,
                                headers=getattr(exc, "headers", None))
    else:
        status = status_of(exc) if isinstance(exc, PopekError) else 500
        response = JSONResponse({"error": error_body(exc)}, status_code=status)
    await ws.send_denial_response(response)


async def _begin(ws: WebSocket, project: str | None, request: CoreRequest[Any],
                 check: Callable[[Core], None]) -> Identity | None:
    """Who asks, once ``request`` is authorized and ``check`` passed; ``None``: refused."""
    try:
        who = await asyncio.to_thread(identify, ws)

        def precheck() -> None:
            with session(who, project) as core:
                core.authorize(request)  # audited as denied when refused
                check(core)

        await asyncio.to_thread(precheck)
    except (PopekError, HTTPException) as exc:
        await _refuse(ws, exc)
        return None
    return who


class _Bridge:
    """Relays one channel to the websocket, in the event loop, until either side ends."""

    def __init__(self, ws: WebSocket, prefixed: bool) -> None:
        self.ws = ws
        self.prefixed = prefixed
        self.reason = "closed"  # or "detach", "gone" (the client went away)

    async def run(self, channel: Any) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue()
        live = dict(channel.outputs)
        paused: dict[int, int] = {}

        def readable(stream: int, fd: int) -> None:
            try:
                data = os.read(fd, _READ)
            except BlockingIOError:
                return
            except OSError:  # EIO: the terminal's other side is gone
                data = b""
            if not data:
                loop.remove_reader(fd)
                live.pop(stream, None)
                if not live:
                    queue.put_nowait(None)
                return
            queue.put_nowait((stream, data))
            if queue.qsize() >= BACKLOG:
                loop.remove_reader(fd)
                paused[stream] = fd

        async def send() -> None:
            while (item := await queue.get()) is not None:
                stream, data = item
                await self.ws.send_bytes(bytes([stream]) + data if self.prefixed else data)
                if paused and queue.qsize() < BACKLOG // 2:
                    for s, fd in paused.items():
                        loop.add_reader(fd, readable, s, fd)
                    paused.clear()

        async def receive() -> None:
            while True:
                msg = await self.ws.receive()
                if msg["type"] == "websocket.disconnect":
                    self.reason = "gone"
                    return
                if msg.get("bytes") is not None:
                    await _write(loop, channel.input, msg["bytes"])
                elif msg.get("text") is not None and self._control(channel, msg["text"]):
                    return

        for stream, fd in live.items():
            loop.add_reader(fd, readable, stream, fd)
        tasks = [asyncio.ensure_future(send()), asyncio.ensure_future(receive())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for fd in {*live.values(), *paused.values()}:
                loop.remove_reader(fd)
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            if tasks[1].done() and not tasks[1].cancelled() and tasks[1].exception():
                self.reason = "gone"

    def _control(self, channel: Any, text: str) -> bool:
        """Act on a control message; ``True`` when it ends the session (detach)."""
        try:
            msg = json.loads(text)
            kind = msg.get("type") if isinstance(msg, dict) else None
            if kind == "resize":
                rows, cols = _size(str(msg.get("rows")), str(msg.get("cols")))
                channel.resize(rows, cols)
            elif kind == "eof":
                channel.close_input()
            elif kind == "detach":
                self.reason = "detach"
                return True
        except (ValueError, InvalidInput, OSError):
            pass  # a malformed control message is ignored: the session goes on
        return False


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """Give ``future`` its result or ``error`` unless it has one."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


async def _write(loop: asyncio.AbstractEventLoop, fd: int | None, data: bytes) -> None:
    """Write all of ``data`` to non-blocking ``fd``, waiting while it is full."""
    view = memoryview(data)
    while view and fd is not None:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_writer(fd, _settle, ready, None, None)
            try:
                await ready
            finally:
                loop.remove_writer(fd)
        except OSError:  # the other side went away: the output side ends the session
            return


async def _session(ws: WebSocket, who: Identity, project: str | None,
                   make: Callable[[Callable[[Any], None]], CoreRequest[Any]],
                   prefixed: bool) -> tuple[Any, _Bridge]:
    """Accept, handle the request made by ``make(relay)`` in a thread of its own; its result."""
    await ws.accept()
    loop = asyncio.get_running_loop()
    bridge = _Bridge(ws, prefixed)
    done: asyncio.Future[Any] = loop.create_future()

    def relay(channel: Any) -> None:
        asyncio.run_coroutine_threadsafe(bridge.run(channel), loop).result()

    def work() -> None:
        try:
            with session(who, project) as core:
                result = core.handle(make(relay))
        except BaseException as exc:  # handed to the event loop, which answers it
            loop.call_soon_threadsafe(_settle, done, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, done, result, None)

    # a thread per session: the executors' few workers are not held for its length
    threading.Thread(target=work, name="session", daemon=True).start()
    return await done, bridge


async def _finish(ws: WebSocket, message: dict[str, Any], bridge: _Bridge | None) -> None:
    if bridge is not None and bridge.reason == "gone":
        return
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        await ws.send_text(json.dumps(message))
        await ws.close(1000 if message["type"] != "error" else 1011)


@router.websocket("/{name}/console")
async def console(ws: WebSocket, name: str) -> None:
    """Attach to the console of a running instance (see the module's text for frames)."""
    from popek.core.requests import Console

    q = ws.query_params
    project = q.get("project") or None
    try:
        size = _size(q.get("rows"), q.get("cols"))
    except InvalidInput as exc:
        await _refuse(ws, exc)
        return
    who = await _begin(ws, project, Console(name),
                       lambda core: core.instances.console_target(name) and None)
    if who is None:
        return
    try:
        _, bridge = await _session(ws, who, project,
                                   lambda relay: Console(name, relay=relay, size=size), False)
    except Exception as exc:
        await _finish(ws, {"type": "error", "error": error_body(exc)}, None)
        return
    await _finish(ws, {"type": "detached" if bridge.reason == "detach" else "closed"}, bridge)


@router.websocket("/{name}/exec")
async def exec_session(ws: WebSocket, name: str) -> None:
    """Run a command interactively, a terminal when ``tty`` (see the module's text)."""
    from popek.core.requests import Exec

    q = ws.query_params
    project = q.get("project") or None
    argv = tuple(q.getlist("command"))
    tty = q.get("tty", "true").lower() not in ("false", "0", "no")
    try:
        size = _size(q.get("rows"), q.get("cols"))
        if not argv:
            exc = InvalidInput("no command given: pass ?command=ARG once per argument")
            exc.field = "command"  # type: ignore[attr-defined]
            raise exc
    except InvalidInput as exc:
        await _refuse(ws, exc)
        return
    who = await _begin(ws, project, Exec(name, argv=argv, tty=tty, stream=True),
                       lambda core: core.instances.exec_target(name, list(argv)))
    if who is None:
        return
    try:
        code, bridge = await _session(
            ws, who, project,
            lambda relay: Exec(name, argv=argv, tty=tty, stream=True, relay=relay, size=size),
            True)
    except Exception as exc:
        await _finish(ws, {"type": "error", "error": error_body(exc)}, None)
        return
    await _finish(ws, {"type": "exit", "exit_code": code}, bridge)
