"""``/1.0/instances``: the instance commands of the CLI, as resources.

The records are those of ``popek list`` and ``popek info --format json``
(:meth:`popek.core.instances.Instances.summaries` and ``info``); every change
is the CLI's typed request handled by the core.  A launch, a start, a stop, a
restart and a delete return ``202`` with an operation; pause and resume are
quick and answer when done.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from popek.api.runner import accepted, json_body, json_response, session
from popek.api.scope import identity
from popek.core.service import MAX_TIMEOUT, Core
from popek.core.service import Request as CoreRequest
from popek.errors import AlreadyExists, InvalidInput, NotFound
from popek.names import validate_name

router = APIRouter(prefix="/1.0/instances", tags=["instances"])

Seconds = Annotated[float, Field(ge=0, le=MAX_TIMEOUT)]
#: the project an instance request acts in (default: the identity's own; ``default``
#: for the host admin), as the CLI's ``--project``
Project = Annotated[str | None, Query(max_length=63, description="the project (--project)")]


def bad(field: str, message: str) -> InvalidInput:
    """InvalidInput naming the request ``field`` it is about."""
    exc = InvalidInput(message)
    exc.field = field  # type: ignore[attr-defined]
    return exc


def _name(name: str) -> str:
    try:
        return validate_name(name)
    except InvalidInput as exc:
        raise bad("name", str(exc)) from exc


def summary(core: Core, name: str) -> dict[str, Any]:
    """The ``popek list`` record of instance ``name``."""
    core.instances.get(name)  # NotFound
    for rec in core.instances.summaries():
        if rec["name"] == name:
            return rec
    return {"name": name}


def _authorized(core: Core, request: CoreRequest[Any]) -> None:
    """Refuse ``request`` now (403, audited as denied) when the identity may not make it."""
    core.authorize(request)


#: the body last sent for a listing, by the rows it is made of: a listing given
#: again (popek.core.listings) is the same list, not encoded again
_last_listing: tuple[object, bytes] = (None, b"")


def _listing_body(rows: list[dict[str, Any]]) -> bytes:
    global _last_listing
    last = _last_listing
    if last[0] is rows:
        return last[1]
    body = json_body(rows)
    _last_listing = (rows, body)
    return body


@router.get("", response_model=list[dict[str, Any]])
async def list_instances(request: Request, project: Project = None,
                         all_projects: bool = False) -> Response:
    """The instances of the project (of every one: ``all_projects``), as ``popek list``."""
    from popek.core.auth import ALL_PROJECTS
    from popek.core.records import MINE

    who = identity(request)
    which = None if all_projects else MINE

    def kept() -> bytes | None:  # under a millisecond: on the event loop, no thread hop
        with session(who, project) as core:
            core.check("instance.list", ALL_PROJECTS if all_projects else None)
            rows = core.instances.kept_summaries(which)
            return None if rows is None else _listing_body(rows)

    def read() -> bytes:
        with session(who, project) as core:
            core.check("instance.list", ALL_PROJECTS if all_projects else None)
            return _listing_body(core.instances.summaries(which))

    body = kept()
    return json_response(body if body is not None else await run_in_threadpool(read))


@router.get("/{name}", response_model=dict[str, Any])
async def get_instance(request: Request, name: str, project: Project = None) -> Response:
    """One instance, as ``popek info NAME --format json`` shows it."""
    who = identity(request)

    def quick() -> bytes | None:  # a container's files: on the event loop, no thread hop
        with session(who, project) as core:
            core.check("instance.info")
            if not core.instances.quick_info(_name(name)):
                return None
            return json_body(core.instances.info(name))

    def read() -> bytes:
        with session(who, project) as core:
            core.check("instance.info")
            core.instances.reconcile([_name(name)])
            return json_body(core.instances.info(name))

    body = quick()
    return json_response(body if body is not None else await run_in_threadpool(read))


class LaunchBody(BaseModel):
    """``popek launch``'s arguments; sizes as bytes or text (``512MiB``)."""

    model_config = ConfigDict(extra="forbid")
    image: str = Field(min_length=1, max_length=200)
    name: str = Field(min_length=1, max_length=200)
    engine: Literal["qemu", "container"] = "qemu"
    vcpus: int | None = Field(default=None, ge=1, le=1024)
    memory: int | str | None = None
    accel: str = "auto"
    runtime: str = "auto"
    pids: int | None = Field(default=None, ge=1)
    disk: int | str | None = None
    net_rate: str = ""
    mounts: list[str] = []
    networks: list[str] = []
    label: str | None = None
    profiles: list[str] = []
    config: dict[str, str] = {}
    timeout: Seconds = 180.0
    #: block volumes to attach, POOL/VOLUME of the project (``--disk POOL/VOLUME``)
    volumes: list[Annotated[str, Field(min_length=3, max_length=127)]] = Field(
        default_factory=list, max_length=16)


def _size(value: int | str | None, field: str) -> int | None:
    from popek.units import parse_size

    if value is None or isinstance(value, int):
        if isinstance(value, int) and value <= 0:
            raise bad(field, f"invalid {field} {value}: must be a positive number of bytes")
        return value
    try:
        return parse_size(value, field)
    except InvalidInput as exc:
        raise bad(field, str(exc)) from exc


@router.post("", status_code=202)
def launch(request: Request, body: LaunchBody, project: Project = None) -> JSONResponse:
    """Launch an instance (``popek launch``): an operation, its result the instance."""
    from popek.core.config import check_key
    from popek.core.requests import Launch

    _name(body.name)
    limits: dict[str, int] = {} if body.pids is None else {"pids": body.pids}
    disk = _size(body.disk, "disk")
    if disk is not None:
        limits["disk"] = disk
    if body.net_rate:
        from popek.network.shaping import parse_rate

        try:
            limits["net"] = parse_rate(body.net_rate)
        except InvalidInput as exc:
            raise bad("net_rate", str(exc)) from exc
    for key in body.config:
        try:
            check_key(key)
        except InvalidInput as exc:
            raise bad("config", str(exc)) from exc
    req = Launch(image=body.image, name=body.name, vcpus=body.vcpus,
                 memory=_size(body.memory, "memory"), accel=body.accel, engine=body.engine,
                 runtime=body.runtime, limits=limits, mounts=tuple(body.mounts),
                 networks=tuple(body.networks), label=body.label, ready_timeout=body.timeout,
                 profiles=tuple(body.profiles), config=dict(body.config),
                 volumes=tuple(body.volumes))
    who = identity(request)
    with session(who, project) as core:  # refused here, before any operation: nothing changes
        _authorized(core, req)
        core.images.resolve(body.image, core.project)  # its own, else default's
        try:
            core.instances.get(body.name)
        except NotFound:
            pass
        else:
            raise AlreadyExists(f"instance {body.name} already exists")

    def work(core: Core, progress: Any) -> dict[str, Any]:
        core.handle(dataclasses.replace(req, progress=progress))
        return summary(core, body.name)

    return accepted(request.app.state.runner.submit("instance.launch", body.name, work,
                                                    who, project))


class StateBody(BaseModel):
    """A change of state (``PUT /1.0/instances/NAME/state``)."""

    model_config = ConfigDict(extra="forbid")
    action: Literal["start", "stop", "restart", "pause", "resume"]
    timeout: Seconds | None = None
    force: bool = False


@router.put("/{name}/state", response_model=None)
def change_state(request: Request, name: str, body: StateBody,
                 project: Project = None) -> JSONResponse | dict[str, Any]:
    """Start, stop (``timeout``: graceful for that long, then forced), restart, pause, resume.

    Start, stop and restart return an operation; pause and resume the instance.
    """
    from popek.core.requests import Pause, Restart, Resume, Start, Stop

    _name(name)
    timeout, force = body.timeout, body.force
    stop_for = 30.0 if timeout is None else timeout
    req: Any  # one of five request types (Request is invariant in its result)
    if body.action == "start":
        req = Start(name, ready_timeout=180.0 if timeout is None else timeout)
    elif body.action == "stop":
        req = Stop(name, force=force, timeout=stop_for)
    elif body.action == "restart":
        req = Restart(name, force=force, timeout=stop_for)
    else:
        req = Pause(name) if body.action == "pause" else Resume(name)
    who = identity(request)
    with session(who, project) as core:
        if body.action in ("pause", "resume"):
            core.handle(req)
            return summary(core, name)
        _authorized(core, req)
        core.instances.get(name)  # NotFound before an operation is made

    def work(core: Core, progress: Any) -> dict[str, Any]:
        run = req if isinstance(req, Stop) else dataclasses.replace(req, progress=progress)
        how = core.handle(run)
        out = summary(core, name)
        return {**out, "stopped": how} if isinstance(req, Stop) else out

    return accepted(request.app.state.runner.submit(req.op, name, work, who, project))


@router.delete("/{name}", status_code=202)
def delete(request: Request, name: str, force: bool = False,
           project: Project = None) -> JSONResponse:
    """Delete an instance (``force``: stop it first): an operation."""
    from popek.core.requests import Delete

    _name(name)
    req = Delete(name, force=force)
    who = identity(request)
    with session(who, project) as core:
        _authorized(core, req)
        core.instances.get(name)

    def work(core: Core, progress: Any) -> None:
        core.handle(req)

    return accepted(request.app.state.runner.submit(req.op, name, work, who, project))


class ExecBody(BaseModel):
    """A command to run in an instance, without a terminal."""

    model_config = ConfigDict(extra="forbid")
    command: list[str] = Field(min_length=1)
    stdin: str = ""
    timeout: Seconds = 60.0


@router.post("/{name}/exec")
def exec_(request: Request, name: str, body: ExecBody, project: Project = None) -> dict[str, Any]:
    """Run a command in a running instance; its output and exit code (not interactive)."""
    from popek.core.requests import Exec

    _name(name)
    data = body.stdin.encode()
    with session(identity(request), project) as core:
        result = core.handle(Exec(name, argv=tuple(body.command), timeout=body.timeout,
                                  stream=False, tty=False, stdin=lambda: data))
    if isinstance(result, int):  # not asked for (stream=False); kept total
        return {"exit_code": result, "stdout": "", "stderr": ""}
    return {"exit_code": result.exit_code,
            "stdout": result.stdout.decode(errors="replace"),
            "stderr": result.stderr.decode(errors="replace")}


def config_of(core: Core, name: str) -> dict[str, Any]:
    """``popek config show NAME --format json``: the settings and the profiles launched with."""
    return {**core.instances.config_show(name),
            "profiles": core.instances.get(name).spec.profiles}


@router.get("/{name}/config")
def get_config(request: Request, name: str, project: Project = None) -> dict[str, Any]:
    """The instance's settings and profiles, as ``popek config show NAME --format json``."""
    with session(identity(request), project) as core:
        core.check("instance.config")
        core.instances.reconcile([_name(name)])
        return config_of(core, name)


@router.patch("/{name}/config")
def patch_config(request: Request, name: str, values: Annotated[dict[str, str | None], Body()],
                 project: Project = None) -> dict[str, Any]:
    """Set keys (``config set``) and, those given as ``null``, unset them (``config unset``)."""
    from popek.core.config import check_key
    from popek.core.requests import ConfigSet, ConfigUnset

    _name(name)
    if not values:
        raise bad("config", "no key given: send an object of KEY: VALUE (null unsets KEY)")
    for key in values:
        try:
            check_key(key)
        except InvalidInput as exc:
            raise bad(key, str(exc)) from exc
    sets = {k: v for k, v in values.items() if v is not None}
    unsets = tuple(k for k, v in values.items() if v is None)
    with session(identity(request), project) as core:
        if sets:
            core.handle(ConfigSet(name, values=sets))
        if unsets:
            core.handle(ConfigUnset(name, keys=unsets))
        return config_of(core, name)
