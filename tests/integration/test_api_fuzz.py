"""Schemathesis fuzzes every operation of the API (issue 14.5): no 5xx, and no state
change from a rejected request.

The application (:func:`popek.api.app.create_app`, the local one: the host
admin, so that no request is refused for want of a role) runs in this process
over a private, empty POPEK_HOME; schemathesis generates requests from the
committed OpenAPI document's schemas, each operation a bounded number of
times.  Before and after each request the store's keys and their revisions
are read: a request answered with a 4xx must leave them as they were, the
audit log's keys aside (the attempt is audited, point 7: its head moves, and
the first signed checkpoint makes the host's audit key).  An accepted
request (202) is waited on, so that its operation's thread writes nothing
during the next request.

Every operation is fuzzed, those that make something on the host too, bounded:
a network accepted by ``POST /1.0/networks`` (a real bridge and dnsmasq on
this host) is deleted at once, and every network of the home at the end; a
build that ``POST /1.0/images`` would accept (minutes of building: test_api.py
builds one) is not sent, so the builds sent are those refused up front (a bad
body, a signing key that cannot sign: 4xx before any change, not after the
build); a sandbox run's timeout is held to a few seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, assume, settings
from starlette.testclient import TestClient

from framework import popek
from popek.api.app import create_app
from popek.state import open_store

#: requests generated per operation (71 operations: some 3 minutes here in all)
EXAMPLES = 20
APP = create_app()
schema = schemathesis.openapi.from_asgi("/1.0/openapi.json", APP)
#: the longest a fuzzed sandbox run may take (a generated command could run on)
SANDBOX_TIMEOUT = 3.0
#: the largest volume a fuzzed request makes or resizes to (bytes)
VOLUME_SIZE = 64 << 20


@pytest.fixture(scope="module", autouse=True)
def private_home() -> Iterator[Path]:
    """The module's own empty home: nothing in it for a request to find or change."""
    if os.geteuid() != 0:
        pytest.skip("integration tests need root")
    home = Path(tempfile.mkdtemp(prefix="hmet-fuzz-", dir="/var/tmp"))
    home.chmod(0o755)
    before = os.environ.get("POPEK_HOME")
    os.environ["POPEK_HOME"] = str(home)
    try:
        yield home
    finally:
        nets = popek("network", "list", "--format", "json", check=False)
        for net in json.loads(nets.stdout or "[]") if nets.returncode == 0 else []:
            popek("network", "delete", "--force", net["name"], check=False)
        if before is None:
            os.environ.pop("POPEK_HOME", None)
        else:
            os.environ["POPEK_HOME"] = before
        shutil.rmtree(home, ignore_errors=True)


def _audit(key: str, value: bytes) -> bool:
    """Whether the key is the audit log's: its head, or the host key its checkpoints are
    signed with (made at the first checkpoint, trust/audit.py)."""
    if key.startswith("/popek/audit/"):
        return True
    return key.startswith("/popek/trust/keys/") and json.loads(value).get("role") == "audit"


def state() -> dict[str, int]:
    """Every key of the store and its revision, the audit log's keys aside."""
    store = open_store()
    try:
        return {kv.key: kv.mod_revision for kv in store.range("/popek/")
                if not _audit(kv.key, kv.value)}
    finally:
        close = getattr(store, "close", None)
        if close is not None:
            close()


def _would_build(case: Any) -> bool:
    """Whether ``case`` is a build ``POST /1.0/images`` accepts: a valid body signed with
    the host's key (made on first use) or not signed at all."""
    from pydantic import ValidationError

    from popek.api.images import BuildBody

    if (case.method, case.path) != ("POST", "/1.0/images"):
        return False
    try:
        body = BuildBody.model_validate(case.body)
    except ValidationError:
        return False
    return not body.sign or not body.key


def _bounded(case: Any) -> None:
    """Hold a sandbox run's timeout to :data:`SANDBOX_TIMEOUT` seconds, and a volume's size
    to :data:`VOLUME_SIZE` at most (an ext4 of terabytes writes a journal of a gigabyte)."""
    if (case.method, case.path) == ("POST", "/1.0/sandboxes/run") and isinstance(case.body, dict):
        timeout = case.body.get("timeout", 60)
        if isinstance(timeout, int | float) and not isinstance(timeout, bool) and \
                timeout > SANDBOX_TIMEOUT:
            case.body["timeout"] = SANDBOX_TIMEOUT
    if case.path.startswith("/1.0/storage-pools/{pool}/volumes") and isinstance(case.body, dict):
        size = case.body.get("size")
        if isinstance(size, int) and not isinstance(size, bool) and size > VOLUME_SIZE:
            case.body["size"] = VOLUME_SIZE


def _clean(case: Any, response: Any) -> None:
    """Delete a network the request made (a real bridge and dnsmasq on this host), and a
    volume (its file)."""
    if (case.method, case.path) == ("POST", "/1.0/networks") and response.status_code == 201:
        name = response.json()["name"]
        with TestClient(APP) as client:
            gone = client.delete(f"/1.0/networks/{name}", params={"force": True})
        assert gone.status_code == 200, gone.text
    if case.method == "POST" and case.path in (
            "/1.0/storage-pools/{pool}/volumes",
            "/1.0/storage-pools/{pool}/volumes/{name}/snapshots/{snapshot}/clone") and \
            response.status_code == 201:
        vol = response.json()
        with TestClient(APP) as client:
            gone = client.delete(f"/1.0/storage-pools/{vol['pool']}/volumes/{vol['name']}",
                                 params={"project": vol["project"]})
        assert gone.status_code == 200, gone.text


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_error_and_no_change_from_a_rejected_request(case: Any) -> None:
    assume(not _would_build(case))
    _bounded(case)
    before = state()
    response = case.call()
    _clean(case, response)
    body = response.content[:300].decode("utf-8", "replace")  # a backup is binary
    where = f"{case.method} {case.formatted_path} -> {response.status_code}: {body}"
    assert response.status_code < 500, where
    if 400 <= response.status_code < 500:
        assert state() == before, f"a rejected request changed the store: {where}"
        assert set(response.json()["error"]) == {"code", "message", "field"}, where
    elif response.status_code == 202 and response.headers.get("location"):
        with TestClient(APP) as client:  # the same application, asked directly
            client.get(response.headers["location"][0] + "/wait", params={"timeout": 60})
