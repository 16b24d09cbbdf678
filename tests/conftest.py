"""Shared pytest set-up: the framework helpers (tests/framework) and the fixtures
of the suites that run real engines: a private POPEK_HOME and the minimal image.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from framework import REPO, popek


@pytest.fixture(scope="session")
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
    # networks a failed fixture left (their bridges and dnsmasq would outlive the home)
    nets = popek("network", "list", "--format", "json", check=False)
    for net in json.loads(nets.stdout or "[]") if nets.returncode == 0 else []:
        popek("network", "delete", "--force", net["name"], check=False)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def minimal_image(popek_home: Path) -> str:
    """The minimal image, built once per session from the cached Debian packages."""
    popek("image", "build", "minimal", timeout=900)
    return "minimal"


CHANNEL_POLICY = """\
version = 1
labels = ["default", "shares"]

[[share]]
kind = "network"
labels = ["default", "shares"]

[[share]]
kind = "volume"
labels = ["default"]

[[share]]
kind = "channel"
labels = ["shares"]
"""


@pytest.fixture(scope="session")
def channel_label(popek_home: Path) -> str:
    """A label the session's policy lets use host channels (``--mount``); none by default."""
    popek("policy", "apply", "-", stdin=CHANNEL_POLICY.encode())
    return "shares"
