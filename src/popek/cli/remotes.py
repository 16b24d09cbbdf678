"""The remotes a user has added (``popek remote``) and ``REMOTE:NAME`` on the command line.

A remote is another popek host's REST API (``popek serve``): a name, a URL
(``https://HOST:PORT`` or ``unix:///path/to/api.sock``), for https the SHA-256
fingerprint of the certificate pinned when it was added, and how the client
authenticates (``auth``): a bearer token, or this user's TLS client
certificate (:mod:`popek.cli.clientcert`).
They are kept in the user's own ``$XDG_CONFIG_HOME/popek/remotes.json``
(``~/.config/popek/remotes.json``; directory 0700, file 0600: it holds the
tokens), with the default remote that ``popek remote switch`` chose.  The
remote ``local`` always exists: this host, in-process.

An instance is named ``REMOTE:NAME`` (``lab:web``) wherever the CLI names one;
an instance name never holds ``:`` (:data:`popek.names.NAME_RULE`), so a colon
always means a remote.  Every other named object is ``REMOTE:NAME`` the same
way (:func:`locate`), and a command with no object takes an optional
``REMOTE:`` argument (:func:`list_target`); both fall back to the default
remote.  A command that has no API route refuses while another default is
chosen (:func:`here_only`): it never acts on this host by mistake.  Light on
purpose: the fast path of every instance command asks :func:`locate` and only
reads the file; the HTTP client
(:mod:`popek.cli.remoteclient`) is imported only when a remote is named.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popek.errors import InvalidInput, NotFound

#: the remote that is this host, in-process; it always exists
LOCAL = "local"
REMOTE_RULE = ("1 to 63 characters: lower-case letters a-z, digits 0-9, '-' and '_', "
               "starting with a letter")
_REMOTE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
SCHEMES = ("https://", "unix://")


#: how a client authenticates to a remote: a bearer token, or its TLS client certificate
TOKEN, CERTIFICATE = "token", "certificate"


@dataclass(frozen=True)
class Remote:
    """One remote: where it is, the certificate pinned (https), the token (never shown) and
    how the client authenticates (``auth``: :data:`TOKEN`, :data:`CERTIFICATE`, or empty:
    a unix socket without a token)."""

    name: str
    url: str
    fingerprint: str = ""
    token: str = ""
    auth: str = ""

    def public(self) -> dict[str, Any]:
        """What ``popek remote list`` shows of it: everything but the token."""
        return {"name": self.name, "url": self.url, "fingerprint": self.fingerprint,
                "token": "yes" if self.token else "no", "auth": self.auth}


def config_path() -> Path:
    """``$XDG_CONFIG_HOME/popek/remotes.json`` (``~/.config/popek/remotes.json``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "popek" / "remotes.json"


def load() -> dict[str, Any]:
    """The config: ``{"default": NAME, "remotes": {NAME: {url, fingerprint, token, auth}}}``."""
    path = config_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {"default": LOCAL, "remotes": {}}
    except OSError as exc:
        raise InvalidInput(f"cannot read the remotes file {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("remotes", {}), dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise InvalidInput(f"the remotes file {path} is not valid JSON ({exc}); fix or "
                           "remove it") from exc
    data.setdefault("remotes", {})
    data.setdefault("default", LOCAL)
    return data


def save(data: dict[str, Any]) -> None:
    """Write the config atomically, the file 0600 in a 0700 directory."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def check_name(name: str) -> str:
    """``name`` if it may name a remote; else InvalidInput naming the rule."""
    if not _REMOTE.match(name):
        raise InvalidInput(f"invalid remote name {name!r}: use {REMOTE_RULE}")
    return name


def check_url(url: str) -> str:
    """``url`` if it is one popek reaches (``https://HOST[:PORT]``, ``unix:///PATH``)."""
    if url.startswith("unix://"):
        if not url[len("unix://"):].startswith("/"):
            raise InvalidInput(f"invalid remote URL {url!r}: a socket is unix:///absolute/path")
        return url
    if url.startswith("https://") and len(url) > len("https://"):
        return url.rstrip("/")
    raise InvalidInput(f"invalid remote URL {url!r}: use https://HOST[:PORT] (popek serve "
                       "--listen) or unix:///path/to/api.sock")


def get(name: str) -> Remote:
    """The remote called ``name``; NotFound saying how to list and add them."""
    entry = load()["remotes"].get(name)
    if not isinstance(entry, dict):
        raise NotFound(f"remote {name} not found: popek remote list shows them, popek remote "
                       "add NAME URL adds one")
    token = str(entry.get("token", ""))
    auth = str(entry.get("auth", "")) or (TOKEN if token else "")
    return Remote(name, str(entry.get("url", "")), str(entry.get("fingerprint", "")), token,
                  auth)


def all_remotes() -> list[Remote]:
    """Every remote, ``local`` first, then by name."""
    remotes = load()["remotes"]
    return [Remote(LOCAL, "in-process (this host)")] + [get(n) for n in sorted(remotes)]


def default() -> str:
    """The remote ``popek remote switch`` chose (``local`` unless one was)."""
    path = config_path()
    try:  # the fast path's one look: usually no file at all
        if path.stat().st_size == 0:
            return LOCAL
    except OSError:
        return LOCAL
    chosen = load().get("default", LOCAL)
    return chosen if isinstance(chosen, str) and chosen else LOCAL


def locate(target: str, what: str = "instance") -> tuple[str, str] | None:
    """``(remote, name)`` when ``target`` is on a remote, ``None`` when it is local.

    ``lab:web`` is ``web`` on ``lab``; ``local:web`` and, unless ``remote switch``
    chose another default, ``web`` are local.  InvalidInput for ``lab:`` with no
    name and for a remote name against the rule.
    """
    if ":" in target:
        remote, _, name = target.partition(":")
        check_name(remote)
        if not name:
            raise InvalidInput(f"no {what} name after {remote}: in {target!r}: name it as "
                               "REMOTE:NAME (e.g. lab:web)")
    else:
        remote, name = default(), target
    return None if remote == LOCAL else (remote, name)


def list_target(target: str | None, command: str = "popek list") -> str | None:
    """The remote ``popek list [REMOTE:]`` (``command``) lists (``None``: this host)."""
    if target is None:
        remote = default()
    else:
        remote, colon, rest = target.partition(":")
        if not colon or rest:
            raise InvalidInput(f"{command}: {target!r} is not a remote: name it with a "
                               "colon, as lab: (popek remote list shows them)")
        check_name(remote)
    return None if remote == LOCAL else remote



def here_only(command: str, local_form: str = "") -> None:
    """Refuse ``command``, which acts on this host only (no API route), while ``popek remote
    switch`` chose another default remote: it never acts here silently.  ``local_form``: the
    command line that names this host explicitly (``... local:``), when it has one."""
    remote = default()
    if remote != LOCAL:
        explicit = f"{local_form}, or " if local_form else ""
        raise InvalidInput(f"{command} acts on this host only and the default remote is "
                           f"{remote} (popek remote switch): to act on this host, "
                           f"{explicit}popek remote switch local first")
