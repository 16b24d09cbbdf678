"""The one place the API's application is built: :func:`create_app`.

Each resource has a router of its own module; :data:`ROUTERS` lists them, and
a module that adds a resource adds its router there.  One application serves
the local socket (``local=True``: root, the admin) and another, over the same
runner, TCP with TLS (``local=False``: a bearer token on every request).
"""

from __future__ import annotations

from fastapi import Depends, FastAPI

from popek.api import (
    admin,
    certificates,
    errors,
    events,
    images,
    imagetools,
    instances,
    networks,
    operations,
    ports,
    profiles,
    projects,
    sandboxes,
    sessions,
    storage,
    tokens,
    trust,
)
from popek.api import metrics as metrics_api
from popek.api.auth import identified
from popek.api.runner import Runner

#: the routers of every resource, in the order the OpenAPI document lists them
ROUTERS = (instances.router, ports.router, imagetools.router, images.router, networks.router,
           trust.router, profiles.router, operations.router, events.router, sessions.router,
           admin.router, projects.router, tokens.router, certificates.router, sandboxes.router,
           storage.router)


def create_app(runner: Runner | None = None, local: bool = True) -> FastAPI:
    """The API application; ``local``: served on root's Unix socket (no token asked)."""
    app = FastAPI(title="popek", version=_version(), openapi_url="/1.0/openapi.json",
                  docs_url=None, redoc_url=None, dependencies=[Depends(identified)])
    app.state.local = local
    app.state.runner = runner or Runner()
    errors.install(app)
    metrics_api.install(app, server=app.state.runner)  # GET /metrics, the requests counted
    for router in ROUTERS:
        app.include_router(router)
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("popek")
    except PackageNotFoundError:
        return "0"
