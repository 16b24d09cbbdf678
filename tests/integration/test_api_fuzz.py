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

``POST /1.0/networks`` and ``POST /1.0/images`` are left out: a valid
network would make a real bridge and dnsmasq on this host, a valid build
would build an image for minutes (tests/integration/test_networks.py and
test_api.py cover them).
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
from hypothesis import HealthCheck, settings

from popek.api.app import create_app
from popek.state import open_store

#: requests generated per operation (about 25 operations: some 40 s here in all)
EXAMPLES = 20
APP = create_app()
schema = (schemathesis.openapi.from_asgi("/1.0/openapi.json", APP)
          .exclude(method="POST", path="/1.0/networks")
          .exclude(method="POST", path="/1.0/images"))


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


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_error_and_no_change_from_a_rejected_request(case: Any) -> None:
    before = state()
    response = case.call()
    body = response.content[:300].decode("utf-8", "replace")  # a backup is binary
    where = f"{case.method} {case.formatted_path} -> {response.status_code}: {body}"
    assert response.status_code < 500, where
    if 400 <= response.status_code < 500:
        assert state() == before, f"a rejected request changed the store: {where}"
        assert set(response.json()["error"]) == {"code", "message", "field"}, where
    elif response.status_code == 202 and response.headers.get("location"):
        from starlette.testclient import TestClient

        with TestClient(APP) as client:  # the same application, asked directly
            client.get(response.headers["location"][0] + "/wait", params={"timeout": 60})
