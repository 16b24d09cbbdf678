"""The CLI verbs the API gained after its first resources, each through a real ``popek serve``.

Profiles (create, edit, delete), trust keys (keygen, add, export, revoke,
remove), the unsigned-image exception, the policy (check, apply), an audit
checkpoint, network attach and detach, a console log, an attestation quote
and its verification, image sign and import (an upload run as an
operation), and the host admin's backup, boot and reset.  Each is checked
against what the CLI shows afterwards, and each change is refused to a token
whose role may not make it (403, audited as denied, nothing changed).
``tests/unit/test_api_parity.py`` checks that every CLI verb has its route.
Reset runs on a second server over a private home, so it takes nothing of
the suite's shared home.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_api import Server, run_operation, start_server, stop_server

from framework import popek, popek_json
from framework.events import read_line

CT = "hverb-ct"
NET = "hverb-net"
PROFILE = "hverb-prof"


@pytest.fixture(scope="module")
def server(popek_home: Path, minimal_image: str) -> Iterator[Server]:
    d = Path(tempfile.mkdtemp(prefix="hverb-"))
    srv = start_server(d / "api.sock")
    try:
        yield srv
    finally:
        stop_server(srv)
        popek("delete", "--force", CT, check=False)
        popek("network", "delete", NET, "--force", check=False)
        popek("profile", "delete", PROFILE, check=False)
        import shutil

        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def tokens(server: Server) -> Iterator[dict[str, str]]:
    """Secrets of a viewer, an operator and a project admin of the default project."""
    out = {}
    for role in ("viewer", "operator", "admin"):
        out[role] = popek("token", "create", "--project", "default", "--role", role,
                          "--name", f"hverb-{role}").stdout.splitlines()[-1].strip()
    yield out


def denied(server: Server, secret: str, method: str, url: str, **kw: Any) -> None:
    """``method url`` with token ``secret`` is a 403 with the error body."""
    with server.tls(secret) as t:
        r = t.request(method, url, **kw)
    assert r.status_code == 403 and r.json()["error"]["code"] == "denied", r.text


def last_audit(c: httpx.Client, op: str) -> dict[str, Any]:
    records = [r for r in c.get("/1.0/audit").json() if r["op"] == op]
    assert records, op
    return dict(records[-1])


def test_profiles(server: Server, tokens: dict[str, str]) -> None:
    c = server.client()
    body = {"name": PROFILE, "description": "d", "config": {"limits.memory": "128MiB"}}
    denied(server, tokens["operator"], "POST", "/1.0/profiles", json=body)
    assert last_audit(c, "profile.create")["result"].startswith("denied")
    r = c.post("/1.0/profiles", json=body)
    assert r.status_code == 201 and r.json()["config"] == {"limits.memory": "128MiB"}, r.text
    assert popek_json("profile", "show", PROFILE)["description"] == "d"
    assert c.post("/1.0/profiles", json=body).status_code == 409
    r = c.put(f"/1.0/profiles/{PROFILE}", json={"description": "e", "config": {}})
    assert r.status_code == 200 and r.json()["config"] == {}, r.text
    assert popek_json("profile", "show", PROFILE)["description"] == "e"
    with server.tls(tokens["admin"]) as t:  # a project admin manages its project's profiles
        assert t.delete(f"/1.0/profiles/{PROFILE}").status_code == 200
    assert PROFILE not in {p["name"] for p in popek_json("profile", "list")}
    assert c.delete(f"/1.0/profiles/{PROFILE}").status_code == 404


def test_trust_keys_policy_and_audit(server: Server, tokens: dict[str, str]) -> None:
    c = server.client()
    denied(server, tokens["admin"], "POST", "/1.0/trust/keys",
           json={"name": "hverb-k", "role": "image"})
    r = c.post("/1.0/trust/keys", json={"name": "hverb-k", "role": "image", "days": 30})
    assert r.status_code == 201, r.text
    made = r.json()
    pem = c.get("/1.0/trust/keys/hverb-k/pem")
    assert pem.status_code == 200 and "BEGIN PUBLIC KEY" in pem.text
    assert pem.text == popek("trust", "export", "hverb-k").stdout
    c.delete("/1.0/trust/keys/hverb-k").raise_for_status()
    r = c.post("/1.0/trust/keys", json={"name": "hverb-k2", "role": "image",
                                        "public_key": pem.text})
    assert r.status_code == 201 and r.json()["id"] == made["id"], r.text
    r = c.post("/1.0/trust/keys/hverb-k2/revoke", json={"reason": "test"})
    assert r.status_code == 200 and r.json()["revoked"], r.text
    keys = {k["name"]: k for k in popek_json("trust", "list")}
    assert keys["hverb-k2"]["revoked"] and "hverb-k" not in keys
    r = c.post("/1.0/trust/keys", json={"name": "hverb-bad", "role": "image",
                                        "public_key": "not a key"})
    assert r.status_code == 400 and "hverb-bad" not in {k["name"] for k in
                                                        popek_json("trust", "list")}, r.text

    denied(server, tokens["admin"], "PUT", "/1.0/trust/unsigned/default", json={"allow": True})
    c.put("/1.0/trust/unsigned/default", json={"allow": True}).raise_for_status()
    c.put("/1.0/trust/unsigned/default", json={"allow": False}).raise_for_status()
    assert last_audit(c, "trust.allow-unsigned")["result"] == "ok"

    version = c.get("/1.0/policy").json()["version"]  # applied in a home of its own, below
    denied(server, tokens["admin"], "PUT", "/1.0/policy", json={"text": "version = 99\n"})
    assert c.get("/1.0/policy").json()["version"] == version

    r = c.post("/1.0/audit/checkpoint")
    assert r.status_code == 200 and r.json()["checkpoint"]["seq"] > 0, r.text
    assert c.get("/1.0/audit/verify").json()["intact"]


def test_instance_ports_log_and_attestation(server: Server, tokens: dict[str, str],
                                            minimal_image: str) -> None:
    c = server.client()
    run_operation(c, "POST", "/1.0/instances",
                  json={"image": minimal_image, "name": CT, "engine": "container"})
    c.post("/1.0/networks", json={"name": NET}).raise_for_status()
    denied(server, tokens["viewer"], "POST", f"/1.0/instances/{CT}/networks",
           json={"network": NET})
    r = c.post(f"/1.0/instances/{CT}/networks", json={"network": NET})
    assert r.status_code == 201, r.text
    port = r.json()
    assert port["network"] == NET and port["ipv4"]
    info = popek_json("info", CT)
    assert NET in json.dumps(info) and port["ipv4"] in json.dumps(info)
    r = c.post(f"/1.0/instances/{CT}/networks", json={"network": "hverb-none"})
    assert r.status_code == 404, r.text
    c.delete(f"/1.0/instances/{CT}/networks/{NET}").raise_for_status()
    assert port["ipv4"] not in json.dumps(popek_json("info", CT))

    r = c.get(f"/1.0/instances/{CT}/console/log")
    assert r.status_code == 200
    cli = subprocess.run([sys.executable, "-m", "popek", "console", CT, "--log"],
                         capture_output=True, check=True).stdout
    assert r.content[:64] == cli[:64]
    denied(server, tokens["operator"], "GET", f"/1.0/instances/{CT}/console/log")

    nonce = os.urandom(16).hex()
    with server.tls(tokens["viewer"]) as t:  # a quote is a read
        r = t.post(f"/1.0/instances/{CT}/attest", json={"nonce": nonce})
    assert r.status_code == 200, r.text
    quote = r.json()
    r = c.post("/1.0/attest/verify", json={"quote": quote, "nonce": nonce, "expect": quote})
    assert r.status_code == 200 and r.json()["instance"].endswith(CT), r.text
    r = c.post("/1.0/attest/verify", json={"quote": quote, "nonce": "00" * 16, "expect": quote})
    assert r.status_code == 409 and r.json()["error"]["code"] == "tampered", r.text


def _rootfs_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("etc/hverb", b"hverb\n"),):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        sh = tarfile.TarInfo("bin/sh")
        sh.type, sh.linkname = tarfile.SYMTYPE, "busybox"
        tar.addfile(sh)
    return buf.getvalue()


def test_image_import_and_sign(server: Server, tokens: dict[str, str]) -> None:
    c = server.client()
    denied(server, tokens["admin"], "POST", "/1.0/images/import", params={"name": "hverb-img"},
           content=_rootfs_tar())
    r = c.post("/1.0/images/import", params={"name": "hverb-img"}, content=b"")
    assert r.status_code == 400, r.text
    try:
        op = run_operation(c, "POST", "/1.0/images/import", params={"name": "hverb-img"},
                           content=_rootfs_tar())
        assert op["status"] == "success", op
        assert op["result"]["name"] == "hverb-img"
        assert popek_json("image", "info", "hverb-img")["name"] == "hverb-img"
        assert not list(Path(tempfile.gettempdir()).glob("popek-import-*"))  # the upload went
        r = c.post("/1.0/images/hverb-img/sign", json={"days": 10})
        assert r.status_code == 200 and r.json()["signed"], r.text
        assert c.post("/1.0/images/hverb-none/sign", json={}).status_code == 404
    finally:
        popek("image", "delete", "hverb-img", check=False)


def test_admin_backup_and_boot(server: Server, tokens: dict[str, str], tmp_path: Path) -> None:
    c = server.client()
    denied(server, tokens["admin"], "POST", "/1.0/admin/backup")
    r = c.post("/1.0/admin/backup")
    assert r.status_code == 200 and int(r.headers["x-popek-revision"]) > 0
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:  # what popek admin backup writes
        names = tar.getnames()
        manifest = json.load(tar.extractfile("popek-backup.json"))  # type: ignore[arg-type]
    assert "state.db" in names and any(n.startswith("trust/private/") for n in names), names
    assert manifest["revision"] == int(r.headers["x-popek-revision"])
    denied(server, tokens["admin"], "POST", "/1.0/admin/boot")
    r = c.post("/1.0/admin/boot")
    assert r.status_code == 200 and r.json()["failed"] == [], r.text
    assert last_audit(c, "host.boot")["result"] == "ok"


def test_admin_reset_in_a_home_of_its_own(tmp_path: Path) -> None:
    """Reset through the API takes the home's network off the host and keeps its record."""
    home = Path(tempfile.mkdtemp(prefix="hverb-home-", dir="/var/tmp"))
    env = {**os.environ, "POPEK_HOME": str(home)}
    sock = tmp_path / "api.sock"
    log = (tmp_path / "serve.log").open("a")
    proc = subprocess.Popen([sys.executable, "-m", "popek", "serve", "--socket", str(sock)],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    log.close()
    try:
        assert proc.stdout is not None
        read_line(proc.stdout, 60, "popek serve to listen")
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://p",
                          timeout=120) as c:
            net = c.post("/1.0/networks", json={"name": "hverb-rst"})
            assert net.status_code == 201, net.text
            bridge = net.json()["bridge"]
            assert Path(f"/sys/class/net/{bridge}").exists()
            r = c.post("/1.0/admin/reset")
            assert r.status_code == 200 and r.json()["failed"] == [], r.text
            assert any(bridge in line or "hverb-rst" in line for line in r.json()["done"])
            assert not Path(f"/sys/class/net/{bridge}").exists()
            assert "hverb-rst" in {n["name"] for n in c.get("/1.0/networks").json()}
            _policy(c)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        popek("admin", "reset", "--purge", "--yes", env=env, check=False)


def test_instance_verbs_on_a_remote(server: Server, tmp_path: Path) -> None:
    """``network attach|detach``, ``console --log`` and ``attest`` take REMOTE:NAME too."""
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "cfg"), "POPEK_CLI_SERVER": "off",
           "POPEK_HOME": str(tmp_path / "home")}  # the client's own home is empty
    secret = popek("token", "create", "--project", "default", "--role", "operator",
                   "--console", "--name", "hverb-remote").stdout.splitlines()[-1].strip()
    popek("remote", "add", "hv", f"https://127.0.0.1:{server.port}", "--token", secret,
          "--accept-certificate", env=env)
    out = popek("network", "attach", NET, f"hv:{CT}", env=env).stdout
    assert out.startswith(f"Instance hv:{CT} attached to {NET}: "), out
    address = out.split(": ", 1)[1].split(" ")[0]
    assert address in json.dumps(popek_json("info", CT))  # on the server's host
    popek("network", "detach", NET, f"hv:{CT}", env=env)
    assert address not in json.dumps(popek_json("info", CT))
    log = subprocess.run([sys.executable, "-m", "popek", "console", f"hv:{CT}", "--log"],
                         env=env, capture_output=True, check=True).stdout
    local = subprocess.run([sys.executable, "-m", "popek", "console", CT, "--log"],
                           capture_output=True, check=True).stdout
    assert log[:64] == local[:64]
    nonce = os.urandom(16).hex()
    quote = json.loads(popek("attest", f"hv:{CT}", "--nonce", nonce, env=env).stdout)
    assert quote["quote"]["nonce"] == nonce, quote
    bad = popek("network", "attach", "hverb-none", f"hv:{CT}", env=env, check=False)
    assert bad.returncode == 8 and "Traceback" not in bad.stderr, bad.stderr


def _policy(c: httpx.Client) -> None:
    """Policy check and apply (in a home of its own: versions only go up, and the suite's
    shared home applies its own version 1 later)."""
    current = c.get("/1.0/policy").json()
    import re

    # the policy in force, one version up, with one more label (its share rules kept)
    text = re.sub(r"(?m)^version\s*=\s*\d+", f"version = {current['version'] + 1}",
                  current["text"])
    text = re.sub(r"(?m)^labels\s*=\s*\[", 'labels = ["hverb", ', text)
    r = c.post("/1.0/policy/check", json={"text": text})
    assert r.status_code == 200 and "hverb" in r.json()["labels"], r.text
    assert c.post("/1.0/policy/check", json={"text": "version = ["}).status_code == 400
    assert c.get("/1.0/policy").json()["version"] == current["version"]
    r = c.put("/1.0/policy", json={"text": text})
    assert r.status_code == 200 and r.json()["version"] == current["version"] + 1, r.text
    assert c.get("/1.0/policy").json()["version"] == current["version"] + 1
    r = c.put("/1.0/policy", json={"text": text})  # the same version again: refused
    assert r.status_code in (400, 409), r.text

