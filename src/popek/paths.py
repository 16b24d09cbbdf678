"""Where popek keeps its files.

``POPEK_HOME`` (default ``/var/lib/popek``) holds the state database, images
and instance directories.  ``POPEK_CACHE`` (default ``$POPEK_HOME/cache``)
holds downloads that may be reused (Debian packages for image builds).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = "/var/lib/popek"


def home() -> Path:
    """Return the popek home directory (``$POPEK_HOME`` or ``/var/lib/popek``)."""
    return Path(os.environ.get("POPEK_HOME", DEFAULT_HOME))


def home_id() -> str:
    """A short id of this ``POPEK_HOME`` on this host (12 hex digits of its real path's SHA-256).

    Names the kernel sees host-wide (cgroups, device aliases) carry it, so that
    two homes with an instance of the same name never share one.
    """
    where = str(home())
    known = _HOME_IDS.get(where)
    if known is not None:
        return known
    import hashlib

    real = Path(where).resolve()
    ident = hashlib.sha256(str(real).encode()).hexdigest()[:12]
    if real.is_dir():  # a home not made yet may still become a symlink: asked again then
        _HOME_IDS[where] = ident
    return ident


#: :func:`home_id` of each home already asked about (a realpath is a few syscalls, and
#: ``popek info`` of a container asks twice)
_HOME_IDS: dict[str, str] = {}


def images_dir() -> Path:
    """Return the directory that holds one sub-directory per image."""
    return home() / "images"


def instances_dir() -> Path:
    """Return the directory that holds one sub-directory per instance."""
    return home() / "instances"


def cache_dir() -> Path:
    """Return the download cache (``$POPEK_CACHE`` or ``$POPEK_HOME/cache``)."""
    env = os.environ.get("POPEK_CACHE")
    return Path(env) if env else home() / "cache"


def state_db() -> Path:
    """Return the path of the SQLite state database."""
    return home() / "state.db"
