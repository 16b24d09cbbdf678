"""The non-instance commands on a remote (issue 14.4), through a real ``popek serve``.

The server runs over the session's POPEK_HOME with TLS on a free port; a
project admin token of project rnc-p is made there.  A client with an empty
home and a remotes file of its own adds the server as remote ``rnc`` (the
certificate pinned, the token) and runs each list and show command as
``X rnc: --format json`` (or ``rnc:NAME``): the output is what ``X --format
json --project rnc-p`` prints on the server's host, and a table is the same
text.  Changes made through the remote (a profile, a network, an imported
image) show on the server; an error is the server's line and exit code.
After ``popek remote switch rnc`` the commands go there without the prefix,
the host-only ones refuse, and ``local:`` is the client's own host.  ``monitor
rnc:`` streams the server's events, ``sandbox run rnc: --`` runs there, and
``admin backup FILE REMOTE:`` writes the server's backup here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_api import Server, start_server, stop_server

from framework import POPEK, popek, popek_json
from framework.events import read_line

P = "rnc-p"
PROFILE = "rnc-prof"
NET = "rnc-net"
IMAGE = "rnc-img"


@pytest.fixture(scope="module")
def server(popek_home: Path, minimal_image: str) -> Iterator[Server]:
    sockdir = Path(tempfile.mkdtemp(prefix="rnc-api-"))
    srv = start_server(sockdir / "api.sock")
    popek("project", "create", P)
    try:
        yield srv
    finally:
        stop_server(srv)
        for args in (("profile", "delete", PROFILE), ("image", "delete", IMAGE),
                     ("network", "delete", "--force", NET)):
            popek(*args, "--project", P, check=False)
        popek("project", "delete", P, check=False)
        shutil.rmtree(sockdir, ignore_errors=True)


class Client:
    """The CLI of another home: its own POPEK_HOME (empty) and remotes file."""

    def __init__(self, base: Path) -> None:
        self.env = {**os.environ, "POPEK_HOME": str(base / "home"),
                    "XDG_CONFIG_HOME": str(base / "cfg")}
        self.env.pop("POPEK_PROJECT", None)

    def __call__(self, *args: str, check: bool = True,
                 stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
        return popek(*args, check=check, env=self.env, stdin=stdin)

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--format", "json").stdout)


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[Client]:
    made = popek("token", "create", "--project", P, "--role", "admin", "--name", "rnc-remote")
    secret = made.stdout.splitlines()[-1].strip()
    token_id = made.stdout.split("(", 1)[1].split(")", 1)[0]
    base = Path(tempfile.mkdtemp(prefix="rnc-client-", dir="/var/tmp"))
    cli = Client(base)
    try:
        cli("remote", "add", "rnc", f"https://127.0.0.1:{server.port}", "--token", secret,
            "--accept-certificate")
        yield cli
    finally:
        popek("token", "revoke", token_id, check=False)
        shutil.rmtree(base, ignore_errors=True)


def host(*args: str) -> Any:
    """The server's host: the same command in project rnc-p, as JSON."""
    return popek_json(*args, "--project", P)


def test_lists_and_shows_are_the_hosts(client: Client) -> None:
    assert client.json("trust", "list", "rnc:") == popek_json("trust", "list")
    assert client("trust", "list", "rnc:").stdout == popek("trust", "list").stdout
    assert client.json("policy", "show", "rnc:") == popek_json("policy", "show")
    assert client("policy", "show", "rnc:").stdout == popek("policy", "show").stdout
    assert client.json("sandbox", "profiles", "rnc:") == popek_json("sandbox", "profiles")
    assert client.json("profile", "list", "rnc:") == host("profile", "list")
    assert client.json("project", "show", f"rnc:{P}") == popek_json("project", "show", P)
    assert client.json("image", "list", "rnc:") == host("image", "list")
    assert client("image", "list", "rnc:").stdout == popek("image", "list", "--project",
                                                           P).stdout
    assert client.json("image", "info", "rnc:minimal") == host("image", "info", "minimal")
    assert client("image", "info", "rnc:minimal").stdout == popek(
        "image", "info", "minimal", "--project", P).stdout
    assert client.json("network", "list", "rnc:") == host("network", "list")
    assert client.json("certificate", "list", "rnc:") == popek_json(
        "certificate", "list", "--project", P)
    verify = client("audit", "verify", "rnc:", check=False)  # the host admin's alone
    assert verify.returncode == 4 and "audit.verify" in verify.stderr, verify


def test_changes_through_the_remote_show_on_the_server(client: Client, popek_home: Path,
                                                       tmp_path: Path) -> None:
    made = client("profile", "create", f"rnc:{PROFILE}", "-c", "limits.cpu=2",
                  "--description", "made through rnc")
    assert made.stdout == f"Profile {PROFILE} created.\n"
    shown = host("profile", "show", PROFILE)
    assert shown["config"] == {"limits.cpu": "2"} and shown["description"] == "made through rnc"
    assert client.json("profile", "show", f"rnc:{PROFILE}") == shown
    assert client("profile", "show", f"rnc:{PROFILE}").stdout == popek(
        "profile", "show", PROFILE, "--project", P).stdout
    client("profile", "edit", f"rnc:{PROFILE}",
           stdin=b"description: edited\nconfig:\n  limits.cpu: '1'\nnetworks: []\n")
    assert host("profile", "show", PROFILE)["config"] == {"limits.cpu": "1"}
    # its audit record names the token, in the token's project, as on the host
    mine = [r for r in popek_json("audit", "log", "--target", PROFILE) if r["project"] == P]
    assert client.json("audit", "log", "rnc:", "--target", PROFILE) == mine
    assert {r["op"] for r in mine} >= {"profile.create", "profile.edit"}
    assert all(r["identity"].startswith("token rnc-remote (") for r in mine), mine

    # a network of the project, made through the remote: the server's bridge and record
    net = client("network", "create", f"rnc:{NET}")
    assert net.stdout.startswith(f"Network {NET} created (")
    assert client.json("network", "list", "rnc:") == host("network", "list")
    assert client.json("network", "info", f"rnc:{NET}") == host("network", "info", NET)

    # an image imported through the remote: the file streamed, the operation waited on
    src = tmp_path / "rootfs.tar.gz"
    with open(popek_home / "images" / "minimal" / "rootfs.tar", "rb") as f, \
            tarfile.open(fileobj=f) as tin, tarfile.open(src, "w:gz") as tout:
        for member in tin:
            tout.addfile(member, tin.extractfile(member) if member.isfile() else None)
    imported = client("image", "import", str(src), f"rnc:{IMAGE}", "--no-sign")
    assert imported.stdout.startswith(f"Image {IMAGE} imported on remote rnc (container)")
    assert IMAGE in {i["name"] for i in host("image", "list") if i["project"] == P}
    assert client.json("image", "info", f"rnc:{IMAGE}") == host("image", "info", IMAGE)

    for args in (("image", "delete"), ("network", "delete"), ("profile", "delete")):
        name = {"image": IMAGE, "network": NET, "profile": PROFILE}[args[0]]
        gone = client(*args, f"rnc:{name}")
        assert gone.stdout == f"{args[0].capitalize()} {name} deleted.\n"
    assert PROFILE not in {p["name"] for p in host("profile", "list")}
    assert NET not in {n["name"] for n in host("network", "list")}


def test_errors_are_the_servers(client: Client) -> None:
    remote = client("profile", "show", "rnc:rnc-nosuch", check=False)
    local = popek("profile", "show", "rnc-nosuch", "--project", P, check=False)
    assert remote.returncode == local.returncode == 8, remote
    assert remote.stderr == local.stderr and remote.stderr.count("\n") == 1
    build = client("image", "build", "rnc:minimal", check=False)  # refused before building
    assert build.returncode == 2 and "may not sign images" in build.stderr, build
    assert build.stderr.count("\n") == 1 and build.stdout == ""
    denied = client("trust", "keygen", "rnc:rnc-k", "--role", "image", check=False)
    assert denied.returncode == 4 and "host-wide" in denied.stderr, denied
    assert "rnc-k" not in {k["name"] for k in popek_json("trust", "list")}


def test_after_switch_everything_goes_to_the_remote(client: Client) -> None:
    client("remote", "switch", "rnc")
    try:
        assert client.json("trust", "list") == popek_json("trust", "list")
        assert client.json("profile", "list") == host("profile", "list")
        assert client.json("image", "list") == host("image", "list")
        assert client.json("network", "list") == host("network", "list")
        for args, local_form in ((("project", "switch", P), f"project switch local:{P}"),
                                 (("admin", "restore", "/nonexistent"),
                                  "admin restore /nonexistent local:")):
            refused = client(*args, check=False)
            assert refused.returncode == 2, refused
            assert "the default remote is rnc" in refused.stderr, refused.stderr
            assert local_form in refused.stderr and refused.stderr.count("\n") == 1
        # local: is the client's own (empty) home
        assert client.json("profile", "list", "local:") == []
    finally:
        client("remote", "switch", "local")


def test_monitor_sandbox_and_backup_on_the_remote(client: Client, server: Server,
                                                  tmp_path: Path) -> None:
    """popek monitor rnc: streams the server's events (the token's project's); sandbox run
    rnc: runs there with its output and exit code; admin backup FILE REMOTE: writes the
    server's backup here (the host admin's: over its socket; the token is denied)."""
    mon = subprocess.Popen([*POPEK, "monitor", "rnc:", "--format", "json", "--type", "audit"],
                           env=client.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        assert mon.stderr is not None and mon.stdout is not None
        ready = read_line(mon.stderr, 60, "popek monitor rnc: to subscribe")
        assert ready.strip() == "popek: watching events on remote rnc", ready
        client("profile", "create", "rnc:rnc-mon")
        event = json.loads(read_line(mon.stdout, 60, "the audit event of profile create"))
        assert event["type"] == "audit" and event["record"]["op"] == "profile.create"
        assert event["record"]["target"] == "rnc-mon" and event["record"]["project"] == P
    finally:
        mon.send_signal(signal.SIGINT)
        mon.wait(timeout=30)
        client("profile", "delete", "rnc:rnc-mon", check=False)

    ran = client("sandbox", "run", "rnc:", "--", "sh", "-c",
                 "cat; echo out; echo err >&2; exit 3", check=False, stdin=b"in\n")
    assert (ran.returncode, ran.stdout, ran.stderr) == (3, "in\nout\n", "err\n"), ran

    denied = client("admin", "backup", str(tmp_path / "no.backup"), "rnc:", check=False)
    assert denied.returncode == 4 and not (tmp_path / "no.backup").exists(), denied
    client("remote", "add", "rnc-sock", f"unix://{server.sock}")
    dest = tmp_path / "rnc.backup"
    made = client("admin", "backup", str(dest), "rnc-sock:")
    assert made.stdout.startswith("Backed up the state store (revision ")
    assert f"to {dest} ({dest.stat().st_size} bytes, mode 0600" in made.stdout
    assert dest.stat().st_mode & 0o777 == 0o600
    with tarfile.open(dest) as tar:
        assert tar.getnames()[:2] == ["popek-backup.json", "state.db"]
