"""TLS client certificates (issue 14.1/14.7): the trust list, the identity a certificate maps
to, refusals audited, and the TCP listener taking a self-signed certificate for real.

The trust list (:mod:`popek.core.certificates`) over a real SQLite store;
:func:`popek.core.authn.authenticate` over a core whose audit log is read back;
the listener of ``popek serve`` (:mod:`popek.api.tls`: the context accepting
any client certificate at the TLS layer, the protocols putting it in the
scope) is a real uvicorn on a free port of 127.0.0.1 with the API's
application, reached by httpx over TLS.  Nothing needs root.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from framework import free_port
from framework.certs import Cert, make_cert
from popek.core.auth import ADMIN, OPERATOR, VIEWER, Forbidden, Identity, TokenRejected, Tokens
from popek.core.authn import UNAUTHENTICATED, Unauthenticated, authenticate
from popek.core.certificates import (
    CertificateRejected,
    Certificates,
    ClientCertificate,
    fingerprint,
    parse,
)
from popek.core.projects import Projects
from popek.core.requests import CertificateAdd, CertificateRevoke
from popek.core.service import Core
from popek.errors import DENIED, AlreadyExists, InvalidInput, NotFound
from popek.state.schema import CERTIFICATES_PREFIX
from popek.state.store import SQLiteStore

TAG = "tcc"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


@pytest.fixture
def store(home: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(home / "state.db")
    yield s
    s.close()


def audit(home: Path) -> list[dict[str, Any]]:
    log = home / "audit" / "log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def trusted_earlier(store: SQLiteStore, cert: Cert, name: str, project: str = "default",
                    role: str = VIEWER) -> None:
    """Trust ``cert`` as ``add`` did while it was still valid (``add`` refuses an expired
    one): its record written straight into the store."""
    from popek.state.schema import certificate_key

    parsed = x509.load_der_x509_certificate(cert.der)
    rec = ClientCertificate(cert.fingerprint, name, project, role, False, name,
                            parsed.not_valid_before_utc.isoformat(),
                            parsed.not_valid_after_utc.isoformat(),
                            parsed.not_valid_before_utc.isoformat(), None, cert.pem.decode())
    store.put(certificate_key(cert.fingerprint), rec.to_json())


# -- the trust list ------------------------------------------------------------------------
def test_a_trusted_certificate_maps_to_its_project_role_and_grant(store: SQLiteStore,
                                                                   tmp_path: Path) -> None:
    c = make_cert(tmp_path, f"{TAG}-a")
    rec = Certificates(store).add(c.pem, "default", OPERATOR, console=True, name=f"{TAG}-ci")
    assert rec.fingerprint == c.fingerprint and rec.subject == f"{TAG}-a"
    assert rec.revoked is None and rec.pem.encode() == c.pem
    assert "pem" not in rec.public()
    who = Certificates(store).verify(c.der)
    assert who == Identity(f"certificate {TAG}-ci ({c.fingerprint[:12]})", "default",
                           OPERATOR, True)
    assert not who.host_admin
    # stored under its fingerprint; DER is as good as PEM
    assert [kv.key for kv in store.range(CERTIFICATES_PREFIX)] == [
        f"{CERTIFICATES_PREFIX}{c.fingerprint}"]
    other = make_cert(tmp_path, f"{TAG}-b")
    rec2 = Certificates(store).add(other.der, "default", VIEWER)
    assert rec2.name == f"cert-{other.fingerprint[:12]}" and not rec2.console
    assert sorted(r.name for r in Certificates(store).list()) == sorted([f"{TAG}-ci",
                                                                          rec2.name])


def test_unknown_revoked_expired_and_future_certificates_are_rejected(
        store: SQLiteStore, tmp_path: Path) -> None:
    certs = Certificates(store)
    unknown = make_cert(tmp_path, f"{TAG}-unknown")
    with pytest.raises(CertificateRejected, match="is not trusted") as err:
        certs.verify(unknown.der)
    assert err.value.exit_code == DENIED and unknown.fingerprint[:12] in str(err.value)

    revoked = make_cert(tmp_path, f"{TAG}-rev")
    certs.add(revoked.pem, "default", ADMIN, name=f"{TAG}-rev")
    assert certs.revoke(f"{TAG}-rev").revoked
    with pytest.raises(CertificateRejected, match=f"certificate {TAG}-rev .* was revoked on"):
        certs.verify(revoked.der)

    # trusted while it was valid, presented after its end: refused
    old = make_cert(tmp_path, f"{TAG}-old", start=timedelta(days=-10), end=timedelta(days=-1))
    trusted_earlier(store, old, f"{TAG}-old")
    with pytest.raises(CertificateRejected, match=f"{TAG}-old .* expired on"):
        certs.verify(old.der)

    future = make_cert(tmp_path, f"{TAG}-future", start=timedelta(days=1),
                       end=timedelta(days=30))
    certs.add(future.pem, "default", VIEWER, name=f"{TAG}-future")
    with pytest.raises(CertificateRejected, match="is not valid before"):
        certs.verify(future.der)


@pytest.mark.parametrize(("data", "why"), [
    (b"", "not an X.509 certificate"),
    (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
     "not an X.509 certificate"),
    (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "holds a private key"),
    (b"x" * 70000, "not a certificate"),
])
def test_what_is_not_a_certificate_is_refused(store: SQLiteStore, data: bytes,
                                               why: str) -> None:
    with pytest.raises(InvalidInput, match=why):
        Certificates(store).add(data, "default", VIEWER)
    assert Certificates(store).list() == []


def test_bad_additions_change_nothing(store: SQLiteStore, tmp_path: Path) -> None:
    certs = Certificates(store)
    c = make_cert(tmp_path, f"{TAG}-c")
    expired = make_cert(tmp_path, f"{TAG}-old", start=timedelta(days=-10),
                        end=timedelta(days=-1))
    for kw, exc, why in [({"role": "king"}, InvalidInput, "invalid role"),
                         ({"project": "Bad!"}, InvalidInput, "invalid project name"),
                         ({"name": "no spaces"}, InvalidInput, "invalid certificate name")]:
        args: dict[str, Any] = {"project": "default", "role": VIEWER, **kw}
        with pytest.raises(exc, match=why):
            certs.add(c.pem, args.pop("project"), args.pop("role"), **args)
    with pytest.raises(InvalidInput, match="expired on"):
        certs.add(expired.pem, "default", VIEWER)
    assert certs.list() == []
    certs.add(c.pem, "default", VIEWER, name=f"{TAG}-c")
    with pytest.raises(AlreadyExists, match="trusted already"):
        certs.add(c.pem, "default", ADMIN)
    with pytest.raises(AlreadyExists, match="named"):
        certs.add(make_cert(tmp_path, f"{TAG}-d").pem, "default", VIEWER, name=f"{TAG}-c")
    certs.revoke(c.fingerprint)
    with pytest.raises(AlreadyExists, match="stays revoked"):
        certs.add(c.pem, "default", VIEWER)
    assert [(r.name, r.role) for r in certs.list()] == [(f"{TAG}-c", VIEWER)]


def test_revoke_by_name_fingerprint_or_prefix_within_a_project(store: SQLiteStore,
                                                               tmp_path: Path) -> None:
    certs = Certificates(store)
    Projects(store).create(f"{TAG}-b")
    a = make_cert(tmp_path, f"{TAG}-a")
    b = make_cert(tmp_path, f"{TAG}-b")
    certs.add(a.pem, "default", ADMIN, name=f"{TAG}-a")
    certs.add(b.pem, f"{TAG}-b", ADMIN, name=f"{TAG}-b")
    with pytest.raises(NotFound) as err:  # a project admin of tcc-b never sees tcc-a
        certs.revoke(f"{TAG}-a", f"{TAG}-b")
    assert f"{TAG}-a" not in str(err.value).split("trusted certificates:")[1]
    with pytest.raises(NotFound):
        certs.revoke(a.fingerprint[:7])  # too short a prefix
    assert certs.revoke(a.fingerprint[:8].upper()).name == f"{TAG}-a"
    assert certs.revoke(b.fingerprint).revoked
    assert certs.get(f"{TAG}-a").revoked


# -- through the core: requests audited, roles enforced ------------------------------------
def test_requests_are_audited_and_a_viewer_certificate_cannot_trust_another(
        home: Path, store: SQLiteStore, tmp_path: Path) -> None:
    root = Core(store)
    c = make_cert(tmp_path, f"{TAG}-v")
    rec = root.handle(CertificateAdd(c.pem.decode(), "default", VIEWER, cert_name=f"{TAG}-v"))
    viewer = Core(store, identity=Certificates(store).verify(c.der))
    other = make_cert(tmp_path, f"{TAG}-o")
    with pytest.raises(Forbidden, match="a viewer may only read"):
        viewer.handle(CertificateAdd(other.pem.decode(), "default", ADMIN))
    with pytest.raises(Forbidden):
        viewer.handle(CertificateRevoke(f"{TAG}-v"))
    with pytest.raises(NotFound):
        root.handle(CertificateAdd(c.pem.decode(), "nope", VIEWER))
    root.handle(CertificateRevoke(rec.fingerprint))
    recs = [(r["op"], r["target"], r["identity"], r.get("project"), r["result"][:6])
            for r in audit(home) if r["result"] != "started"]
    label = f"certificate {TAG}-v ({c.fingerprint[:12]})"
    assert recs == [
        ("certificate.add", c.fingerprint, "root@host", "default", "ok"),
        ("certificate.add", other.fingerprint, label, "default", "denied"),
        ("certificate.revoke", f"{TAG}-v", label, "default", "denied"),
        ("certificate.add", c.fingerprint, "root@host", "nope", "error:"),
        ("certificate.revoke", c.fingerprint, "root@host", "default", "ok")]
    assert Certificates(store).get(f"{TAG}-v").revoked
    assert [r.name for r in Certificates(store).list()] == [f"{TAG}-v"]


# -- authentication: the policy and the audit of refusals ----------------------------------
def test_refused_credentials_are_audited_and_nothing_else_is(home: Path, store: SQLiteStore,
                                                            tmp_path: Path) -> None:
    core = Core(store)
    good = make_cert(tmp_path, f"{TAG}-good")
    revoked = make_cert(tmp_path, f"{TAG}-gone")
    unknown = make_cert(tmp_path, f"{TAG}-who")
    certs = Certificates(store)
    certs.add(good.pem, "default", OPERATOR, name=f"{TAG}-good")
    certs.add(revoked.pem, "default", VIEWER, name=f"{TAG}-gone")
    certs.revoke(f"{TAG}-gone")
    token, secret = Tokens(store).create("default", VIEWER, name=f"{TAG}-tok")
    _, dead = Tokens(store).create("default", VIEWER, name=f"{TAG}-dead")
    Tokens(store).revoke(dead.split(".")[1])

    assert authenticate(core, None, good.der).role == OPERATOR
    assert authenticate(core, secret, None).name == f"token {TAG}-tok ({token.id})"
    assert audit(home) == []  # accepted credentials write nothing

    where = ("GET /1.0/instances", "127.0.0.1:5555")
    for tok, der, exc in [(None, unknown.der, CertificateRejected),
                          (None, revoked.der, CertificateRejected),
                          (secret, good.der, Unauthenticated),
                          ("pk1.000000000000.forged", None, TokenRejected),
                          (f"{dead[:-3]}xyz", None, TokenRejected),
                          (dead, None, TokenRejected),
                          (None, None, Unauthenticated)]:
        with pytest.raises(exc) as err:
            authenticate(core, tok, der, *where)
        assert err.value.exit_code == DENIED and str(err.value)
    recs = [(r["op"], r["target"], r["identity"], r.get("project"), r["result"])
            for r in audit(home)]
    dead_id = dead.split(".")[1]
    assert [r[:4] for r in recs] == [
        ("auth.certificate", unknown.fingerprint, UNAUTHENTICATED, None),
        ("auth.certificate", revoked.fingerprint,
         f"certificate {TAG}-gone ({revoked.fingerprint[:12]})", "default"),
        ("auth.certificate", good.fingerprint,
         f"certificate {TAG}-good ({good.fingerprint[:12]})", "default"),
        ("auth.token", "000000000000", UNAUTHENTICATED, None),
        ("auth.token", dead_id, UNAUTHENTICATED, None),  # a wrong secret never names its token
        ("auth.token", dead_id, f"token {TAG}-dead ({dead_id})", "default")]
    assert all(r[4].startswith("denied: ") for r in recs)
    assert "not trusted" in recs[0][4] and "revoked" in recs[1][4]
    assert "both a client certificate and a bearer token" in recs[2][4]
    assert all(r["change"] == "GET /1.0/instances from 127.0.0.1:5555" for r in audit(home))
    log = (home / "audit" / "log.jsonl").read_text()
    assert secret not in log and dead not in log and dead.split(".")[2] not in log


# -- the TLS listener for real ------------------------------------------------------------
@dataclass
class Listener:
    port: int
    server_crt: Path

    def client(self, cert: Cert | None = None, token: str = "") -> httpx.Client:
        ctx = ssl.create_default_context(cafile=str(self.server_crt))
        ctx.check_hostname = False
        if cert is not None:
            ctx.load_cert_chain(str(cert.crt), str(cert.key))
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=f"https://127.0.0.1:{self.port}", verify=ctx,
                            headers=headers, timeout=30)


@pytest.fixture
def listener(home: Path) -> Iterator[Listener]:
    import uvicorn

    from popek.api.app import create_app
    from popek.api.server import WS
    from popek.api.tls import ensure_certificate, uvicorn_options

    crt, key = ensure_certificate()
    port = free_port()
    config = uvicorn.Config(create_app(local=False), host="127.0.0.1", port=port,
                            log_level="warning", lifespan="off",
                            **{"ws": WS, **uvicorn_options(crt, key, WS)})
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield Listener(port, crt)
    server.should_exit = True
    thread.join(30)


def test_the_listener_takes_a_self_signed_certificate_and_maps_it(
        listener: Listener, home: Path, tmp_path: Path) -> None:
    store = SQLiteStore(home / "state.db")
    try:
        viewer = make_cert(tmp_path, f"{TAG}-view")
        Certificates(store).add(viewer.pem, "default", VIEWER, name=f"{TAG}-view")
        _, secret = Tokens(store).create("default", VIEWER)
    finally:
        store.close()
    with listener.client(viewer) as c:
        r = c.get("/1.0/instances")
        assert r.status_code == 200, r.text
        # a viewer reads and may not change anything: refused by the role, audited
        r = c.post("/1.0/networks", json={"name": f"{TAG}-net"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "denied", r.text
        assert f"certificate {TAG}-view" in r.json()["error"]["message"]
    with listener.client(token=secret) as c:  # a token client sends no certificate
        assert c.get("/1.0/instances").status_code == 200
    unknown = make_cert(tmp_path, f"{TAG}-nobody")
    expired = make_cert(tmp_path, f"{TAG}-expired", start=timedelta(days=-10),
                        end=timedelta(days=-1))
    store = SQLiteStore(home / "state.db")
    try:
        trusted_earlier(store, expired, f"{TAG}-expired")
    finally:
        store.close()
    for cert, token, why in [(unknown, "", "is not trusted"), (expired, "", "expired on"),
                             (viewer, secret, "both a client certificate"),
                             (None, "", "authentication required")]:
        with listener.client(cert, token) as c:
            r = c.get("/1.0/instances")
            assert r.status_code == 401, r.text
            err = r.json()["error"]
            assert err["code"] == "unauthenticated" and why in err["message"], err
            assert set(err) == {"code", "message", "field"}
    recs = [r for r in audit(home) if r["op"] == "auth.certificate"]
    assert [r["target"] for r in recs] == [unknown.fingerprint, expired.fingerprint,
                                           viewer.fingerprint]
    assert all(r["change"].startswith("GET /1.0/instances from 127.0.0.1:") for r in recs)


def test_a_websocket_upgrade_keeps_the_connection_certificate(listener: Listener,
                                                              home: Path, tmp_path: Path) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    store = SQLiteStore(home / "state.db")
    try:
        viewer = make_cert(tmp_path, f"{TAG}-ws")
        Certificates(store).add(viewer.pem, "default", VIEWER, name=f"{TAG}-ws")
    finally:
        store.close()

    def ctx(cert: Cert) -> ssl.SSLContext:
        c = ssl.create_default_context(cafile=str(listener.server_crt))
        c.check_hostname = False
        c.load_cert_chain(str(cert.crt), str(cert.key))
        return c

    url = f"wss://127.0.0.1:{listener.port}/1.0/events?types=lifecycle"
    with connect(url, ssl=ctx(viewer), open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=30)) == {"type": "hello", "types": ["lifecycle"]}
    with pytest.raises(InvalidStatus) as refused:
        connect(url, ssl=ctx(make_cert(tmp_path, f"{TAG}-ws-no")), open_timeout=30)
    assert refused.value.response.status_code == 401
    assert [r["change"].split(" from ")[0] for r in audit(home)
            if r["op"] == "auth.certificate"] == ["WEBSOCKET /1.0/events"]


def test_parse_names_the_file(tmp_path: Path) -> None:
    c = make_cert(tmp_path, f"{TAG}-p")
    assert parse(c.pem)[1] == c.der == parse(c.der)[1]
    with pytest.raises(InvalidInput, match="^/x/client.crt is not"):
        parse(b"junk", "/x/client.crt")
    rec = Certificates(store := SQLiteStore(tmp_path / "s.db")).add(c.pem, "default", VIEWER)
    store.close()
    assert ClientCertificate.from_json(rec.to_json()) == rec


# -- the command line --------------------------------------------------------------------
def cli(home: Path, *args: str, **env: str) -> Any:
    import os
    import subprocess
    import sys

    full = {k: v for k, v in os.environ.items() if k != "POPEK_PROJECT"}
    full.update({"POPEK_HOME": str(home), "POPEK_CLI_SERVER": "off", **env})
    return subprocess.run([sys.executable, "-m", "popek", *args], env=full,
                          capture_output=True, text=True, timeout=60, check=False)


def test_certificate_add_list_revoke_on_the_command_line(tmp_path: Path) -> None:
    home = tmp_path / "clihome"
    c = make_cert(tmp_path, f"{TAG}-cli")
    r = cli(home, "certificate", "add", str(c.crt), "--project", "default", "--role",
            "operator", "--console", "--name", f"{TAG}-cli")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"Certificate {TAG}-cli trusted: operator in project default, console/exec, until "
        f"{x509.load_pem_x509_certificate(c.pem).not_valid_after_utc.isoformat()}.",
        f"SHA-256 fingerprint: {c.fingerprint}"]
    rows = json.loads(cli(home, "certificate", "list", "--format", "json").stdout)
    assert [(x["name"], x["fingerprint"], x["role"], x["console"], x["revoked"])
            for x in rows] == [(f"{TAG}-cli", c.fingerprint, OPERATOR, True, None)]
    assert "pem" not in rows[0]
    table = cli(home, "certificate", "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "FINGERPRINT", "PROJECT", "ROLE", "CONSOLE",
                                "EXPIRES", "REVOKED"]
    # bad input: one line, exit 2 or 8 or 9, nothing changed
    for args, code, why in [
            ((str(c.key), "--project", "default", "--role", "viewer"), 2, "private key"),
            ((str(tmp_path / "none.crt"), "--project", "default", "--role", "viewer"), 2,
             "cannot read the certificate"),
            ((str(c.crt), "--project", "default", "--role", "king"), 2, "invalid role"),
            ((str(c.crt), "--project", "nope", "--role", "viewer"), 8, "nope"),
            ((str(c.crt), "--project", "default", "--role", "viewer"), 9, "trusted already")]:
        r = cli(home, "certificate", "add", *args)
        assert (r.returncode, r.stderr.count("\n")) == (code, 1), (args, r.stderr)
        assert why in r.stderr and "Traceback" not in r.stderr
    assert len(json.loads(cli(home, "certificate", "list", "-f", "json").stdout)) == 1
    r = cli(home, "certificate", "revoke", "nobody")
    assert r.returncode == 8 and f"trusted certificates: {TAG}-cli" in r.stderr
    r = cli(home, "certificate", "revoke", c.fingerprint[:16])
    assert r.returncode == 0 and r.stdout == (f"Certificate {TAG}-cli "
                                              f"({c.fingerprint[:16]}) revoked.\n")
    (row,) = json.loads(cli(home, "certificate", "list", "--format", "json").stdout)
    assert row["revoked"]
    ops = [(x["op"], x["result"][:6]) for x in audit(home)
           if x["op"].startswith("certificate.") and x["result"] != "started"]
    # every attempt is audited, the refused ones too; list is a read
    assert ops == [("certificate.add", "ok"), *[("certificate.add", "error:")] * 5,
                   ("certificate.revoke", "error:"), ("certificate.revoke", "ok")]


def test_remote_add_chooses_how_to_authenticate(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from popek import errors
    from popek.cli import clientcert
    from popek.cli.remote import app

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    config = tmp_path / "cfg" / "popek" / "remotes.json"

    def run(*args: str) -> int:
        result = CliRunner().invoke(app, list(args))
        if isinstance(result.exception, errors.PopekError):
            return result.exception.exit_code
        return result.exit_code

    for args in (("--auth", "bogus"), ("--auth", "token"),
                 ("--auth", "certificate", "--token", "pk1.abc.def")):
        assert run("add", "lab", "https://127.0.0.1:1", *args) == errors.BAD_INPUT, args
    for args in (("--auth", "certificate"), ("--auth", "bogus"), ("--auth", "token")):
        assert run("add", "lab", "unix:///s.sock", *args) == errors.BAD_INPUT, args
    # a server that cannot be reached: nothing saved, no client certificate made yet
    assert run("add", "lab", "https://127.0.0.1:1", "--auth", "certificate") == errors.FAILURE
    assert not config.exists() and not clientcert.paths()[0].exists()
    assert run("add", "sock", "unix:///s.sock") == 0
    assert run("add", "tok", "unix:///s.sock", "--token", "pk1.abc.def") == 0
    stored = json.loads(config.read_text())["remotes"]
    assert (stored["sock"]["auth"], stored["tok"]["auth"]) == ("", "token")


def test_the_client_certificate_is_made_once_with_a_private_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from popek.cli import clientcert

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    crt, key, made = clientcert.ensure()
    assert made and crt == tmp_path / "cfg" / "popek" / "client.crt"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert oct(crt.parent.stat().st_mode & 0o777) == "0o700"
    cert, der = parse(crt.read_bytes())
    assert clientcert.fingerprint(crt) == fingerprint(der)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc > timedelta(days=3000)
    before = crt.read_bytes(), key.read_bytes()
    assert clientcert.ensure() == (crt, key, False)
    assert (crt.read_bytes(), key.read_bytes()) == before
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(str(crt), str(key))  # the key is the certificate's


def test_the_certificates_resource_of_the_api(home: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from popek.api.app import create_app

    c = make_cert(tmp_path, f"{TAG}-api")
    with TestClient(create_app(local=True), raise_server_exceptions=False) as api:
        body = {"certificate": c.pem.decode(), "role": "viewer", "name": f"{TAG}-api"}
        r = api.post("/1.0/certificates", json=body)
        assert r.status_code == 201, r.text
        assert r.json()["fingerprint"] == c.fingerprint and r.json()["project"] == "default"
        assert "pem" not in r.json()
        assert api.post("/1.0/certificates", json=body).status_code == 409
        for bad, status in [({**body, "certificate": "junk"}, 400),
                            ({**body, "role": "king"}, 400),
                            ({**body, "project": "nope", "name": None}, 404),
                            ({**body, "extra": 1}, 400)]:
            r = api.post("/1.0/certificates", json=bad)
            assert r.status_code == status, (bad, r.text)
            assert set(r.json()["error"]) == {"code", "message", "field"}
        (listed,) = api.get("/1.0/certificates").json()
        assert listed["name"] == f"{TAG}-api" and listed["revoked"] is None
        assert api.get(f"/1.0/certificates/{c.fingerprint[:10]}").json()["pem"] == \
            c.pem.decode()
        assert api.get("/1.0/certificates/nobody").status_code == 404
        assert api.post(f"/1.0/certificates/{TAG}-api/revoke").json()["revoked"]
        assert api.get("/1.0/certificates").json()[0]["revoked"]


def test_a_certificate_that_is_not_text_is_bad_input(home: Path, store: SQLiteStore) -> None:
    with pytest.raises(InvalidInput, match="not an X.509 certificate"):
        Core(store).handle(CertificateAdd("\ud800-----BEGIN CERTIFICATE-----", "default",
                                          VIEWER))
    assert Certificates(store).list() == []
