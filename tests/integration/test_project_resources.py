"""Images and networks of projects (issue 14.3), for real: networks of one name in three
projects are three bridges, subnets and dnsmasqs on the host; an instance of a project
attaches to its project's network of a name before ``default``'s; and through a real
``popek serve`` with tokens of two projects, neither sees the other's networks and
images, and a project admin changes only its own project's (never ``default``'s, which
every project sees read-only).
"""

from __future__ import annotations

import io
import ipaddress
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_api import Server, run_operation, start_server, stop_server

from framework import popek, popek_json

A, B = "ppn-a", "ppn-b"
NET = "ppn-net"        # in default, A and B
HOSTNET = "ppn-host"   # default's only
ANET = "ppn-anet"      # A's, made through the API
CT = "ppn-ct"
IMG = "ppn-img"


def _cleanup() -> None:
    popek("delete", "--force", CT, "--project", A, check=False)
    for project in (A, B):
        for net in (NET, ANET):
            popek("network", "delete", "--force", net, "--project", project, check=False)
        popek("image", "delete", IMG, "--project", project, check=False)
    for net in (NET, HOSTNET):
        popek("network", "delete", "--force", net, check=False)
    for project in (A, B):
        popek("project", "delete", project, check=False)


@pytest.fixture(scope="module")
def server(popek_home: Path, minimal_image: str) -> Iterator[Server]:
    d = Path(tempfile.mkdtemp(prefix="ppn-"))
    for project in (A, B):
        popek("project", "create", project)
    popek("network", "create", NET)
    popek("network", "create", HOSTNET)
    srv = start_server(d / "api.sock")
    try:
        yield srv
    finally:
        stop_server(srv)
        _cleanup()
        shutil.rmtree(d, ignore_errors=True)


def _bridge(name: str) -> bool:
    import subprocess

    out = subprocess.run(["ip", "-br", "link", "show", "dev", name], capture_output=True,
                         text=True, check=False)
    return out.returncode == 0


def test_one_network_name_in_three_projects(server: Server, minimal_image: str) -> None:
    popek("network", "create", NET, "--project", A)
    popek("network", "create", NET, "--project", B)
    mine = popek_json("network", "list", "--project", A)
    assert [(n["name"], n["project"]) for n in mine] == [
        (NET, A), (HOSTNET, "default"), (NET, "default")]
    theirs = popek_json("network", "list", "--project", B)
    assert [(n["name"], n["project"]) for n in theirs] == [
        (NET, B), (HOSTNET, "default"), (NET, "default")]
    three = [mine[0], theirs[0], mine[2]]
    assert len({n["bridge"] for n in three}) == 3, three
    subnets = [ipaddress.IPv4Network(n["subnet"]) for n in three]
    assert not any(a.overlaps(b) for i, a in enumerate(subnets) for b in subnets[i + 1:])
    for n in three:
        assert _bridge(n["bridge"]), n
        info = popek_json("network", "info", NET, "--project", n["project"])
        assert info["project"] == n["project"] and info["bridge"]["exists"], info
        assert info["dnsmasq"]["alive"], info
    # an instance of A: A's network of that name, and default's of another
    popek("launch", minimal_image, CT, "--container", "--network", NET, "--network", HOSTNET,
          "--project", A)
    ports = {p["network"]: p["ipv4"] for p in popek_json("info", CT, "--project", A)["ports"]}
    host = popek_json("network", "info", HOSTNET)
    assert ipaddress.IPv4Address(ports[NET]) in subnets[0], ports
    assert ipaddress.IPv4Address(ports[HOSTNET]) in ipaddress.IPv4Network(host["subnet"])
    got = popek("exec", CT, "--project", A, "--", "ip", "-4", "-o", "addr").stdout
    assert ports[NET] in got and ports[HOSTNET] in got, got
    # default's network is A's to use, not to delete; B's is not A's at all
    r = popek("network", "delete", HOSTNET, "--project", A, check=False)
    assert r.returncode != 0 and "shared read-only" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert HOSTNET in {n["name"] for n in popek_json("network", "list")}
    assert popek_json("network", "info", NET, "--project", B)["state"] == "ready"
    popek("delete", "--force", CT, "--project", A)
    popek("network", "delete", NET, "--project", B)
    assert not _bridge(theirs[0]["bridge"])
    assert _bridge(mine[0]["bridge"]) and _bridge(mine[2]["bridge"])


def _token(c: httpx.Client, project: str, role: str, name: str) -> str:
    r = c.post("/1.0/tokens", json={"project": project, "role": role, "name": name})
    assert r.status_code == 201, r.text
    return str(r.json()["secret"])


def _rootfs_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("bin/sh", b"#!fake\n"), ("etc/hostname", b"ppn\n")):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _names(rows: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(r["name"], r["project"]) for r in rows}


def test_tokens_of_two_projects_over_tls(server: Server, minimal_image: str) -> None:
    with server.client() as c:
        admin_a = _token(c, A, "admin", "ppn-admin-a")
        viewer_a = _token(c, A, "viewer", "ppn-view-a")
        admin_b = _token(c, B, "admin", "ppn-admin-b")
        oper_b = _token(c, B, "operator", "ppn-oper-b")
    with server.tls(admin_a) as a, server.tls(viewer_a) as va, server.tls(admin_b) as b, \
            server.tls(oper_b) as ob:
        # networks: A's admin makes one in A; B sees nothing of it
        r = a.post("/1.0/networks", json={"name": ANET})
        assert r.status_code == 201, r.text
        assert (r.json()["name"], r.json()["project"]) == (ANET, A)
        assert (ANET, A) in _names(va.get("/1.0/networks").json())
        for client in (b, ob):
            rows = client.get("/1.0/networks").json()
            assert {r["project"] for r in rows} <= {B, "default"}, rows
            assert (HOSTNET, "default") in _names(rows)
            r = client.get(f"/1.0/networks/{ANET}")
            assert r.status_code == 404, r.text
            assert f"'{A}'" not in r.text and "existing networks: ppn-host" in r.text, r.text
            r = client.get("/1.0/networks", params={"project": A})
            assert r.status_code == 403 and r.json()["error"]["code"] == "denied", r.text
            r = client.delete(f"/1.0/networks/{ANET}")  # B's admin: not found in B
            assert r.status_code == (404 if client is b else 403), r.text
        r = ob.post("/1.0/networks", json={"name": "ppn-onet"})
        assert r.status_code == 403 and "for a project admin" in r.text, r.text
        r = a.delete(f"/1.0/networks/{HOSTNET}")  # default's: read-only to A
        assert r.status_code == 404 and "shared read-only" in r.text, r.text
        assert popek_json("network", "info", HOSTNET)["state"] == "ready"
        # images: A's admin imports one (unsigned: signing is the host admin's)
        r = a.post("/1.0/images/import", params={"name": IMG}, content=_rootfs_tar())
        assert r.status_code == 400 and "may not sign" in r.text, r.text  # before any upload
        op = run_operation(a, "POST", "/1.0/images/import",
                           params={"name": IMG, "sign": "false"}, content=_rootfs_tar())
        assert op["status"] == "success", op
        assert (op["result"]["name"], op["result"]["project"]) == (IMG, A)
        assert _names(va.get("/1.0/images").json()) >= {(IMG, A), (minimal_image, "default")}
        assert va.get(f"/1.0/images/{IMG}").json()["project"] == A
        for client in (b, ob):
            assert (IMG, A) not in _names(client.get("/1.0/images").json())
            assert (minimal_image, "default") in _names(client.get("/1.0/images").json())
            assert client.get(f"/1.0/images/{IMG}").status_code == 404
            r = client.get("/1.0/images", params={"project": A})
            assert r.status_code == 403, r.text
        r = b.delete(f"/1.0/images/{IMG}")
        assert r.status_code == 404, r.text
        r = a.delete(f"/1.0/images/{minimal_image}")  # default's: not A's to delete
        assert r.status_code == 404, r.text
        assert popek_json("image", "info", minimal_image)["project"] == "default"
        r = ob.post("/1.0/images", json={"name": "minimal", "sign": False})
        assert r.status_code == 403, r.text
        # the host admin's CLI sees A's only with --project A
        assert IMG not in {i["name"] for i in popek_json("image", "list")}
        assert IMG in {i["name"] for i in popek_json("image", "list", "--project", A)}
        assert a.delete(f"/1.0/images/{IMG}").status_code == 200
        assert a.delete(f"/1.0/networks/{ANET}").status_code == 200


def test_reset_purge_deletes_every_projects_networks() -> None:
    """``admin reset --purge`` of a home takes its projects' networks too (by their
    project's name for them), bridges and dnsmasqs included."""
    import os
    import subprocess

    home = Path(tempfile.mkdtemp(prefix="popek-ppn-reset-", dir="/var/tmp"))
    home.chmod(0o755)
    env = {**os.environ, "POPEK_HOME": str(home)}
    try:
        popek("project", "create", "ppn-p", env=env)
        popek("network", "create", "ppn-rn", "--project", "ppn-p", env=env)
        popek("network", "create", "ppn-rn", env=env)
        rows = [*popek_json_env(env, "network", "list", "--project", "ppn-p")]
        bridges = [r["bridge"] for r in rows]
        assert len(bridges) == 2 and all(_bridge(b) for b in bridges), rows
        out = popek("admin", "reset", "--purge", "--yes", env=env).stdout
        assert "deleted network ppn-rn of project ppn-p (bridge" in out, out
        assert "deleted network ppn-rn (bridge" in out, out
        assert not any(_bridge(b) for b in bridges)
        pids = subprocess.run(["pgrep", "-f", f"{home}/networks"], capture_output=True,
                              text=True, check=False).stdout.split()
        assert pids == [], "a dnsmasq of the purged home still runs"
    finally:
        if home.exists():
            popek("admin", "reset", "--purge", "--yes", env=env, check=False)
        shutil.rmtree(home, ignore_errors=True)


def popek_json_env(env: dict[str, str], *args: str) -> Any:
    import json

    return json.loads(popek(*args, "--format", "json", env=env).stdout)
