"""A bug inside popek reaches the user as one line and exit 70, never as a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
from popek.cli import entry
def boom():
    raise KeyError("lost")
entry.finish(boom, lambda code, error: print(f"audited {code} {error}"))
"""


def run(debug: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "POPEK_DEBUG"}
    if debug:
        env["POPEK_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=30, check=False)


def test_an_internal_error_is_one_line_exit_70_and_audited() -> None:
    proc = run(debug=False)
    assert proc.returncode == 70
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "KeyError: 'lost'" in proc.stderr and "this is a bug" in proc.stderr
    assert proc.stdout == "audited 70 internal error: KeyError: 'lost'\n"


def test_popek_debug_shows_the_traceback() -> None:
    proc = run(debug=True)
    assert proc.returncode == 70 and "Traceback" in proc.stderr and "in boom" in proc.stderr
