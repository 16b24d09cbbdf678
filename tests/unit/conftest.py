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


@pytest.fixture(autouse=True)
def fresh_refusal_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's refused credentials have a budget of their own: the process's
    (popek.core.refusals, 20 records a minute per client address) would otherwise be
    spent by the tests before, all of whose clients are starlette's ``testclient``."""
    from popek.core import authn
    from popek.core.refusals import RefusalBudget

    monkeypatch.setattr(authn, "REFUSALS", RefusalBudget())


@pytest.fixture
def trust(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TrustStore]:
    """A trust store over a fresh state store; private keys go to a private POPEK_HOME."""
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    store = SQLiteStore(tmp_path / "state.db")
    yield TrustStore(store)
    store.close()
