"""Projects, tokens and sandboxes through a real ``popek serve`` (issue 14.2/14.3).

The host admin on the local socket makes projects and tokens; each token is
then used over TLS, as its holder would: a project admin manages its own
project's tokens and nothing of another project's, an operator and a viewer
may not make tokens, only the host admin makes, changes and deletes projects.
Records are those of the CLI's ``--format json``; a token's secret is in the
answer to its creation only.  A sandbox run answers with its output and exit
code.  Every change and every refusal is audited under the identity that
asked, and a refusal changes nothing.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_api import Server, start_server, stop_server

from framework import popek, popek_json

A, B = "rsp-a", "rsp-b"


@pytest.fixture(scope="module")
def server(popek_home: Path) -> Iterator[Server]:
    d = Path(tempfile.mkdtemp(prefix="rsp-"))
    srv = start_server(d / "api.sock")
    try:
        yield srv
    finally:
        stop_server(srv)
        for name in (A, B):
            popek("project", "delete", name, check=False)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def projects(server: Server) -> Iterator[None]:
    with server.client() as c:
        for name in (A, B):
            r = c.post("/1.0/projects", json={"name": name})
            assert r.status_code == 201, r.text
    yield


def token(c: httpx.Client, project: str, role: str, name: str, **kw: Any) -> dict[str, Any]:
    """A new token's record and secret (``c``: whoever makes it)."""
    r = c.post("/1.0/tokens", json={"project": project, "role": role, "name": name, **kw})
    assert r.status_code == 201, r.text
    rec = dict(r.json())
    assert rec["secret"].startswith(f"pk1.{rec['id']}.")
    return rec


def refused(r: httpx.Response, status: int = 403) -> None:
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"code", "message", "field"}, r.text


def audit(c: httpx.Client, op: str, target: str) -> list[dict[str, Any]]:
    return [r for r in c.get("/1.0/audit", params={"target": target}).json() if r["op"] == op]


def tokens_store() -> set[str]:
    return {t["id"] for t in popek_json("token", "list")}


def test_projects_as_the_cli_shows_them(server: Server) -> None:
    name = "rsp-p"
    with server.client() as c:
        try:
            r = c.post("/1.0/projects", json={"name": name})
            assert r.status_code == 201, r.text
            assert r.json() == popek_json("project", "show", name)
            refused(c.post("/1.0/projects", json={"name": name}), 409)
            listed = c.get("/1.0/projects").json()
            cli = popek_json("project", "list")
            drop = lambda rows: [{k: v for k, v in x.items() if k != "current"} for x in rows]  # noqa: E731
            assert drop(listed) == drop(cli) and name in {p["name"] for p in listed}

            r = c.patch(f"/1.0/projects/{name}", json={"limits.instances": "2",
                                                       "limits.memory": "1GiB"})
            assert r.status_code == 200, r.text
            assert r.json() == popek_json("project", "show", name)
            assert r.json()["limits.instances"] == "2" and r.json()["limits.memory"] == "1GiB"
            # one bad key: nothing set, the good one neither
            r = c.patch(f"/1.0/projects/{name}", json={"limits.cpu": "4", "limits.nope": "1"})
            refused(r, 400)
            assert r.json()["error"]["field"] == "limits.nope"
            assert popek_json("project", "show", name)["limits.cpu"] == "unlimited"
            r = c.patch(f"/1.0/projects/{name}", json={"limits.instances": None})
            assert r.json()["limits.instances"] == "unlimited", r.text

            refused(c.post("/1.0/projects", json={"name": "Bad Name!"}), 400)
            assert "Bad Name!" not in {p["name"] for p in popek_json("project", "list")}
            r = c.delete(f"/1.0/projects/{name}")
            assert r.status_code == 200 and r.json() == {"deleted": name}, r.text
            refused(c.get(f"/1.0/projects/{name}"), 404)
            refused(c.delete(f"/1.0/projects/{name}"), 404)
            refused(c.delete("/1.0/projects/default"), 400)
            records = audit(c, "project.create", name)
            assert [r["result"] for r in records][:2] == ["started", "ok"]
            assert records[-1]["result"].startswith("error: AlreadyExists")
            assert {r["identity"] for r in records} == {"root@host"}
        finally:
            popek("project", "delete", name, check=False)


def test_tokens_over_tls(server: Server, projects: None) -> None:
    with server.client() as c:
        admin_a = token(c, A, "admin", "rsp-admin-a")
        b_tok = token(c, B, "operator", "rsp-oper-b")
        # the secret is shown once: never in a listing or a record again
        listed = c.get("/1.0/tokens").json()
        assert listed == popek_json("token", "list")
        assert all("secret" not in t and "hash" not in t for t in listed)
        one = c.get(f"/1.0/tokens/{admin_a['id']}").json()
        assert one == {k: v for k, v in admin_a.items() if k != "secret"}
        assert c.get("/1.0/tokens", params={"project": B}).json() == \
            popek_json("token", "list", "--project", B)

    with server.tls(admin_a["secret"]) as t:  # a project admin: its own project's tokens
        made = token(t, A, "operator", "rsp-oper-a", console=True, expires=1)
        assert made["project"] == A and made["console"] and made["expires"]
        viewer = token(t, A, "viewer", "rsp-view-a")
        mine = t.get("/1.0/tokens").json()
        assert {x["project"] for x in mine} == {A}
        assert {admin_a["id"], made["id"], viewer["id"]} <= {x["id"] for x in mine}
        assert b_tok["id"] not in {x["id"] for x in mine}
        before = tokens_store()
        refused(t.post("/1.0/tokens", json={"project": B, "role": "admin"}))
        refused(t.get("/1.0/tokens", params={"project": B}))
        refused(t.get(f"/1.0/tokens/{b_tok['id']}"), 404)
        refused(t.post(f"/1.0/tokens/{b_tok['id']}/revoke"), 404)
        # projects are the host admin's to make, change and delete; others are not seen
        refused(t.post("/1.0/projects", json={"name": "rsp-c"}))
        refused(t.patch(f"/1.0/projects/{A}", json={"limits.instances": "100"}))
        refused(t.delete(f"/1.0/projects/{A}"))
        assert [p["name"] for p in t.get("/1.0/projects").json()] == [A]
        assert t.get(f"/1.0/projects/{A}").json()["name"] == A
        refused(t.get(f"/1.0/projects/{B}"))
        assert tokens_store() == before
        assert "rsp-c" not in {p["name"] for p in popek_json("project", "list")}
        assert popek_json("project", "show", A)["limits.instances"] == "unlimited"

    with server.tls(made["secret"]) as t:  # an operator may not make or revoke tokens
        assert {x["project"] for x in t.get("/1.0/tokens").json()} == {A}
        refused(t.post("/1.0/tokens", json={"role": "admin"}))
        refused(t.post(f"/1.0/tokens/{viewer['id']}/revoke"))
        refused(t.post(f"/1.0/tokens/{b_tok['id']}/revoke"))
    with server.tls(viewer["secret"]) as t:  # nor may a viewer
        refused(t.post("/1.0/tokens", json={"role": "viewer"}))
        refused(t.post("/1.0/projects", json={"name": "rsp-c"}))
    assert tokens_store() == before
    with server.client() as c:
        assert c.get(f"/1.0/tokens/{b_tok['id']}").json()["revoked"] is None
        assert c.get(f"/1.0/tokens/{viewer['id']}").json()["revoked"] is None

    with server.tls(admin_a["secret"]) as t:  # revoked: listed as such, refused at once
        r = t.post(f"/1.0/tokens/{made['id']}/revoke")
        assert r.status_code == 200 and r.json()["revoked"], r.text
        assert "secret" not in r.json()
    with server.tls(made["secret"]) as t:
        refused(t.get("/1.0/instances"), 401)
    revoked = {x["id"]: x["revoked"] for x in popek_json("token", "list")}
    assert revoked[made["id"]] and not revoked[viewer["id"]]

    # every change and refusal names who asked and its project
    with server.client() as c:
        who_a = f"token rsp-admin-a ({admin_a['id']})"
        created = audit(c, "token.create", "rsp-oper-a")
        assert created[-1]["result"] == "ok" and created[-1]["identity"] == who_a
        assert created[-1]["project"] == A
        denied = [r for r in audit(c, "token.create", "") if r["identity"] == who_a]
        assert denied and denied[-1]["result"].startswith("denied"), denied
        assert denied[-1]["project"] == B
        rev = audit(c, "token.revoke", b_tok["id"])
        assert {r["identity"] for r in rev if r["result"].startswith("denied")} == {
            f"token rsp-oper-a ({made['id']})"}
        assert all(r["result"] != "ok" for r in rev)
        assert audit(c, "token.revoke", made["id"])[-1]["identity"] == who_a
        for r in (*audit(c, "project.create", "rsp-c"), *audit(c, "project.delete", A)):
            assert r["result"].startswith("denied") and r["identity"].startswith("token "), r
        set_a = audit(c, "project.set", A)
        assert set_a and set_a[-1]["result"].startswith("denied")
        assert set_a[-1]["identity"] == who_a


def test_bad_token_requests_are_400_and_make_nothing(server: Server, projects: None) -> None:
    before = tokens_store()
    with server.client() as c:
        for body, field in (({"project": A, "role": "root"}, "role"),
                            ({"project": A, "role": "viewer", "expires": 0}, "expires"),
                            ({"project": A, "role": "viewer", "name": "Bad Name!"}, None),
                            ({"project": A, "role": "viewer", "secret": "x"}, "secret")):
            r = c.post("/1.0/tokens", json=body)
            refused(r, 400)
            if field:
                assert r.json()["error"]["field"] == field, r.text
        refused(c.post("/1.0/tokens", json={"project": "rsp-nowhere", "role": "viewer"}), 404)
        refused(c.post("/1.0/tokens/nope/revoke"), 404)
    assert tokens_store() == before


def test_sandbox_run_and_profiles(server: Server, projects: None) -> None:
    script = "echo out; echo err >&2; read line; echo got $line; exit 7"
    with server.client() as c:
        assert c.get("/1.0/sandboxes/profiles").json() == popek_json("sandbox", "profiles")
        r = c.post("/1.0/sandboxes/run", json={"command": ["sh", "-c", script],
                                               "stdin": "hello\n"})
        assert r.status_code == 200, r.text
        assert r.json() == {"exit_code": 7, "stdout": "out\ngot hello\n", "stderr": "err\n"}
        # the sandbox's view: uid 1000 in its own namespaces, no host home
        r = c.post("/1.0/sandboxes/run", json={"command": ["id", "-u"]})
        assert r.json()["stdout"] == "1000\n" and r.json()["exit_code"] == 0, r.text
        r = c.post("/1.0/sandboxes/run", json={"command": ["sleep", "30"], "timeout": 0.5})
        assert r.json()["exit_code"] == 124 and "--timeout" in r.json()["stderr"], r.text
        refused(c.post("/1.0/sandboxes/run", json={"command": ["true"], "profile": "rsp-none"}),
                404)
        refused(c.post("/1.0/sandboxes/run", json={"command": []}), 400)
        refused(c.post("/1.0/sandboxes/run", json={"command": ["true"], "ro": ["relative"]}),
                400)
        oper = token(c, A, "operator", "rsp-sbx-oper")
        viewer = token(c, A, "viewer", "rsp-sbx-view")

    with server.tls(oper["secret"]) as t:
        r = t.post("/1.0/sandboxes/run", json={"command": ["echo", "rsp-from-a-token"]})
        assert r.json() == {"exit_code": 0, "stdout": "rsp-from-a-token\n", "stderr": ""}, r.text
        assert t.get("/1.0/sandboxes/profiles").status_code == 200
        # host paths are the host admin's
        refused(t.post("/1.0/sandboxes/run", json={"command": ["cat", "/etc/hostname"],
                                                   "ro": ["/etc"]}))
    with server.tls(viewer["secret"]) as t:
        refused(t.post("/1.0/sandboxes/run", json={"command": ["echo", "rsp-by-viewer"]}))

    with server.client() as c:
        ok = audit(c, "sandbox.run", "echo rsp-from-a-token")
        assert [r["result"] for r in ok] == ["started", "ok"]
        assert ok[-1]["identity"] == f"token rsp-sbx-oper ({oper['id']})"
        assert ok[-1]["project"] == A
        no = audit(c, "sandbox.run", "echo rsp-by-viewer")
        assert len(no) == 1 and no[0]["result"].startswith("denied"), no
        assert no[0]["identity"] == f"token rsp-sbx-view ({viewer['id']})"
        ro = audit(c, "sandbox.run", "cat /etc/hostname")
        assert ro[-1]["result"].startswith("denied") and "host paths" in ro[-1]["result"]
        local = audit(c, "sandbox.run", "sh -c " + script)
        assert local[-1]["result"] == "ok" and local[-1]["identity"] == "root@host"
        for tok in (oper, viewer):
            c.post(f"/1.0/tokens/{tok['id']}/revoke")


def test_project_and_token_commands_on_a_remote(server: Server, projects: None) -> None:
    """``popek project list|show`` and ``popek token list|create|revoke`` on ``rsp:``, from a
    client home of its own, print what they print on the server's host for the same
    identity; after ``remote switch rsp`` they go there without the prefix."""
    import json
    import os

    with server.client() as c:
        admin_a = token(c, A, "admin", "rsp-remote-admin")
    base = Path(tempfile.mkdtemp(prefix="rsp-client-", dir="/var/tmp"))
    env = {**os.environ, "POPEK_HOME": str(base / "home"), "XDG_CONFIG_HOME": str(base / "cfg")}

    def client(*args: str, check: bool = True) -> Any:
        return popek(*args, check=check, env=env)

    try:
        client("remote", "add", "rsp", f"https://127.0.0.1:{server.port}",
               "--token", admin_a["secret"], "--accept-certificate")
        # a project admin of A sees project A only, with the fields of the host's records
        rows = json.loads(client("project", "list", "rsp:", "--format", "json").stdout)
        host = {p["name"]: p for p in popek_json("project", "list")}
        assert [r["name"] for r in rows] == [A]
        assert rows[0]["instances"] == host[A]["instances"]
        assert json.loads(client("project", "show", f"rsp:{A}", "--format", "json").stdout) \
            == popek_json("project", "show", A)
        shown = client("project", "show", f"rsp:{B}", check=False)
        assert shown.returncode == 4 and "denied" in shown.stderr, shown
        assert shown.stderr.count("\n") == 1, shown.stderr

        made = client("token", "create", "rsp:", "--project", A, "--role", "viewer",
                      "--name", "rsp-remote-view")
        lines = made.stdout.splitlines()
        assert lines[0].startswith("Token rsp-remote-view (") and f"in project {A}" in lines[0]
        secret = lines[-1].strip()
        token_id = lines[0].split("(", 1)[1].split(")", 1)[0]
        assert secret.startswith(f"pk1.{token_id}.")
        listed = json.loads(client("token", "list", "rsp:", "--format", "json").stdout)
        assert token_id in {t["id"] for t in listed} and {t["project"] for t in listed} == {A}
        assert listed == popek_json("token", "list", "--project", A)
        denied = client("token", "create", "rsp:", "--project", B, "--role", "admin",
                        check=False)
        assert denied.returncode == 4 and "denied" in denied.stderr, denied
        revoked = client("token", "revoke", f"rsp:{token_id}")
        assert revoked.stdout == f"Token rsp-remote-view ({token_id}) revoked.\n"
        assert {t["id"]: t for t in popek_json("token", "list")}[token_id]["revoked"]

        # the default remote: no prefix needed; local: is this (client's) host
        client("remote", "switch", "rsp")
        rows = json.loads(client("project", "list", "--format", "json").stdout)
        assert [r["name"] for r in rows] == [A]
        assert token_id in {t["id"] for t in json.loads(
            client("token", "list", "--format", "json").stdout)}
        gone = client("token", "revoke", "nosuch", check=False)
        assert gone.returncode == 8 and "not found" in gone.stderr, gone
        bad = client("project", "list", "rsp", check=False)
        assert bad.returncode == 2 and "popek project list: 'rsp' is not a remote" in bad.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)
        with server.client() as c:
            c.post(f"/1.0/tokens/{admin_a['id']}/revoke")
