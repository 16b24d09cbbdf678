"""Every CLI verb has its API route, and the reverse holds for the table (issue 14).

The command tree is walked from the Typer application itself, so a verb
added to the CLI without a route (or without a reason to be the client's
alone) fails here; each route of the table must exist in the application
(HTTP routes as the OpenAPI document lists them, websockets as routed).
"""

from __future__ import annotations

import click
import pytest
import typer.main
from fastapi.routing import APIWebSocketRoute

from popek.api.app import ROUTERS, create_app
from popek.cli.main import app

#: CLI verb -> the API routes that do it ("METHOD /path"; "WS /path": a websocket)
ROUTES: dict[str, tuple[str, ...]] = {
    "launch": ("POST /1.0/instances",),
    "list": ("GET /1.0/instances",),
    "info": ("GET /1.0/instances/{name}",),
    "start": ("PUT /1.0/instances/{name}/state",),
    "stop": ("PUT /1.0/instances/{name}/state",),
    "restart": ("PUT /1.0/instances/{name}/state",),
    "pause": ("PUT /1.0/instances/{name}/state",),
    "resume": ("PUT /1.0/instances/{name}/state",),
    "delete": ("DELETE /1.0/instances/{name}",),
    "exec": ("POST /1.0/instances/{name}/exec", "WS /1.0/instances/{name}/exec"),
    "console": ("WS /1.0/instances/{name}/console", "GET /1.0/instances/{name}/console/log"),
    "attest": ("POST /1.0/instances/{name}/attest", "POST /1.0/attest/verify"),
    "monitor": ("WS /1.0/events",),
    "config get": ("GET /1.0/instances/{name}/config",),
    "config show": ("GET /1.0/instances/{name}/config",),
    "config set": ("PATCH /1.0/instances/{name}/config",),
    "config unset": ("PATCH /1.0/instances/{name}/config",),
    "image build": ("POST /1.0/images",),
    "image import": ("POST /1.0/images/import",),
    "image list": ("GET /1.0/images",),
    "image info": ("GET /1.0/images/{name}",),
    "image delete": ("DELETE /1.0/images/{name}",),
    "image sign": ("POST /1.0/images/{name}/sign",),
    "network create": ("POST /1.0/networks",),
    "network list": ("GET /1.0/networks",),
    "network info": ("GET /1.0/networks/{name}",),
    "network delete": ("DELETE /1.0/networks/{name}",),
    "network attach": ("POST /1.0/instances/{name}/networks",),
    "network detach": ("DELETE /1.0/instances/{name}/networks/{network}",),
    "storage create": ("POST /1.0/storage-pools",),
    "storage list": ("GET /1.0/storage-pools",),
    "storage info": ("GET /1.0/storage-pools/{name}",),
    "storage delete": ("DELETE /1.0/storage-pools/{name}",),
    "storage volume create": ("POST /1.0/storage-pools/{pool}/volumes",),
    "storage volume list": ("GET /1.0/storage-pools/{pool}/volumes", "GET /1.0/storage-volumes"),
    "storage volume info": ("GET /1.0/storage-pools/{pool}/volumes/{name}",),
    "storage volume resize": ("PATCH /1.0/storage-pools/{pool}/volumes/{name}",),
    "storage volume set": ("POST /1.0/storage-pools/{pool}/volumes/{name}/config",),
    "storage volume delete": ("DELETE /1.0/storage-pools/{pool}/volumes/{name}",),
    "storage volume snapshot": ("POST /1.0/storage-pools/{pool}/volumes/{name}/snapshots",),
    "storage volume snapshot-delete": (
        "DELETE /1.0/storage-pools/{pool}/volumes/{name}/snapshots/{snapshot}",),
    "storage volume restore": (
        "POST /1.0/storage-pools/{pool}/volumes/{name}/snapshots/{snapshot}/restore",),
    "storage volume import": ("POST /1.0/storage-pools/{pool}/volumes/{name}/import",),
    "storage volume attach": ("POST /1.0/storage-pools/{pool}/volumes/{name}/attach",),
    "storage volume detach": ("POST /1.0/storage-pools/{pool}/volumes/{name}/detach",),
    "storage volume export": ("GET /1.0/storage-pools/{pool}/volumes/{name}/export",),
    "storage volume clone": (
        "POST /1.0/storage-pools/{pool}/volumes/{name}/snapshots/{snapshot}/clone",),
    "trust keygen": ("POST /1.0/trust/keys",),
    "trust add": ("POST /1.0/trust/keys",),
    "trust list": ("GET /1.0/trust/keys",),
    "trust export": ("GET /1.0/trust/keys/{name}/pem",),
    "trust remove": ("DELETE /1.0/trust/keys/{name}",),
    "trust revoke": ("POST /1.0/trust/keys/{name}/revoke",),
    "trust allow-unsigned": ("PUT /1.0/trust/unsigned/{project}",),
    "policy show": ("GET /1.0/policy",),
    "policy apply": ("PUT /1.0/policy",),
    "policy check": ("POST /1.0/policy/check",),
    "audit log": ("GET /1.0/audit",),
    "audit verify": ("GET /1.0/audit/verify",),
    "audit checkpoint": ("POST /1.0/audit/checkpoint",),
    "admin backup": ("POST /1.0/admin/backup",),
    "admin reset": ("POST /1.0/admin/reset",),
    "admin boot": ("POST /1.0/admin/boot",),
    "profile create": ("POST /1.0/profiles",),
    "profile edit": ("PUT /1.0/profiles/{name}",),
    "profile list": ("GET /1.0/profiles",),
    "profile show": ("GET /1.0/profiles/{name}",),
    "profile delete": ("DELETE /1.0/profiles/{name}",),
    "sandbox run": ("POST /1.0/sandboxes/run",),
    "sandbox profiles": ("GET /1.0/sandboxes/profiles",),
    "project list": ("GET /1.0/projects",),
    "project create": ("POST /1.0/projects",),
    "project delete": ("DELETE /1.0/projects/{name}",),
    "project show": ("GET /1.0/projects/{name}",),
    "project set": ("PATCH /1.0/projects/{name}",),
    "token create": ("POST /1.0/tokens",),
    "token list": ("GET /1.0/tokens",),
    "token revoke": ("POST /1.0/tokens/{token_id}/revoke",),
    "certificate add": ("POST /1.0/certificates",),
    "certificate list": ("GET /1.0/certificates",),
    "certificate revoke": ("POST /1.0/certificates/{ref}/revoke",),
}

#: verbs that are the client's alone, and why
CLIENT_ONLY = {
    "serve": "runs the server itself",
    "version": "the client's version (the server's is in /1.0/openapi.json)",
    "completion": "a script for the client's shell",
    "remote add": "the client's list of servers",
    "remote list": "the client's list of servers",
    "remote remove": "the client's list of servers",
    "remote switch": "the client's list of servers",
    "project switch": "the client's current project (the API takes ?project=)",
    "command-server status": "the CLI's warm process on this host",
    "command-server stop": "the CLI's warm process on this host",
    "admin restore": "replaces the store under every popek process, the server's own "
                     "connections included: on the host, with the server stopped",
}


def _verbs() -> list[str]:
    def walk(cmd: click.Command, path: tuple[str, ...]) -> list[str]:
        if isinstance(cmd, click.Group):
            return [v for name, sub in cmd.commands.items() for v in walk(sub, (*path, name))]
        return [" ".join(path)]

    return walk(typer.main.get_command(app), ())


def _routes() -> set[str]:
    spec = create_app().openapi()
    http = {f"{method.upper()} {path}" for path, ops in spec["paths"].items() for method in ops}
    ws = {f"WS {route.path}" for router in ROUTERS for route in router.routes
          if isinstance(route, APIWebSocketRoute)}
    return http | ws


def test_every_cli_verb_has_a_route_or_a_reason() -> None:
    missing = [v for v in _verbs() if v not in ROUTES and v not in CLIENT_ONLY]
    assert not missing, f"CLI verbs with no API route: {missing}"


@pytest.mark.parametrize("verb", sorted(ROUTES))
def test_each_route_of_the_table_exists(verb: str) -> None:
    routes = _routes()
    absent = [r for r in ROUTES[verb] if r not in routes]
    assert not absent, f"{verb}: no {absent} in the application"


def test_the_table_names_only_real_verbs() -> None:
    verbs = set(_verbs())
    assert not (set(ROUTES) | set(CLIENT_ONLY)) - verbs
