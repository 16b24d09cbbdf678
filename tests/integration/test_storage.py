"""Storage pools and volumes through the real ``popek`` command and the API (issue 15.1/15.2/15.7).

The CLI runs as a user runs it, over the session's POPEK_HOME; the API is the
application of ``popek serve``'s TCP listener (tokens, roles, projects) run
in this process over the same home.  Files are real (qcow2 by qemu-img, ext4
by mkfs); what an instance does with a volume comes with attach (15.3).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from framework import popek, popek_json, require_root_and_tools
from popek.errors import BAD_INPUT, EXISTS, NOT_FOUND, WRONG_STATE

require_root_and_tools()

POOL = "hstor-fast"
PROJECT = "hstor-a"
MiB = 1 << 20


@pytest.fixture(scope="module")
def pool(popek_home: Path) -> Iterator[str]:
    out = popek("storage", "create", POOL, "dir").stdout
    assert out.startswith(f"Storage pool {POOL} created (dir, {popek_home}/storage/{POOL}, "), out
    yield POOL
    for vol in popek_json("storage", "volume", "list", POOL):
        popek("storage", "volume", "delete", POOL, vol["name"], check=False)
    popek("storage", "delete", POOL, check=False)


def audit_of(home: Path, op: str) -> list[dict[str, Any]]:
    return [r for r in map(json.loads, (home / "audit" / "log.jsonl").read_text().splitlines())
            if r["op"] == op]


def test_pools_list_with_their_space(pool: str, popek_home: Path) -> None:
    pools = {p["name"]: p for p in popek_json("storage", "list")}
    assert {"local", pool} <= set(pools)
    fast = pools[pool]
    assert fast["driver"] == "dir" and fast["config"] == {"path": f"{popek_home}/storage/{pool}"}
    assert 0 < fast["free"] <= fast["size"] and fast["health"] == "ok"
    table = popek("storage", "list").stdout.splitlines()  # not a terminal: plain columns
    assert table[0].split() == ["NAME", "DRIVER", "PATH", "SIZE", "USED", "FREE", "VOLUMES",
                                "HEALTH"]
    assert popek_json("storage", "info", pool)["volumes"] == 0


def test_a_volume_lives_through_the_cli(pool: str, popek_home: Path) -> None:
    out = popek("storage", "volume", "create", pool, "data", "--size", "64MiB").stdout
    assert out == f"Volume {pool}/data created (block, 64MiB).\n"
    [vol] = popek_json("storage", "volume", "list", pool)
    assert (vol["name"], vol["type"], vol["size"], vol["state"], vol["project"]) == (
        "data", "block", 64 * MiB, "ready", "default")
    f = popek_home / "storage" / pool / "default" / "data.qcow2"
    assert f.is_file()
    assert popek("storage", "volume", "resize", pool, "data", "96MiB").stdout == \
        f"Volume {pool}/data resized to 96MiB.\n"
    info = popek_json("storage", "volume", "info", pool, "data")
    assert info["size"] == 96 * MiB and 0 < info["used"] < 4 * MiB
    created = audit_of(popek_home, "volume.create")[-1]
    assert created["target"] == f"{pool}/data" and created["result"] == "ok"
    assert 'size=67108864' in created["change"]
    popek("storage", "volume", "delete", pool, "data")
    assert not f.exists() and popek_json("storage", "volume", "list", pool) == []


def test_a_filesystem_volume_holds_ext4(pool: str, popek_home: Path) -> None:
    popek("storage", "volume", "create", pool, "files", "--size", "32MiB", "--type", "filesystem")
    f = popek_home / "storage" / pool / "default" / "files.ext4"
    with f.open("rb") as h:
        h.seek(1024 + 0x38)
        assert h.read(2) == b"\x53\xef"
    popek("storage", "volume", "delete", pool, "files")


@pytest.mark.parametrize(("args", "code", "says"), [
    (["storage", "volume", "create", POOL, "v", "--size", "12parsecs"], BAD_INPUT,
     "invalid volume size '12parsecs'"),
    (["storage", "volume", "create", POOL, "v", "--size", "1KiB"], BAD_INPUT,
     "a block volume takes 1MiB to 64TiB"),
    (["storage", "volume", "create", "nosuch", "v", "--size", "8MiB"], NOT_FOUND,
     "storage pool 'nosuch' not found; pools: "),
    (["storage", "create", "hstor-x", "zfs"], BAD_INPUT,
     "unknown storage driver 'zfs'; available: dir, ceph"),
    (["storage", "create", "hstor-x", "dir", "path=/nonexistent/hstor"], BAD_INPUT,
     "does not exist"),
    (["storage", "create", "hstor-x", "dir", "oops"], BAD_INPUT, "write KEY=VALUE"),
    (["storage", "volume", "resize", POOL, "nosuch", "8MiB"], NOT_FOUND,
     "volume 'nosuch' not found"),
])
def test_bad_input_is_one_line_and_changes_nothing(pool: str, args: list[str], code: int,
                                                  says: str) -> None:
    before = _pools()
    volumes = popek_json("storage", "volume", "list")
    proc = popek(*args, check=False)
    assert proc.returncode == code, proc.stderr
    assert says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert _pools() == before
    assert popek_json("storage", "volume", "list") == volumes


def _pools() -> dict[str, tuple[str, int]]:
    return {p["name"]: (p["driver"], p["volumes"]) for p in popek_json("storage", "list")}


def test_snapshots_and_clones_through_the_cli(pool: str, popek_home: Path) -> None:
    popek("storage", "volume", "create", pool, "base", "--size", "1GiB")
    assert popek("storage", "volume", "snapshot", pool, "base", "s1").stdout == \
        "Snapshot base@s1 taken.\n"
    out = popek("storage", "volume", "clone", pool, "base", "s1", "copy").stdout
    assert out == f"Volume {pool}/copy cloned from base@s1 (1GiB).\n"
    copy = popek_json("storage", "volume", "info", pool, "copy")
    assert copy["origin"] == "default/base@s1" and copy["used"] < 1 << 20
    proc = popek("storage", "volume", "delete", pool, "base", check=False)
    assert proc.returncode == WRONG_STATE and "clone(s) default/copy" in proc.stderr
    popek("storage", "volume", "restore", pool, "base", "s1")
    popek("storage", "volume", "delete", pool, "copy")
    assert popek("storage", "volume", "snapshot-delete", pool, "base", "s1").stdout == \
        "Snapshot base@s1 deleted.\n"
    assert popek_json("storage", "volume", "info", pool, "base")["snapshots"] == []
    popek("storage", "volume", "delete", pool, "base")
    assert list((popek_home / "storage" / pool).rglob("*.qcow2")) == []
    kinds = {r["op"] for r in audit_of(popek_home, "volume.snapshot") +
             audit_of(popek_home, "volume.clone") + audit_of(popek_home, "volume.restore")}
    assert kinds == {"volume.snapshot", "volume.clone", "volume.restore"}


def test_import_and_export_through_the_cli(pool: str, tmp_path: Path) -> None:
    raw = tmp_path / "disk.img"
    with raw.open("wb") as f:
        f.truncate(16 * MiB)
        f.write(b"popek-volume-data")
    proc = popek("storage", "volume", "import", pool, "imp", str(raw))
    assert proc.stdout == f"Volume {pool}/imp imported from {raw} (16MiB).\n"
    said = [line for line in proc.stderr.splitlines() if "importing" in line]
    assert said and said[-1] == "popek: importing 100%", proc.stderr  # progress, not a spinner
    out = tmp_path / "out.raw"
    popek("storage", "volume", "export", pool, "imp", str(out), "--format", "raw")
    assert out.read_bytes()[:17] == b"popek-volume-data" and out.stat().st_size == 16 * MiB
    again = popek("storage", "volume", "export", pool, "imp", str(out), check=False)
    assert again.returncode == EXISTS and "does not overwrite" in again.stderr
    popek("storage", "volume", "delete", pool, "imp")


def test_a_pool_with_volumes_is_not_deleted(pool: str) -> None:
    popek("storage", "volume", "create", pool, "keep", "--size", "8MiB")
    try:
        proc = popek("storage", "delete", pool, check=False)
        assert proc.returncode == WRONG_STATE
        assert "holding 1 volume(s) (default/keep)" in proc.stderr, proc.stderr
        assert "delete its volumes first" in proc.stderr
    finally:
        popek("storage", "volume", "delete", pool, "keep")


# -- the API, with tokens of projects and roles (issue 14.3 applied to storage) ---------

@pytest.fixture(scope="module")
def api(pool: str) -> Iterator[tuple[TestClient, dict[str, str]]]:
    from popek.api.app import create_app
    from popek.core.auth import Tokens
    from popek.state import open_store

    popek("project", "create", PROJECT)
    tokens = Tokens(open_store())
    secrets = {role: tokens.create(PROJECT, role, name=f"hstor-{role}")[1]
               for role in ("viewer", "operator")}
    secrets["default-operator"] = tokens.create("default", "operator", name="hstor-dop")[1]
    with TestClient(create_app(local=False)) as client:
        yield client, secrets
    for vol in popek_json("storage", "volume", "list", "--project", PROJECT):
        popek("storage", "volume", "delete", vol["pool"], vol["name"], "--project", PROJECT,
              check=False)
    popek("project", "delete", PROJECT, check=False)


def _as(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_volumes_belong_to_projects_and_roles_hold(api: tuple[TestClient, dict[str, str]],
                                                   pool: str) -> None:
    client, secrets = api
    url = f"/1.0/storage-pools/{pool}/volumes"
    r = client.get("/1.0/storage-pools", headers=_as(secrets["viewer"]))
    assert r.status_code == 200 and pool in {p["name"] for p in r.json()}
    r = client.post(url, json={"name": "v1", "size": 8 * MiB}, headers=_as(secrets["viewer"]))
    assert r.status_code == 403 and "a viewer may only read" in r.text, r.text
    r = client.post(url, json={"name": "v1", "size": 8 * MiB}, headers=_as(secrets["operator"]))
    assert r.status_code == 201, r.text
    assert (r.json()["project"], r.json()["name"]) == (PROJECT, "v1")
    # the default project's operator sees nothing of hstor-a's, and cannot reach it
    r = client.get(url, headers=_as(secrets["default-operator"]))
    assert r.status_code == 200 and r.json() == []
    r = client.delete(f"{url}/v1", params={"project": PROJECT},
                      headers=_as(secrets["default-operator"]))
    assert r.status_code == 403, r.text
    assert [v["name"] for v in popek_json("storage", "volume", "list", pool, "--project",
                                          PROJECT)] == ["v1"]
    # pools are the host admin's
    r = client.post("/1.0/storage-pools", json={"name": "hstor-mine", "driver": "dir"},
                    headers=_as(secrets["operator"]))
    assert r.status_code == 403 and "host admin" in r.text, r.text
    r = client.patch(f"{url}/v1", json={"size": 16 * MiB}, headers=_as(secrets["operator"]))
    assert r.status_code == 200 and r.json()["size"] == 16 * MiB, r.text
    r = client.patch(f"{url}/v1", json={"size": 4 * MiB}, headers=_as(secrets["operator"]))
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_input", r.text
    r = client.delete(f"{url}/v1", headers=_as(secrets["operator"]))
    assert r.status_code == 200, r.text


def test_import_and_export_through_the_api(api: tuple[TestClient, dict[str, str]],
                                          pool: str) -> None:
    client, secrets = api
    url = f"/1.0/storage-pools/{pool}/volumes/up"
    body = b"popek-api-volume" + b"\0" * (4 * MiB - 16)
    r = client.post(f"{url}/import", content=body, headers=_as(secrets["viewer"]))
    assert r.status_code == 403, r.text  # refused before the body is kept
    r = client.post(f"{url}/import", content=body, headers=_as(secrets["operator"]))
    assert r.status_code == 202, r.text
    done = client.get(f"/1.0/operations/{r.json()['id']}/wait", params={"timeout": 120},
                      headers=_as(secrets["operator"])).json()
    assert done["status"] == "success", done
    assert done["result"]["size"] == 4 * MiB and "importing 100%" in done["progress"][-1]
    r = client.get(f"{url}/export", params={"format": "raw"}, headers=_as(secrets["operator"]))
    assert r.status_code == 200 and r.content == body
    r = client.get(f"{url}/export", headers=_as(secrets["viewer"]))
    assert r.status_code == 403, r.text  # the data leaves the host: an operator's
    assert client.delete(url, headers=_as(secrets["operator"])).status_code == 200


def test_encrypted_volumes_through_the_api(api: tuple[TestClient, dict[str, str]],
                                          pool: str) -> None:
    """``encrypt``: made, imported into and exported from (decrypted) through the API;
    a filesystem volume is refused with the reason, nothing made."""
    client, secrets = api
    url = f"/1.0/storage-pools/{pool}/volumes"
    op = _as(secrets["operator"])
    r = client.post(url, json={"name": "fs", "size": 32 * MiB, "type": "filesystem",
                               "encrypt": True}, headers=op)
    assert r.status_code == 400 and "applies to block volumes" in r.text, r.text
    r = client.post(url, json={"name": "sec", "size": 8 * MiB, "encrypt": True}, headers=op)
    assert r.status_code == 201 and r.json()["encrypted"] is True, r.text
    assert popek_json("storage", "volume", "info", pool, "sec", "--project",
                      PROJECT)["encrypted"] is True
    body = b"popek-api-secret" + b"\0" * (4 * MiB - 16)
    r = client.post(f"{url}/up/import", content=body, params={"encrypt": "true"}, headers=op)
    assert r.status_code == 202, r.text
    done = client.get(f"/1.0/operations/{r.json()['id']}/wait", params={"timeout": 120},
                      headers=op).json()
    assert done["status"] == "success" and done["result"]["encrypted"] is True, done
    path = Path(popek_json("storage", "info", pool)["config"]["path"]) / PROJECT / "up.qcow2"
    assert b"popek-api-secret" not in path.read_bytes()
    r = client.get(f"{url}/up/export", params={"format": "raw"}, headers=op)
    assert r.status_code == 200 and r.content == body
    for name in ("sec", "up"):
        assert client.delete(f"{url}/{name}", headers=op).status_code == 200
    assert [v["name"] for v in popek_json("storage", "volume", "list", pool, "--project",
                                          PROJECT)] == []


def test_the_api_answers_as_the_cli(api: tuple[TestClient, dict[str, str]], pool: str) -> None:
    client, secrets = api
    r = client.get(f"/1.0/storage-pools/{pool}", headers=_as(secrets["viewer"]))
    cli = popek_json("storage", "info", pool)
    assert r.status_code == 200
    assert {k: v for k, v in r.json().items() if k not in ("free", "used")} == \
        {k: v for k, v in cli.items() if k not in ("free", "used")}
    r = client.get("/1.0/storage-pools/nosuch", headers=_as(secrets["viewer"]))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_reset_purge_deletes_volumes_and_pools_outside_the_home(tmp_path: Path) -> None:
    """``admin reset --purge`` removes the home; a pool's files may be elsewhere: every
    volume (a clone of a clone before its origin) and pool goes first."""
    import os
    import shutil
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="popek-hstor-reset-", dir="/var/tmp"))
    home.chmod(0o755)
    outside = tmp_path / "pool"
    outside.mkdir()
    env = {**os.environ, "POPEK_HOME": str(home)}
    try:
        popek("storage", "create", "hstor-out", "dir", f"path={outside}", env=env)
        popek("storage", "volume", "create", "hstor-out", "base", "--size", "8MiB", env=env)
        popek("storage", "volume", "snapshot", "hstor-out", "base", "s", env=env)
        popek("storage", "volume", "clone", "hstor-out", "base", "s", "c1", env=env)
        popek("storage", "volume", "snapshot", "hstor-out", "c1", "t", env=env)
        popek("storage", "volume", "clone", "hstor-out", "c1", "t", "c2", env=env)
        assert len(list(outside.rglob("*.qcow2"))) == 5
        out = popek("admin", "reset", "--purge", "--yes", env=env).stdout
        for name in ("c2", "c1", "base"):
            assert f"deleted volume hstor-out/{name} of project default" in out, out
        assert out.index("hstor-out/c2") < out.index("hstor-out/c1") < out.index("base")
        assert "deleted storage pool hstor-out" in out
        assert list(outside.iterdir()) == [] and not home.exists()
    finally:
        if home.exists():
            popek("admin", "reset", "--purge", "--yes", env=env, check=False)
        shutil.rmtree(home, ignore_errors=True)
