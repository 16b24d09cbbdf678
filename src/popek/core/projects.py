"""Project defaults: what an instance of a project gets when its launch does not say.

One key per project (``/popek/projects/P/config``, JSON).  Today it holds
``limits.disk``, the size of a new container's writable layer; an instance's
own ``limits.disk`` (``launch --disk``, ``config set``) wins over it.
"""

from __future__ import annotations

import json
from typing import Any

from popek.engines.container.disk import DEFAULT_DISK, check_size
from popek.errors import InvalidInput
from popek.state.store import StateStore
from popek.units import format_size, parse_size

PROJECT_KEYS = ("limits.disk",)
PREFIX = "/popek/projects/"


def _key(project: str) -> str:
    return f"{PREFIX}{project}/config"


class Projects:
    """The defaults of each project, in the state store."""

    def __init__(self, store: StateStore) -> None:
        """Over ``store``."""
        self.store = store

    def _load(self, project: str) -> dict[str, Any]:
        kv = self.store.get(_key(project))
        data = json.loads(kv.value) if kv is not None else {}
        return data if isinstance(data, dict) else {}

    def disk(self, project: str) -> int:
        """The ``limits.disk`` a new container of ``project`` gets."""
        return int(self._load(project).get("limits.disk", DEFAULT_DISK))

    def show(self, project: str) -> dict[str, str]:
        """Every default of ``project``, as the CLI shows them (set or built in)."""
        return {"limits.disk": format_size(self.disk(project))}

    def set(self, project: str, key: str, value: str) -> None:
        """Set default ``key`` of ``project``; existing instances keep their own value."""
        if key not in PROJECT_KEYS:
            raise InvalidInput(f"unknown project key {key!r}; allowed: {', '.join(PROJECT_KEYS)}")
        data = self._load(project)
        data[key] = check_size(parse_size(value, key))
        self.store.put(_key(project), json.dumps(data).encode())
