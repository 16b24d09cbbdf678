"""The suite's own rule: no silent skip of a security promise (tests/conftest.py).

A test under ``security/`` that skips for anything but a documented host
property (framework.HOST_PROPERTIES) must fail the run; a host-property skip
stays a skip and is listed with its reason.  Each case runs a real pytest
session over a copy of the suite's conftest and framework.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_plugin_autoload(monkeypatch: pytest.MonkeyPatch) -> None:
    """The inner sessions load no installed plugin (the suite's conftest needs none):
    schemathesis and hypothesis cost about 4.5 s of each run's 5 s here."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")


def _suite(pytester: pytest.Pytester, body: str) -> pytest.RunResult:
    shutil.copy(TESTS / "conftest.py", pytester.path / "conftest.py")
    shutil.copytree(TESTS / "framework", pytester.path / "framework")
    security = pytester.path / "security"
    security.mkdir()
    (security / "test_case.py").write_text(body)
    return pytester.runpytest_subprocess("-rs", "-p", "no:cacheprovider", str(security))


def test_plain_skip_in_security_fails(pytester: pytest.Pytester) -> None:
    result = _suite(pytester, "import pytest\n\ndef test_a():\n    pytest.skip('no gcc')\n")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*not a documented host property*no gcc*"])


def test_skipif_marker_in_security_fails(pytester: pytest.Pytester) -> None:
    result = _suite(pytester, "import pytest\n\n@pytest.mark.skipif(True, reason='lazy')\n"
                              "def test_a():\n    pass\n")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*not a documented host property*lazy*"])


def test_module_level_skip_in_security_fails(pytester: pytest.Pytester) -> None:
    result = _suite(pytester, "import pytest\npytest.skip('no tool', allow_module_level=True)\n"
                              "def test_a():\n    pass\n")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*not a documented host property*no tool*"])


def test_host_property_skip_is_listed_with_its_reason(pytester: pytest.Pytester) -> None:
    result = _suite(pytester, "from framework import host_skip\n\ndef test_a():\n"
                              "    host_skip('cgroup-version', 'needs cgroup v2')\n")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        ["SKIPPED*test_case.py*host property cgroup-version: needs cgroup v2"])


def test_undocumented_host_property_is_refused() -> None:
    import sys

    sys.path.insert(0, str(TESTS))
    from framework import host_skip

    with pytest.raises(ValueError, match="not a documented host property"):
        host_skip("gcc", "missing")
