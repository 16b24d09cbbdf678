"""Names and labels every layer validates the same way (a small shared helper).

Instance names are DNS labels; access control labels name the classes of
instances the policy speaks of.  Both rules live here, below core, network
and trust, so that the policy (trust) checks a label without importing core.
"""

from __future__ import annotations

import re

from popek.errors import InvalidInput

NAME_RULE = ("1 to 63 characters: lower-case letters a-z, digits 0-9 and '-', "
             "starting with a letter and not ending with '-'")
_NAME = re.compile(r"^[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?$")
DEFAULT_PROJECT = "default"
DEFAULT_LABEL = "default"
LABEL_RULE = "1-63 characters from a-z, 0-9, '-' and '_', starting with a letter"
_LABEL = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


def check_label(label: str) -> str:
    """Return ``label`` when it is a valid access control label; raise :class:`InvalidInput`."""
    if not isinstance(label, str) or not _LABEL.match(label):
        raise InvalidInput(f"invalid label {label!r}: use {LABEL_RULE}")
    return label


def validate_name(name: str, what: str = "instance name") -> str:
    """Return ``name`` when it is a valid name (a DNS label); raise :class:`InvalidInput`."""
    if not _NAME.match(name):
        raise InvalidInput(f"invalid {what} {name!r}: use {NAME_RULE}")
    return name
