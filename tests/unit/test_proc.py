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


def test_run_does_not_add_polling_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    """subprocess.run(timeout=...) sleeps in growing steps while it waits; proc.run blocks.

    Checked by what each one calls, not by the time taken (which a loaded host
    stretches): with ``time.sleep`` forbidden, subprocess.run fails (the control:
    the probe sees the polling) and proc.run still returns.
    """
    def forbidden(_seconds: float) -> None:
        raise AssertionError("slept while waiting for the child")

    monkeypatch.setattr(time, "sleep", forbidden)
    with pytest.raises(AssertionError, match="slept while waiting"):
        subprocess.run(["sleep", "0.03"], timeout=5, check=False)
    assert proc.run(["sleep", "0.03"], 5).returncode == 0


def test_run_kills_on_timeout() -> None:
    t0 = time.perf_counter()
    with pytest.raises(subprocess.TimeoutExpired):
        proc.run(["sleep", "5"], 0.2)
    assert time.perf_counter() - t0 < 2
