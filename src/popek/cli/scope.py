"""The project a CLI command acts in, and where ``popek project switch`` keeps it.

In order: the command's ``--project``, else ``$POPEK_PROJECT``, else the project
``popek project switch`` stored in ``POPEK_HOME/client.json``, else ``default``.
Light on purpose (no Typer): the fast path of the instance commands imports it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from popek import paths
from popek.names import DEFAULT_PROJECT

ENV = "POPEK_PROJECT"
#: the ``--project`` of the command being run (set by :func:`use`)
_ASKED: list[str | None] = [None]


def client_config() -> Path:
    """The CLI user's settings on this host (the current project)."""
    return paths.home() / "client.json"


def stored() -> str | None:
    """The project ``popek project switch`` chose, if any."""
    try:
        data = json.loads(client_config().read_text())
    except (OSError, ValueError):
        return None
    project = data.get("project") if isinstance(data, dict) else None
    return project if isinstance(project, str) and project else None


def use(project: str | None) -> None:
    """The command's ``--project`` (``None``: not given)."""
    _ASKED[0] = project


def current() -> str:
    """The project the command acts in (see the module)."""
    return _ASKED[0] or os.environ.get(ENV) or stored() or DEFAULT_PROJECT


def switch(project: str) -> None:
    """Make ``project`` the current one of later commands (``client.json``, mode 0600)."""
    path = client_config()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data = data if isinstance(data, dict) else {}
    data["project"] = project
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)
