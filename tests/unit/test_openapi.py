"""The committed OpenAPI document (docs/openapi.json) is what the API's code gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from popek.api import openapi

REPO = Path(__file__).resolve().parents[2]


def test_committed_openapi_matches_the_code() -> None:
    committed = REPO / openapi.COMMITTED
    assert committed.exists(), f"{openapi.COMMITTED} is missing: run {openapi.REGENERATE}"
    if committed.read_text() != openapi.render():
        pytest.fail(f"{openapi.COMMITTED} differs from what the API's code gives: run "
                    f"`{openapi.REGENERATE}` (python -m popek.api.openapi) and commit it")


def test_the_document_is_the_served_one_and_lists_metrics() -> None:
    from fastapi.testclient import TestClient

    from popek.api.app import create_app

    with TestClient(create_app()) as client:
        served = client.get("/1.0/openapi.json").json()
    assert served == json.loads(openapi.render())
    assert "/metrics" in served["paths"]


def test_check_mode_says_how_to_regenerate(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "openapi.json"
    stale.write_text("{}\n")
    assert openapi.main([str(stale), "--check"]) == 1
    assert "run make openapi and commit it" in capsys.readouterr().err
    assert openapi.main([str(stale)]) == 0
    assert openapi.main([str(stale), "--check"]) == 0
    assert json.loads(stale.read_text())["info"]["title"] == "popek"
