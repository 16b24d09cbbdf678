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

from framework import REPO, is_host_skip, popek


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _refuse_security_skip(report: pytest.TestReport | pytest.CollectReport, where: str) -> None:
    """Turn a skip in tests/security into a failure unless a host property excuses it."""
    if "/security/" not in where or not report.skipped:
        return
    reason = _skip_reason(report)
    if is_host_skip(reason):
        return
    report.outcome = "failed"
    report.longrepr = (f"a security test skipped for a reason that is not a documented "
                       f"host property (docs/THREAT_MODEL.md): {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """No silent skip of a security promise: see _refuse_security_skip."""
    outcome = yield
    report = outcome.get_result()
    _refuse_security_skip(report, str(item.path))
    if report.skipped and isinstance(report.longrepr, tuple):
        # -rs names the test that skipped, not framework.host_skip's own line
        path, lineno, _ = item.location
        report.longrepr = (path, (lineno or 0) + 1, report.longrepr[2])


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """The same for a whole security module skipped while it is collected."""
    outcome = yield
    _refuse_security_skip(outcome.get_result(), str(collector.path))


@pytest.fixture(scope="session")
def popek_home() -> Iterator[Path]:
    """A fresh POPEK_HOME that unprivileged QEMU uids can traverse (not under /tmp/pytest-*)."""
    if os.geteuid() != 0:
        pytest.skip("integration tests need root")
    home = Path(tempfile.mkdtemp(prefix="popek-test-", dir="/var/tmp"))
    home.chmod(0o755)
    os.environ["POPEK_HOME"] = str(home)
    # every `popek serve` a test starts runs the CLI's command server (issue 14.1): on a
    # socket of this session, never taking over the installation's shared one
    os.environ.setdefault("POPEK_CLI_SOCKET", str(home / "run" / "cli.sock"))
    os.environ.setdefault("POPEK_CACHE", str(REPO / ".cache" / "popek"))
    yield home
    for inst in (home / "instances").glob("*/*") if (home / "instances").exists() else []:
        popek("delete", "--force", inst.name, "--project", inst.parent.name, check=False)
    # networks a failed fixture left (their bridges and dnsmasq would outlive the home),
    # of every project (a project lists its own and default's)
    projects = popek("project", "list", "--format", "json", check=False)
    for project in json.loads(projects.stdout or "[]") if projects.returncode == 0 else []:
        nets = popek("network", "list", "--format", "json", "--project", project["name"],
                     check=False)
        for net in json.loads(nets.stdout or "[]") if nets.returncode == 0 else []:
            if net.get("project", "default") == project["name"]:
                popek("network", "delete", "--force", net["name"], "--project",
                      project["name"], check=False)
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
