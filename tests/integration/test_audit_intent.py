"""The audit trail has no holes: a launch killed midway still has its records (issue 12, point 10).

Before the fix a request was audited only when it ended (in ``Core.handle``'s
``finally``): a ``popek launch`` killed with SIGKILL while QEMU booted left no
record at all, and the reconcile that rolled it back later left none either.
Now the intent (``started``, with what the request changes in words) is on
disk before anything is done, and the reconcile's outcome follows it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from framework import POPEK, popek, processes_mentioning, require_root_and_tools, wait_for

require_root_and_tools()

NAME = "h2-killed-launch"


@pytest.fixture(autouse=True)
def no_leftover() -> Iterator[None]:
    """The killed launch's instance goes when the test ends, passed or failed (a stopped
    leftover failed the next module's empty ``list``)."""
    yield
    popek("delete", "--force", NAME, check=False)


def records(home: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (home / "audit" / "log.jsonl").read_text().splitlines()]


def test_launch_killed_midway_leaves_intent_and_outcome(popek_home: Path,
                                                        minimal_image: str) -> None:
    workdir = popek_home / "instances" / "default" / NAME
    env = {**os.environ, "POPEK_CLI_SERVER": "off"}  # the launch runs in the process we kill
    proc = subprocess.Popen([*POPEK, "launch", minimal_image, NAME, "--memory", "256MiB"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)
    assert proc.stderr is not None
    try:
        said = b""
        while b"popek: booting" not in said:  # raw reads: no line waits in a buffer
            assert select.select([proc.stderr], [], [], 120)[0], "the launch never booted"
            chunk = os.read(proc.stderr.fileno(), 4096)
            assert chunk, f"the launch ended before it booted: {said.decode()}"
            said += chunk
        # midway: the instance directory exists and QEMU runs, the guest is not ready yet
        wait_for(lambda: workdir.is_dir() and processes_mentioning(str(workdir)), 60,
                 "QEMU of the launch to start")
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    mine = [r for r in records(popek_home) if r["target"] == NAME]
    launch = [r for r in mine if r["op"] == "instance.launch"]
    assert [r["result"] for r in launch] == ["started"], mine  # no outcome: it was killed
    assert 'image="minimal"' in launch[0]["change"]
    assert "memory=268435456" in launch[0]["change"].split()

    popek("list")  # the next command reconciles: the interrupted launch is rolled back
    mine = [r for r in records(popek_home) if r["target"] == NAME]
    assert [(r["op"], r["result"]) for r in mine][-1] == (
        "instance.reconcile", f"ok: {NAME}: interrupted start rolled back")
    assert processes_mentioning(str(workdir)) == []
    assert popek("audit", "verify").returncode == 0
    popek("delete", "--force", NAME)
