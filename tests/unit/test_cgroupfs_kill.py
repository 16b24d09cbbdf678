"""cgroupfs.kill_listed: what both cgroup kills (an instance's, a reset's) rest on."""

from __future__ import annotations

import subprocess

import pytest

from popek import proc
from popek.engines import cgroupfs
from popek.errors import EngineError


def test_kill_listed_kills_what_is_listed_until_nothing_is() -> None:
    child = subprocess.Popen(["sleep", "60"])
    try:
        def targets() -> list[int]:
            return [child.pid] if child.poll() is None else []

        assert cgroupfs.kill_listed(targets, "a test") == [child.pid]
        assert child.returncode == -9
        assert cgroupfs.kill_listed(targets, "a test") == []  # nothing listed: nothing done
    finally:
        child.kill()
        child.wait()


def test_kill_listed_names_what_outlived_the_timeout() -> None:
    child = subprocess.Popen(["sleep", "60"])
    try:
        # a pid that stays listed after it died (an unreaped zombie, say) outlives any kill
        with pytest.raises(EngineError, match=rf"processes \[{child.pid}\] of a test did not "
                                              r"die within 0s"):
            cgroupfs.kill_listed(lambda: [child.pid], "a test", timeout=0)
    finally:
        child.kill()
        child.wait()
    assert proc.start_time(child.pid) is None
