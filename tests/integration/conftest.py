"""Integration fixtures: a private POPEK_HOME, the minimal image built once, root required."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework import REPO, popek


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def popek_home() -> Iterator[Path]:
    """A fresh POPEK_HOME that unprivileged QEMU uids can traverse (not under /tmp/pytest-*)."""
    if os.geteuid() != 0:
        pytest.skip("integration tests need root")
    home = Path(tempfile.mkdtemp(prefix="popek-test-", dir="/var/tmp"))
    home.chmod(0o755)
    os.environ["POPEK_HOME"] = str(home)
    os.environ.setdefault("POPEK_CACHE", str(REPO / ".cache" / "popek"))
    yield home
    for inst in (home / "instances" / "default").glob("*") if (home / "instances").exists() else []:
        popek("delete", "--force", inst.name, check=False)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def minimal_image(popek_home: Path) -> str:
    """The minimal image, built once per session from the cached Debian packages."""
    popek("image", "build", "minimal", timeout=900)
    return "minimal"
