"""The CLI never imports the REST API's libraries (FastAPI, pydantic, uvicorn, websockets).

``popek serve`` execs ``python -m popek.api``; the CLI's modules, its fast path
and the command server's preload (every popek module it imports ahead) stay
without them, so neither a launch nor the warm server pays for them.
"""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("fastapi", "pydantic", "uvicorn", "starlette", "websockets")


def _imported_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\n"
                          "print(' '.join(sorted(m for m in sys.modules)))"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    return {m.split(".")[0] for m in out.split()}


def test_cli_and_fast_path_do_not_import_the_api() -> None:
    mods = _imported_after("import popek.cli.main, popek.cli.fastpath, popek.cli.serve")
    assert not mods & set(HEAVY), mods & set(HEAVY)


def test_command_server_preload_leaves_the_api_out() -> None:
    mods = _imported_after("from popek.cli import cmdserver\ncmdserver.preload()")
    assert not mods & set(HEAVY), mods & set(HEAVY)
    assert "popek" in mods
