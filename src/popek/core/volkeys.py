"""The volume keys core hands to storage: the secret store's (``trust/secrets.py``).

Storage and trust are services of one layer and do not import each other;
core joins them by giving :class:`popek.storage.service.Storage` this
function.
"""

from __future__ import annotations

from popek.trust.secrets import Secrets


def volume_key(project: str, create: bool) -> str:
    """The volume key of ``project`` (made now when ``create`` and it has none)."""
    return Secrets().volume_key(project, create)
