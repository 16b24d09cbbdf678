"""Remotes (issue 14.4): a container driven as ``rem:NAME`` from another home, over pinned TLS.

``popek serve`` runs over the session's POPEK_HOME with TLS on a free port; an
operator token (with the exec grant) is made with ``popek token create``.  A
client with a home and a remotes file of its own adds it (pinning the
certificate) and runs launch, list, info, exec, config, pause, resume,
restart, stop, start and delete as ``rem:hrem-ct``; each prints what the
same command prints on the server's host (a twin container launched there
the same way, for the verbs whose output names the instance).  A changed
certificate is refused naming both fingerprints, a revoked token with the
denied exit code, a command that does not reach remotes yet with a one-line
error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from framework import free_port, popek, popek_json
from framework.events import read_line

CT = "hrem-ct"    # driven through the remote
TWIN = "hrem-lo"  # the same commands on the server's host
#: the fields of ``popek info`` that change from one read to the next
LIVE = {"usage", "cpu_seconds", "history"}


@dataclass
class Client:
    """A popek client with a home and a remotes file of its own."""

    env: dict[str, str]

    def popek(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return popek(*args, check=check, env=self.env)


@pytest.fixture(scope="module")
def server(popek_home: Path, minimal_image: str) -> Iterator[tuple[str, str]]:
    """``popek serve`` on TLS: its URL and the fingerprint it printed."""
    sockdir = Path(tempfile.mkdtemp(prefix="hrem-"))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "popek", "serve", "--socket",
                             str(sockdir / "api.sock"), "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        read_line(proc.stdout, 60, "popek serve to listen on its socket")
        line = read_line(proc.stdout, 60, "popek serve to listen on TCP")
        assert f"https://127.0.0.1:{port}" in line, line
        yield f"https://127.0.0.1:{port}", line.rsplit(" ", 1)[1].rstrip(")\n")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        for name in (CT, TWIN):
            popek("delete", "--force", name, check=False)
        import shutil

        shutil.rmtree(sockdir, ignore_errors=True)


def _token(role: str = "operator") -> tuple[str, str]:
    """A new token of project default with the exec grant: its id and secret."""
    out = popek("token", "create", "--project", "default", "--role", role, "--console",
                "--name", f"hrem-{role}").stdout.splitlines()
    token_id = out[0].split("(", 1)[1].split(")", 1)[0]
    return token_id, out[-1].strip()


@pytest.fixture()
def client() -> Iterator[Client]:
    base = Path(tempfile.mkdtemp(prefix="hrem-client-", dir="/var/tmp"))
    env = {**os.environ, "POPEK_HOME": str(base / "home"), "XDG_CONFIG_HOME": str(base / "cfg")}
    yield Client(env)
    import shutil

    shutil.rmtree(base, ignore_errors=True)


def _same(remote: subprocess.CompletedProcess[str], local: subprocess.CompletedProcess[str],
          swap: bool = False) -> None:
    """The remote command printed and exited as the local one (``swap``: of the twin)."""
    def norm(text: str) -> str:
        return text.replace(TWIN, CT) if swap else text

    assert (remote.returncode, remote.stdout, remote.stderr) == (
        local.returncode, norm(local.stdout), norm(local.stderr)), (remote, local)


def test_container_through_a_remote(server: tuple[str, str], client: Client,
                                    minimal_image: str) -> None:
    url, fingerprint = server
    token_id, secret = _token()
    add = client.popek("remote", "add", "rem", url, "--token", secret, "--accept-certificate")
    assert fingerprint in add.stderr and secret not in add.stdout + add.stderr
    listed = client.popek("remote", "list", "--format", "json").stdout
    assert secret not in listed
    rem = {r["name"]: r for r in json.loads(listed)}["rem"]
    assert rem["fingerprint"] == fingerprint and rem["token"] == "yes"

    launch = ("launch", minimal_image, "--container", "--memory", "96MiB")
    _same(client.popek(*launch[:2], f"rem:{CT}", *launch[2:]),
          popek(*launch[:2], TWIN, *launch[2:]), swap=True)
    # list and info: the same records and tables as on the server's host
    _same(client.popek("list", "rem:"), popek("list"))
    assert client.popek("list", "rem:", "-f", "json").stdout == popek("list", "-f", "json").stdout
    here = {k: v for k, v in popek_json("info", CT).items() if k not in LIVE}
    there = json.loads(client.popek("info", f"rem:{CT}", "-f", "json").stdout)
    assert {k: v for k, v in there.items() if k not in LIVE} == here
    # exec: stdout, stderr and the exit code pass through
    cmd = ("--", "sh", "-c", "echo out; echo err >&2; exit 3")
    got = client.popek("exec", f"rem:{CT}", *cmd, check=False)
    assert (got.returncode, got.stdout, got.stderr) == (3, "out\n", "err\n")
    _same(got, popek("exec", CT, *cmd, check=False))
    # config: set, get, show
    _same(client.popek("config", "set", f"rem:{CT}", "limits.pids=77"),
          popek("config", "set", TWIN, "limits.pids=77"), swap=True)
    _same(client.popek("config", "get", f"rem:{CT}", "limits.pids"),
          popek("config", "get", CT, "limits.pids"))
    _same(client.popek("config", "show", f"rem:{CT}"), popek("config", "show", CT))
    # errors: the same line and exit code
    _same(client.popek("info", "rem:hrem-none", check=False), popek("info", "hrem-none",
                                                                  check=False))
    _same(client.popek("pause", "rem:hrem-none", check=False), popek("pause", "hrem-none",
                                                                   check=False))
    # the console log: the remote's, as its host prints it
    _same(client.popek("console", "--log", f"rem:{CT}"), popek("console", "--log", CT))
    # the server audited what the token did, under the token's identity
    audit = [r for r in popek_json("audit", "log") if r.get("target") == CT
             and r.get("op") == "instance.launch"]
    assert audit and token_id in json.dumps(audit[-1]), audit
    # pause, resume, restart, stop, start, delete
    for verb in ("pause", "resume", "restart", "stop"):
        _same(client.popek(verb, f"rem:{CT}"), popek(verb, TWIN), swap=True)
    assert popek_json("info", CT)["state"] == "stopped"
    _same(client.popek("stop", f"rem:{CT}"), popek("stop", TWIN), swap=True)  # already
    _same(client.popek("start", f"rem:{CT}"), popek("start", TWIN), swap=True)
    assert popek_json("info", CT)["state"] == "running"
    _same(client.popek("stop", f"rem:{CT}"), popek("stop", TWIN), swap=True)
    _same(client.popek("delete", f"rem:{CT}"), popek("delete", TWIN), swap=True)
    assert CT not in {i["name"] for i in popek_json("list")}
    # nothing of it in the client's own home
    assert client.popek("list", "-f", "json").stdout.strip() == "[]"


def test_a_changed_certificate_is_refused(server: tuple[str, str], client: Client) -> None:
    url, fingerprint = server
    _, secret = _token("viewer")
    client.popek("remote", "add", "rem", url, "--token", secret, "--accept-certificate")
    path = Path(client.env["XDG_CONFIG_HOME"]) / "popek" / "remotes.json"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    data = json.loads(path.read_text())
    wrong = "0" * 64
    data["remotes"]["rem"]["fingerprint"] = wrong
    path.write_text(json.dumps(data))
    got = client.popek("list", "rem:", check=False)
    assert got.returncode == 3, got
    assert wrong in got.stderr and fingerprint in got.stderr and "changed" in got.stderr
    assert got.stdout == "" and len(got.stderr.splitlines()) == 1


def test_adding_without_accepting_saves_nothing(server: tuple[str, str],
                                                client: Client) -> None:
    url, fingerprint = server
    got = client.popek("remote", "add", "rem", url, check=False)
    assert got.returncode == 2 and fingerprint in got.stderr
    assert "--accept-certificate" in got.stderr
    names = [r["name"] for r in json.loads(client.popek("remote", "list", "-f", "json").stdout)]
    assert names == ["local"]


def test_a_revoked_token_is_denied(server: tuple[str, str], client: Client) -> None:
    url, _ = server
    token_id, secret = _token("viewer")
    client.popek("remote", "add", "rem", url, "--token", secret, "--accept-certificate")
    client.popek("list", "rem:")
    popek("token", "revoke", token_id)
    got = client.popek("list", "rem:", check=False)
    assert got.returncode == 4, got
    assert "revoked" in got.stderr and secret not in got.stderr
    assert len(got.stderr.splitlines()) == 1
