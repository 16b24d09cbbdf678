"""popek.proc.run: blocking wait, no polling delay, and a timeout that kills."""

from __future__ import annotations

import subprocess
import time

import pytest

from popek import proc


def test_run_returns_output_and_code() -> None:
    res = proc.run(["sh", "-c", "echo out; echo err >&2; exit 3"], 5, stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE, text=True)
    assert (res.returncode, res.stdout, res.stderr) == (3, "out\n", "err\n")


def test_run_does_not_add_polling_delay() -> None:
    # subprocess.run(timeout=...) sleeps in growing steps while it waits; proc.run blocks
    t0 = time.perf_counter()
    for _ in range(5):
        proc.run(["sleep", "0.03"], 5)
    assert (time.perf_counter() - t0) / 5 < 0.045


def test_run_kills_on_timeout() -> None:
    t0 = time.perf_counter()
    with pytest.raises(subprocess.TimeoutExpired):
        proc.run(["sleep", "5"], 0.2)
    assert time.perf_counter() - t0 < 2
