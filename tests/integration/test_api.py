"""``popek serve`` for real (issue 14.1/14.2): the REST API on a private socket.

One server per module, on a socket of its own and TCP with TLS on a free
port, over the session's POPEK_HOME.  A container goes through its whole
life through the API (launch as an operation, waited on; exec; stop; start;
delete) and the records are those of the CLI's ``--format json``.  Bad
input is a 400 with the error body and changes nothing; an unknown instance
is a 404; TCP without a token is a 401.  An operation outlives a server
killed with SIGKILL, and ``popek monitor`` sees a launch.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from framework import popek, popek_json
from framework.events import read_line

CT = "hapi-ct"
LOST = "hapi-lost"
MON = "hapi-mon"
#: the fields of ``popek info`` that change from one read to the next (live counters)
LIVE = {"usage", "cpu_seconds", "history"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A running ``popek serve`` and clients of its two listeners."""

    proc: subprocess.Popen[str]
    sock: Path
    port: int
    fingerprint: str

    def client(self) -> httpx.Client:
        """A client of the local socket (root: the host admin)."""
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.sock)),
                            base_url="http://popek", timeout=300)

    def tls(self, token: str = "") -> httpx.Client:
        """A client of the TCP listener, trusting the server's certificate only (pinned)."""
        cert = Path(os.environ["POPEK_HOME"]) / "api" / "server.crt"
        ctx = ssl.create_default_context(cafile=str(cert))
        ctx.check_hostname = False
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=f"https://127.0.0.1:{self.port}", verify=ctx,
                            headers=headers, timeout=60)


def start_server(sock: Path) -> Server:
    """Start ``popek serve`` and return once both listeners are up."""
    port = _free_port()
    log = sock.with_suffix(".log").open("a")  # its log: a pipe nobody reads would fill up
    proc = subprocess.Popen([sys.executable, "-m", "popek", "serve", "--socket", str(sock),
                             "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    log.close()
    assert proc.stdout is not None
    first = read_line(proc.stdout, 60, "popek serve to listen on its socket")
    assert first.strip() == f"popek: API listening on unix:{sock}", first
    second = read_line(proc.stdout, 60, "popek serve to listen on TCP")
    assert f"https://127.0.0.1:{port}" in second, second
    fingerprint = second.rsplit(" ", 1)[1].rstrip(")\n")
    return Server(proc, sock, port, fingerprint)


def stop_server(server: Server, sig: int = signal.SIGTERM) -> None:
    """Stop it (SIGTERM: gracefully) and wait for its end."""
    if server.proc.poll() is None:
        server.proc.send_signal(sig)
    server.proc.wait(timeout=60)
    for stream in (server.proc.stdout, server.proc.stderr):
        if stream is not None:
            stream.close()


@pytest.fixture(scope="module")
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="hapi-"))
    yield d
    import shutil

    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def server(popek_home: Path, minimal_image: str, sockdir: Path) -> Iterator[Server]:
    srv = start_server(sockdir / "api.sock")
    try:
        yield srv
    finally:
        stop_server(srv)
        for name in (CT, LOST, MON):
            popek("delete", "--force", name, check=False)


def run_operation(client: httpx.Client, method: str, url: str, **kw: Any) -> dict[str, Any]:
    """Send a request answered by an operation, wait for it; return the finished operation."""
    r = client.request(method, url, **kw)
    assert r.status_code == 202, r.text
    op = r.json()
    assert op["status"] == "running" and r.headers["location"] == f"/1.0/operations/{op['id']}"
    done = client.get(f"/1.0/operations/{op['id']}/wait", params={"timeout": 240}).json()
    assert done["status"] in ("success", "failure"), done
    return dict(done)


def test_container_life_through_the_api(server: Server, minimal_image: str) -> None:
    c = server.client()
    op = run_operation(c, "POST", "/1.0/instances",
                       json={"image": minimal_image, "name": CT, "engine": "container",
                             "memory": "96MiB"})
    assert op["status"] == "success", op
    assert op["result"]["name"] == CT and op["result"]["state"] == "running"
    assert op["op"] == "instance.launch" and op["target"] == CT

    # the same records as the CLI's --format json
    listed = {i["name"]: i for i in c.get("/1.0/instances").json()}
    cli = {i["name"]: i for i in popek_json("list")}
    assert listed[CT] == cli[CT]
    info = c.get(f"/1.0/instances/{CT}").json()
    cli_info = popek_json("info", CT)
    assert set(info) == set(cli_info)
    assert {k: v for k, v in info.items() if k not in LIVE} == \
        {k: v for k, v in cli_info.items() if k not in LIVE}
    assert c.get(f"/1.0/instances/{CT}/config").json() == popek_json("config", "show", CT)
    r = c.patch(f"/1.0/instances/{CT}/config", json={"limits.pids": "77"})
    assert r.status_code == 200 and r.json()["limits.pids"] == "77", r.text
    assert popek_json("config", "show", CT)["limits.pids"] == "77"
    r = c.patch(f"/1.0/instances/{CT}/config", json={"limits.pids": "many"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_input", r.text
    assert popek_json("config", "show", CT)["limits.pids"] == "77"

    for action, state in (("pause", "paused"), ("resume", "running")):
        r = c.put(f"/1.0/instances/{CT}/state", json={"action": action})
        assert r.status_code == 200 and r.json()["state"] == state, r.text

    r = c.post(f"/1.0/instances/{CT}/exec", json={"command": ["sh", "-c", "cat; echo err >&2; "
                                                              "exit 3"], "stdin": "hello"})
    assert r.status_code == 200, r.text
    assert r.json() == {"exit_code": 3, "stdout": "hello", "stderr": "err\n"}

    op = run_operation(c, "PUT", f"/1.0/instances/{CT}/state",
                       json={"action": "stop", "timeout": 10})
    assert op["status"] == "success" and op["result"]["state"] == "stopped", op
    assert popek_json("info", CT)["state"] == "stopped"
    op = run_operation(c, "PUT", f"/1.0/instances/{CT}/state", json={"action": "start"})
    assert op["status"] == "success" and op["result"]["state"] == "running", op

    # the audit records are the CLI's: the core wrote them
    ops = [(r["op"], r["result"]) for r in c.get("/1.0/audit", params={"target": CT}).json()]
    assert ("instance.launch", "ok") in ops and ("instance.stop", "ok") in ops
    assert ("session.exec", "ok") in ops

    # a running instance is refused without force: 409, wrong_state; then deleted
    op = run_operation(c, "DELETE", f"/1.0/instances/{CT}")
    assert op["status"] == "failure" and op["error"]["code"] == "wrong_state", op
    op = run_operation(c, "DELETE", f"/1.0/instances/{CT}", params={"force": "true"})
    assert op["status"] == "success", op
    assert CT not in {i["name"] for i in popek_json("list")}
    assert any(o["id"] == op["id"] for o in c.get("/1.0/operations").json())


def _snapshot(c: httpx.Client) -> tuple[Any, ...]:
    return (c.get("/1.0/instances").json(), len(c.get("/1.0/operations").json()),
            len(c.get("/1.0/audit").json()))


@pytest.mark.parametrize(("body", "field"), [
    ({"image": "minimal", "name": "Bad_Name", "engine": "container"}, "name"),
    ({"image": "minimal", "name": "hapi-bad", "engine": "container", "memory": "lots"},
     "memory"),
    ({"image": "minimal", "name": "hapi-bad", "engine": "floppy"}, "engine"),
    ({"image": "minimal", "name": "hapi-bad", "surprise": 1}, "surprise"),
    ({"image": "minimal", "name": "hapi-bad", "config": {"limits.colour": "red"}}, "config"),
    ({"name": "hapi-bad"}, "image"),
])
def test_bad_input_is_400_and_changes_nothing(server: Server, body: dict[str, Any],
                                              field: str) -> None:
    c = server.client()
    before = _snapshot(c)
    r = c.post("/1.0/instances", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "bad_input" and err["field"] == field and err["message"], err
    assert "Traceback" not in r.text
    assert _snapshot(c) == before


def test_image_build_is_an_operation(server: Server, minimal_image: str) -> None:
    c = server.client()
    assert [i["name"] for i in c.get("/1.0/images").json()] == \
        [i["name"] for i in popek_json("image", "list")]
    assert c.get(f"/1.0/images/{minimal_image}").json() == \
        popek_json("image", "info", minimal_image)
    r = c.post("/1.0/images", json={"name": "windows"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "name", r.text
    op = run_operation(c, "POST", "/1.0/images", json={"name": minimal_image})
    assert op["status"] == "failure" and op["error"]["code"] == "exists", op  # no --force


def test_network_and_host_records_as_the_cli(server: Server) -> None:
    c = server.client()
    r = c.post("/1.0/networks", json={"name": "hapi-net", "port_isolation": True})
    assert r.status_code == 201, r.text
    try:
        assert r.json() == next(n for n in popek_json("network", "list")
                                if n["name"] == "hapi-net")
        assert c.get("/1.0/networks").json() == popek_json("network", "list")
        assert c.get("/1.0/networks/hapi-net").json()["name"] == "hapi-net"
        r = c.post("/1.0/networks", json={"name": "hapi-net"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "exists", r.text
        for url, args in [("/1.0/trust/keys", ["trust", "list"]),
                          ("/1.0/policy", ["policy", "show"]),
                          ("/1.0/profiles", ["profile", "list"])]:
            assert c.get(url).json() == popek_json(*args), url
        assert c.get("/1.0/audit/verify").json() == {"intact": True, "problems": []}
    finally:
        r = c.delete("/1.0/networks/hapi-net")
    assert r.status_code == 200 and r.json() == {"deleted": "hapi-net"}, r.text
    assert "hapi-net" not in {n["name"] for n in popek_json("network", "list")}
    assert c.delete("/1.0/networks/hapi-net").status_code == 404


def test_unknown_instance_is_404(server: Server) -> None:
    c = server.client()
    for method, url, kw in [("GET", "/1.0/instances/hapi-nobody", {}),
                            ("PUT", "/1.0/instances/hapi-nobody/state",
                             {"json": {"action": "stop"}}),
                            ("DELETE", "/1.0/instances/hapi-nobody", {}),
                            ("POST", "/1.0/instances/hapi-nobody/exec",
                             {"json": {"command": ["true"]}})]:
        r = c.request(method, url, **kw)
        assert r.status_code == 404, (method, url, r.text)
        err = r.json()["error"]
        assert err["code"] == "not_found" and "hapi-nobody" in err["message"]
    r = c.get("/1.0/operations/" + "0" * 32)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_tls_listener_needs_a_token(server: Server) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert = Path(os.environ["POPEK_HOME"]) / "api" / "server.crt"
    assert oct((cert.parent / "server.key").stat().st_mode & 0o777) == "0o600"
    pinned = x509.load_pem_x509_certificate(cert.read_bytes()).fingerprint(hashes.SHA256())
    assert pinned.hex() == server.fingerprint
    for token in ("", "pk1.000000000000.forged"):
        with server.tls(token) as t:
            r = t.get("/1.0/instances")
            assert r.status_code == 401, r.text
            assert r.json()["error"]["code"] == "unauthenticated"
            assert r.headers["www-authenticate"] == "Bearer"
            r = t.post("/1.0/networks", json={"name": "hapi-net"})
            assert r.status_code == 401
    assert "hapi-net" not in {n["name"] for n in popek_json("network", "list")}
    from popek.core.auth import Tokens
    from popek.state import open_store

    _, secret = Tokens(open_store()).create("default", "viewer", name="hapi-viewer")
    with server.tls(secret) as t:
        r = t.get("/1.0/instances")
        assert r.status_code == 200, r.text


def test_a_flood_of_bad_tokens_is_summed_up_in_the_audit_log(popek_home: Path,
                                                             sockdir: Path) -> None:
    """A client looping bad tokens gets its burst of records, then one summary (at the
    latest when the server stops): before, every refusal wrote a record."""
    from popek.core.refusals import BURST, SUMMARY_OP

    log = popek_home / "audit" / "log.jsonl"
    seen = len(log.read_text().splitlines()) if log.exists() else 0
    flood = start_server(sockdir / "flood.sock")  # a fresh budget: this server's own
    try:
        with flood.tls("") as t:
            for i in range(BURST + 10):
                r = t.get("/1.0/instances", headers={"authorization":
                                                     f"Bearer pk1.hapiflood{i:04d}.x"})
                assert r.status_code == 401, r.text
    finally:
        stop_server(flood)
    new = [json.loads(line) for line in log.read_text().splitlines()[seen:]]
    mine = [r for r in new if str(r["target"]).startswith("hapiflood")]
    assert len(mine) == BURST, mine  # before: BURST + 10
    summary = [r for r in new if r["op"] == SUMMARY_OP]
    assert [r["target"] for r in summary] == ["127.0.0.1"], new
    assert summary[0]["result"].startswith("denied: 10 more refused credential(s) from "
                                           "127.0.0.1 between "), summary
    assert popek("audit", "verify").returncode == 0


def test_roles_and_projects_over_tls(server: Server, minimal_image: str) -> None:
    from popek.core.auth import Tokens
    from popek.state import open_store

    c = server.client()
    op = run_operation(c, "POST", "/1.0/instances",
                       json={"image": minimal_image, "name": CT, "engine": "container"})
    assert op["status"] == "success", op
    popek("project", "create", "hapi-a")
    tokens = Tokens(open_store())
    _, viewer = tokens.create("default", "viewer", name="hapi-view")
    _, other = tokens.create("hapi-a", "operator", name="hapi-oper")
    try:
        before = len(c.get("/1.0/operations").json())
        with server.tls(viewer) as t:  # a viewer reads, and may not change anything
            assert CT in {i["name"] for i in t.get("/1.0/instances").json()}
            r = t.put(f"/1.0/instances/{CT}/state", json={"action": "stop"})
            assert r.status_code == 403 and r.json()["error"]["code"] == "denied", r.text
            r = t.post(f"/1.0/instances/{CT}/exec", json={"command": ["true"]})
            assert r.status_code == 403, r.text
        assert popek_json("info", CT)["state"] == "running"
        assert len(c.get("/1.0/operations").json()) == before
        denied = [r for r in c.get("/1.0/audit", params={"target": CT}).json()
                  if r["op"] == "instance.stop"]
        assert denied and denied[-1]["result"].startswith("denied"), denied
        with server.tls(other) as t:  # an operator of project hapi-a sees nothing of default
            assert t.get("/1.0/instances").json() == []
            r = t.get(f"/1.0/instances/{CT}")
            assert r.status_code == 404, r.text
            for url in ("/1.0/instances?project=default", "/1.0/instances?all_projects=true"):
                r = t.get(url)
                assert r.status_code == 403 and r.json()["error"]["code"] == "denied", r.text
            assert t.get("/1.0/operations").json() == []
            assert all(r.get("project") == "hapi-a" for r in t.get("/1.0/audit").json())
            r = t.post("/1.0/networks", json={"name": "hapi-net"})
            assert r.status_code == 403, r.text
    finally:
        run_operation(c, "DELETE", f"/1.0/instances/{CT}", params={"force": "true"})
        popek("project", "delete", "hapi-a", check=False)


def test_operation_outlives_a_killed_server(server: Server, sockdir: Path,
                                            minimal_image: str) -> None:
    sock = sockdir / "second.sock"
    second = start_server(sock)
    try:
        r = second.client().post("/1.0/instances", json={
            "image": minimal_image, "name": LOST, "engine": "container"})
        assert r.status_code == 202, r.text
        op_id = r.json()["id"]
    finally:
        stop_server(second, signal.SIGKILL)
    assert sock.is_socket()  # left behind by the dead server
    third = start_server(sock)  # replaces the dead socket
    try:
        op = third.client().get(f"/1.0/operations/{op_id}").json()
        assert op["status"] in ("success", "failure"), op
        if op["status"] == "failure":
            assert op["error"]["message"] == "the server stopped while it ran", op
        else:
            assert op["result"]["name"] == LOST
        # the other server sees the same record: it is in the store
        assert server.client().get(f"/1.0/operations/{op_id}").json() == op
    finally:
        stop_server(third)
    assert not sock.exists()
    popek("delete", "--force", LOST, check=False)


def test_second_server_on_a_live_socket_is_refused(server: Server) -> None:
    proc = subprocess.run([sys.executable, "-m", "popek", "serve", "--socket",
                           str(server.sock)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    assert "already listens" in proc.stderr and "Traceback" not in proc.stderr
    assert server.client().get("/1.0/instances").status_code == 200


def _lines(stream: IO[str]) -> queue.Queue[str]:
    """The lines ``stream`` gives, read by a thread (a pipe's buffered lines and select
    disagree: several events can arrive in one read)."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


def test_monitor_sees_a_launch(server: Server, minimal_image: str) -> None:
    mon = subprocess.Popen([sys.executable, "-m", "popek", "monitor", "--socket",
                            str(server.sock), "--format", "json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert mon.stderr is not None and mon.stdout is not None
        ready = read_line(mon.stderr, 60, "popek monitor to subscribe")
        assert "watching events" in ready, ready
        events = _lines(mon.stdout)
        popek("launch", minimal_image, MON, "--container")
        seen: list[dict[str, Any]] = []

        def until(what: str, found: Any) -> None:
            while not any(found(e) for e in seen):
                try:
                    seen.append(json.loads(events.get(timeout=60)))
                except queue.Empty:
                    raise AssertionError(f"no {what} in 60 s; seen: {seen}") from None

        until(f"lifecycle event of {MON}", lambda e: e["type"] == "lifecycle"
              and e["name"] == MON and e["state"] == "running")
        until(f"audit record of {MON}", lambda e: e["type"] == "audit"
              and e["record"]["target"] == MON and e["record"]["op"] == "instance.launch"
              and e["record"]["result"] == "ok")
    finally:
        mon.send_signal(signal.SIGINT)
        mon.wait(timeout=30)
        popek("delete", "--force", MON, check=False)
