"""Where profiles live: ``$POPEK_HOME/profiles/NAME.toml``.

The shipped profiles (``default``, ``net``) are copied there on first use when
missing; a file already there is never overwritten, so an administrator's edits
stay.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from popek import paths
from popek.engines.sandbox.profile import Profile, check_name, parse_profile
from popek.errors import NotFound, PopekError

SHIPPED = ("default", "net")


def profiles_dir() -> Path:
    """Return the directory of the profiles (``$POPEK_HOME/profiles``)."""
    return paths.home() / "profiles"


def shipped_text(name: str) -> str:
    """Return the text of a profile shipped with popek."""
    return (resources.files("popek.engines.sandbox") / "profiles" / f"{name}.toml").read_text()


def install_shipped() -> None:
    """Copy each shipped profile into :func:`profiles_dir` if no file of that name is there.

    Raises :class:`PopekError` if the directory cannot be written.
    """
    target = profiles_dir()
    missing = [n for n in SHIPPED if not (target / f"{n}.toml").exists()]
    if not missing:
        return
    try:
        target.mkdir(mode=0o755, parents=True, exist_ok=True)
        for name in missing:
            tmp = target / f".{name}.toml.{os.getpid()}"
            tmp.write_text(shipped_text(name))
            try:
                os.link(tmp, target / f"{name}.toml")  # fails rather than overwrite
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
    except OSError as exc:
        raise PopekError(f"cannot install the shipped sandbox profiles into {target}: "
                         f"{exc.strerror}; set POPEK_HOME to a directory you can write") from exc


def names() -> list[str]:
    """Return the names of the installed profiles, sorted (installs the shipped ones first)."""
    install_shipped()
    return sorted(p.stem for p in profiles_dir().glob("*.toml") if not p.name.startswith("."))


def load(name: str) -> Profile:
    """Load and validate profile ``name``.

    Raises :class:`InvalidInput` for a bad name or a bad profile file and
    :class:`NotFound` (listing the available ones) for an unknown profile.
    """
    check_name(name)
    available = names()
    path = profiles_dir() / f"{name}.toml"
    if name not in available:
        raise NotFound(f"unknown sandbox profile {name!r}; available: {', '.join(available)} "
                       f"(files NAME.toml in {profiles_dir()})")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PopekError(f"cannot read profile {name!r} ({path}): {exc}") from exc
    return parse_profile(name, path, text)
