"""TLS client certificates on ``popek serve`` for real (issue 14.1/14.3/14.7).

One ``popek serve`` per module, on a socket of its own and TCP with TLS on a
free port, over the session's POPEK_HOME.  Certificates are made with the
``cryptography`` package and trusted with ``popek certificate add``:

- a viewer's certificate reads and may not change anything (403, audited);
  an operator's certificate of another project sees nothing of ``default``;
- an unknown, an expired, a not-yet-valid and a revoked certificate are
  refused with 401 and the API's error body, nothing changes, and each
  attempt is in the audit log naming the certificate;
- the CLI of another home adds the server as a remote without a token: it
  makes its client certificate, is refused until the host admin trusts it,
  then lists, shows and execs as it does on the server's host, until the
  certificate is revoked.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from framework import free_port, popek, popek_json
from framework.certs import Cert, make_cert
from framework.events import read_line

CT = "tcc-ct"
PROJECT = "tcc-a"
NET = "tcc-net"
#: the fields of ``popek info`` that change from one read to the next
LIVE = {"usage", "cpu_seconds", "history"}


@dataclass
class Server:
    """A running ``popek serve`` and clients of its two listeners."""

    proc: subprocess.Popen[str]
    sock: Path
    port: int
    fingerprint: str

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def local(self) -> httpx.Client:
        """A client of the local socket (root: the host admin)."""
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.sock)),
                            base_url="http://popek", timeout=120)

    def tls(self, cert: Cert | None) -> httpx.Client:
        """A client of the TCP listener presenting ``cert``, the server's certificate pinned."""
        server_crt = Path(os.environ["POPEK_HOME"]) / "api" / "server.crt"
        ctx = ssl.create_default_context(cafile=str(server_crt))
        ctx.check_hostname = False
        if cert is not None:
            ctx.load_cert_chain(str(cert.crt), str(cert.key))
        return httpx.Client(base_url=self.url, verify=ctx, timeout=60)


@pytest.fixture(scope="module")
def certs() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="tcc-certs-"))
    yield d
    import shutil

    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def server(popek_home: Path, minimal_image: str, certs: Path) -> Iterator[Server]:
    """``popek serve`` with TLS on a free port, and a running container ``tcc-ct``."""
    popek("command-server", "stop", check=False)  # a warm one may predate the sources
    port = free_port()
    sock = certs / "api.sock"
    log = (certs / "serve.log").open("a")
    proc = subprocess.Popen([sys.executable, "-m", "popek", "serve", "--socket", str(sock),
                             "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    log.close()
    assert proc.stdout is not None
    try:
        first = read_line(proc.stdout, 60, "popek serve to listen on its socket")
        assert first.strip() == f"popek: API listening on unix:{sock}", first
        second = read_line(proc.stdout, 60, "popek serve to listen on TCP")
        assert f"https://127.0.0.1:{port}" in second, second
        popek("launch", minimal_image, CT, "--container", "--memory", "96MiB")
        popek("project", "create", PROJECT)
        yield Server(proc, sock, port, second.rsplit(" ", 1)[1].rstrip(")\n"))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        proc.stdout.close()
        popek("delete", "--force", CT, check=False)
        popek("network", "delete", "--force", NET, check=False)
        popek("project", "delete", PROJECT, check=False)


def trust(cert: Cert, project: str, role: str, name: str, *more: str) -> None:
    out = popek("certificate", "add", str(cert.crt), "--project", project, "--role", role,
                "--name", name, *more).stdout
    assert f"SHA-256 fingerprint: {cert.fingerprint}" in out, out


def audit_of(server: Server, op: str) -> list[dict[str, Any]]:
    records = server.local().get("/1.0/audit").json()
    return [r for r in records if r["op"] == op]


def test_a_trusted_certificate_acts_with_its_role_and_project(server: Server,
                                                              certs: Path) -> None:
    viewer = make_cert(certs, "tcc-view")
    oper = make_cert(certs, "tcc-oper")
    trust(viewer, "default", "viewer", "tcc-view")
    trust(oper, PROJECT, "operator", "tcc-oper")
    before = len(server.local().get("/1.0/operations").json())
    with server.tls(viewer) as t:  # a viewer reads, and may not change anything
        listed = t.get("/1.0/instances")
        assert listed.status_code == 200, listed.text
        assert CT in {i["name"] for i in listed.json()}
        assert t.get(f"/1.0/instances/{CT}").json()["state"] == "running"
        r = t.put(f"/1.0/instances/{CT}/state", json={"action": "stop"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "denied", r.text
        assert "certificate tcc-view" in r.json()["error"]["message"]
        r = t.post("/1.0/certificates", json={"certificate": oper.crt.read_text(),
                                              "role": "admin"})
        assert r.status_code == 403, r.text
    assert popek_json("info", CT)["state"] == "running"
    assert len(server.local().get("/1.0/operations").json()) == before
    denied = [r for r in server.local().get("/1.0/audit", params={"target": CT}).json()
              if r["op"] == "instance.stop"]
    assert denied[-1]["result"].startswith("denied")
    assert denied[-1]["identity"] == f"certificate tcc-view ({viewer.fingerprint[:12]})"
    assert denied[-1]["project"] == "default"
    with server.tls(oper) as t:  # an operator of tcc-a sees nothing of default
        assert t.get("/1.0/instances").json() == []
        assert t.get(f"/1.0/instances/{CT}").status_code == 404
        r = t.get("/1.0/instances", params={"project": "default"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "denied", r.text
        assert all(r.get("project") == PROJECT for r in t.get("/1.0/audit").json())
        assert t.get("/1.0/certificates").json() == [
            c for c in server.local().get("/1.0/certificates").json()
            if c["project"] == PROJECT]
        r = t.post("/1.0/networks", json={"name": NET})
        assert r.status_code == 403, r.text
    assert server.local().get(f"/1.0/networks/{NET}").status_code == 404


def test_unknown_expired_future_and_revoked_certificates_are_refused_and_audited(
        server: Server, certs: Path) -> None:
    unknown = make_cert(certs, "tcc-unknown")
    brief = make_cert(certs, "tcc-brief", end=timedelta(seconds=3))
    future = make_cert(certs, "tcc-future", start=timedelta(days=1))
    revoked = make_cert(certs, "tcc-revoked")
    trust(brief, "default", "admin", "tcc-brief")
    trust(future, "default", "admin", "tcc-future")
    trust(revoked, "default", "admin", "tcc-revoked")
    with server.tls(revoked) as t:  # trusted: it works until revoked
        assert t.get("/1.0/instances").status_code == 200
    assert popek("certificate", "revoke", "tcc-revoked").stdout == (
        f"Certificate tcc-revoked ({revoked.fingerprint[:16]}) revoked.\n")
    ends = x509.load_pem_x509_certificate(brief.crt.read_bytes()).not_valid_after_utc
    while datetime.now(UTC) <= ends:  # the certificate's own end: wall-clock time must pass
        time.sleep(0.2)
    seen = len(audit_of(server, "auth.certificate"))
    cases = [(unknown, "is not trusted", "unauthenticated", None),
             (brief, "expired on", f"certificate tcc-brief ({brief.fingerprint[:12]})",
              "default"),
             (future, "is not valid before",
              f"certificate tcc-future ({future.fingerprint[:12]})", "default"),
             (revoked, "was revoked on",
              f"certificate tcc-revoked ({revoked.fingerprint[:12]})", "default")]
    for cert, why, _, _ in cases:
        with server.tls(cert) as t:
            r = t.post("/1.0/networks", json={"name": NET})
            assert r.status_code == 401, r.text
            err = r.json()["error"]
            assert err["code"] == "unauthenticated" and why in err["message"], err
            assert set(err) == {"code", "message", "field"}
            r = t.put(f"/1.0/instances/{CT}/state", json={"action": "stop"})
            assert r.status_code == 401, r.text
    assert server.local().get(f"/1.0/networks/{NET}").status_code == 404
    assert popek_json("info", CT)["state"] == "running"
    records = audit_of(server, "auth.certificate")[seen:]
    expected = [(c.fingerprint, who, project, "POST /1.0/networks")
                for c, _, who, project in cases]
    got = [(r["target"], r["identity"], r.get("project"), r["change"].split(" from ")[0])
           for r in records[::2]]
    assert got == expected, records
    assert all(r["result"].startswith("denied: ") for r in records) and len(records) == 8
    assert popek("audit", "verify").returncode == 0


@dataclass
class Client:
    """A popek client with a home and a config directory of its own."""

    env: dict[str, str]
    config: Path

    def popek(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return popek(*args, check=check, env=self.env)


@pytest.fixture()
def client() -> Iterator[Client]:
    base = Path(tempfile.mkdtemp(prefix="tcc-client-", dir="/var/tmp"))
    env = {**os.environ, "POPEK_HOME": str(base / "home"), "XDG_CONFIG_HOME": str(base / "cfg")}
    yield Client(env, base / "cfg" / "popek")
    import shutil

    shutil.rmtree(base, ignore_errors=True)


def _same(remote: subprocess.CompletedProcess[str],
          local: subprocess.CompletedProcess[str]) -> None:
    assert (remote.returncode, remote.stdout, remote.stderr) == (
        local.returncode, local.stdout, local.stderr), (remote, local)


def test_the_cli_over_a_remote_with_a_client_certificate(server: Server,
                                                         client: Client) -> None:
    add = client.popek("remote", "add", "tcc", server.url, "--accept-certificate")
    assert server.fingerprint in add.stderr and add.stdout == f"Remote tcc added ({server.url}).\n"
    crt, key = client.config / "client.crt", client.config / "client.key"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    mine = x509.load_pem_x509_certificate(crt.read_bytes()).fingerprint(hashes.SHA256()).hex()
    assert f"client certificate {crt} (SHA-256 {mine})" in add.stderr
    (rem,) = (r for r in json.loads(client.popek("remote", "list", "-f", "json").stdout)
              if r["name"] == "tcc")
    assert (rem["auth"], rem["token"], rem["fingerprint"]) == ("certificate", "no",
                                                              server.fingerprint)
    # not trusted yet: refused with the denied exit code, one line, audited
    got = client.popek("list", "tcc:", check=False)
    assert got.returncode == 4 and got.stderr.count("\n") == 1, got
    assert "refused the client certificate" in got.stderr and "not trusted" in got.stderr
    assert audit_of(server, "auth.certificate")[-1]["target"] == mine

    popek("certificate", "add", str(crt), "--project", "default", "--role", "operator",
          "--console", "--name", "tcc-client")
    _same(client.popek("list", "tcc:"), popek("list"))
    assert client.popek("list", "tcc:", "-f", "json").stdout == popek("list", "-f", "json").stdout
    here = {k: v for k, v in popek_json("info", CT).items() if k not in LIVE}
    there = json.loads(client.popek("info", f"tcc:{CT}", "-f", "json").stdout)
    assert {k: v for k, v in there.items() if k not in LIVE} == here
    cmd = ("--", "sh", "-c", "echo out; echo err >&2; exit 3")
    got = client.popek("exec", f"tcc:{CT}", *cmd, check=False)
    assert (got.returncode, got.stdout, got.stderr) == (3, "out\n", "err\n")
    _same(got, popek("exec", CT, *cmd, check=False))
    _same(client.popek("config", "show", f"tcc:{CT}"), popek("config", "show", CT))
    _same(client.popek("info", "tcc:tcc-none", check=False), popek("info", "tcc-none",
                                                                  check=False))
    execs = [r for r in server.local().get("/1.0/audit", params={"target": CT}).json()
             if r["op"] == "session.exec" and r["result"] == "ok"]
    assert [r["identity"] for r in execs][-2:] == [f"certificate tcc-client ({mine[:12]})",
                                                   "root@host"]  # the remote's, then ours

    popek("certificate", "revoke", mine[:12])
    got = client.popek("list", "tcc:", check=False)
    assert got.returncode == 4 and "was revoked on" in got.stderr, got
    assert "Traceback" not in got.stderr
