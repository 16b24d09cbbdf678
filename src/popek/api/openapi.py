"""The API's OpenAPI document, as committed in ``docs/openapi.json`` (``make openapi``).

The document is what :func:`popek.api.app.create_app` serves at
``/1.0/openapi.json``, written with sorted keys and a final newline so that
the same code always gives the same bytes.  ``tests/unit/test_openapi.py``
fails when the committed file differs from what the code gives.

``python -m popek.api.openapi [PATH]`` writes it (default ``docs/openapi.json``
of the checkout); ``--check`` only compares, exit 1 when they differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: the committed document, relative to the repository's root
COMMITTED = Path("docs") / "openapi.json"
REGENERATE = "make openapi"


def document() -> dict[str, Any]:
    """The OpenAPI document of the application (the local one: the routes are the same)."""
    from popek.api.app import create_app

    doc: dict[str, Any] = create_app().openapi()
    return doc


def render(doc: dict[str, Any] | None = None) -> str:
    """The document as committed: indented JSON, sorted keys, a final newline."""
    return json.dumps(document() if doc is None else doc, indent=2, sort_keys=True,
                      ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Write (or with ``--check`` compare) the committed document; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m popek.api.openapi",
                                     description="Write the API's OpenAPI document.")
    parser.add_argument("path", nargs="?", default=str(COMMITTED))
    parser.add_argument("--check", action="store_true",
                        help="only compare with the file; exit 1 when it differs")
    args = parser.parse_args(argv)
    path, text = Path(args.path), render()
    if args.check:
        if not path.exists() or path.read_text() != text:
            print(f"{path} differs from the API's code: run {REGENERATE} and commit it",
                  file=sys.stderr)
            return 1
        return 0
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
