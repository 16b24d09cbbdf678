"""Fixtures shared by the unit tests (no root, no engines)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from popek.state import hostwide
from popek.state.store import SQLiteStore
from popek.trust.keys import TrustStore


@pytest.fixture(autouse=True)
def private_host_registry(tmp_path_factory: pytest.TempPathFactory,
                          monkeypatch: pytest.MonkeyPatch) -> Path:
    """Unit tests never touch the host-wide uid registry: each gets a registry of its own."""
    directory = tmp_path_factory.mktemp("popek-host")
    monkeypatch.setattr(hostwide, "HOST_DIR", directory)
    return directory


@pytest.fixture
def trust(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TrustStore]:
    """A trust store over a fresh state store; private keys go to a private POPEK_HOME."""
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    store = SQLiteStore(tmp_path / "state.db")
    yield TrustStore(store)
    store.close()
