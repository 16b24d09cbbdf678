"""The default process of an image, as an OCI image config records it.

Imported OCI images carry an ``Entrypoint``, ``Cmd``, ``Env`` and
``WorkingDir``; popek keeps them in the manifest so that a container engine
can run what the image's author meant.  Images without one boot ``/sbin/init``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from popek.errors import ImageError

MAX_ITEMS = 4096
MAX_CHARS = 65536


@dataclass(frozen=True)
class Process:
    """What to run in a container of the image (all parts optional)."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""

    def __post_init__(self) -> None:
        for key in ("entrypoint", "cmd", "env"):
            _check_strings(key, getattr(self, key))
        for item in self.env:
            name, sep, _ = item.partition("=")
            if not sep or not name:
                raise ImageError(f"process env entry {item!r} is not NAME=VALUE")
        if not isinstance(self.working_dir, str) or "\0" in self.working_dir:
            raise ImageError("process 'working_dir' must be a string without NUL")
        if self.working_dir and not self.working_dir.startswith("/"):
            raise ImageError(f"process working_dir {self.working_dir!r} is not an absolute path")

    @property
    def args(self) -> tuple[str, ...]:
        """The command line: entrypoint followed by cmd (may be empty)."""
        return self.entrypoint + self.cmd

    def to_doc(self) -> dict[str, Any]:
        """Return the JSON form used in ``manifest.json``."""
        return {
            "entrypoint": list(self.entrypoint),
            "cmd": list(self.cmd),
            "env": list(self.env),
            "working_dir": self.working_dir,
        }

    @classmethod
    def from_doc(cls, doc: object) -> Process:
        """Parse the JSON form; raise :class:`ImageError` saying what is wrong."""
        if not isinstance(doc, dict):
            raise ImageError("manifest field 'process' must be an object")
        unknown = sorted(set(doc) - {"entrypoint", "cmd", "env", "working_dir"})
        if unknown:
            raise ImageError(f"manifest 'process' has unknown field(s): {', '.join(unknown)}")
        parts: dict[str, tuple[str, ...]] = {}
        for key in ("entrypoint", "cmd", "env"):
            value = doc.get(key, [])
            if not isinstance(value, list):
                raise ImageError(f"manifest 'process.{key}' must be a list of strings")
            parts[key] = tuple(value)
        working_dir = doc.get("working_dir", "")
        return cls(working_dir=working_dir, **parts)


def _check_strings(key: str, value: object) -> None:
    if not isinstance(value, tuple) or len(value) > MAX_ITEMS:
        raise ImageError(f"process '{key}' must be a list of at most {MAX_ITEMS} strings")
    for item in value:
        if not isinstance(item, str) or "\0" in item or len(item) > MAX_CHARS:
            raise ImageError(
                f"process '{key}' item {item!r} must be a string without NUL, "
                f"at most {MAX_CHARS} characters"
            )
