"""Fixtures shared by the unit tests (no root, no engines)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from popek.state.store import SQLiteStore
from popek.trust.keys import TrustStore


@pytest.fixture
def trust(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TrustStore]:
    """A trust store over a fresh state store; private keys go to a private POPEK_HOME."""
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    store = SQLiteStore(tmp_path / "state.db")
    yield TrustStore(store)
    store.close()
