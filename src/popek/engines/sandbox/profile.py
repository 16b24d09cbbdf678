"""Sandbox profiles: TOML files under ``$POPEK_HOME/profiles``, validated strictly.

A profile says what one sandboxed application may have: the network, extra
host paths (read-only or read-write), environment variables, resource limits
and extra syscalls to deny.  The schema is documented in ``docs/SANDBOX.md``.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from popek.errors import InvalidInput

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
NAME_RULE = "a-z, 0-9, '-' and '_', starting with a letter or digit, 1-63 characters"
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
KEYS = {"network": "a boolean", "ro": "a list of paths", "rw": "a list of paths",
        "env": "a table of strings", "limits": "a table", "seccomp_extra": "a list of syscalls"}
LIMIT_KEYS = {"memory": "a size string such as \"512MiB\"", "nproc": "a whole number >= 1",
              "nofile": "a whole number >= 16", "cpu_seconds": "a whole number >= 1"}
FORBIDDEN_TREES = ("/proc", "/sys", "/dev")
MIN_MEMORY = 16 << 20


@dataclass(frozen=True)
class Limits:
    """Resource limits of the application (``None``: not limited). ``memory`` is in bytes."""

    memory: int | None = None
    nproc: int | None = None
    nofile: int | None = None
    cpu_seconds: int | None = None


@dataclass(frozen=True)
class Profile:
    """A parsed, validated sandbox profile."""

    name: str
    path: Path | None = None
    network: bool = False
    ro: tuple[Path, ...] = ()
    rw: tuple[Path, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    seccomp_extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunOptions:
    """What the caller (the CLI flags) adds to a profile for one run.

    ``network`` only turns the network on; ``ro``/``rw`` add paths (a path given
    here overrides the profile's mode for it); ``memory`` replaces the
    profile's limit; ``env`` adds variables (the CLI passes the host's TERM and
    LANG); ``timeout`` kills the sandbox after that many seconds.
    """

    network: bool = False
    ro: tuple[Path, ...] = ()
    rw: tuple[Path, ...] = ()
    memory: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid profile name, else raise :class:`InvalidInput`."""
    if not NAME.match(name):
        raise InvalidInput(f"invalid profile name {name!r}; allowed: {NAME_RULE}")
    return name


def check_bind_path(text: str, what: str) -> Path:
    """Validate a host path to bind into the sandbox and return it resolved (no symlinks).

    It must be absolute, exist, and be neither ``/`` nor inside /proc, /sys or
    /dev.  Raises :class:`InvalidInput` naming ``what`` (e.g. ``--ro``).
    """
    allowed = "an absolute path that exists, other than / and not under /proc, /sys or /dev"
    if not isinstance(text, str) or not text.startswith("/") or "\0" in text:
        raise InvalidInput(f"{what} {text!r}: not an absolute path; allowed: {allowed}")
    if not os.path.lexists(text):
        raise InvalidInput(f"{what} {text!r}: does not exist; allowed: {allowed}")
    real = Path(os.path.realpath(text))
    if real == Path("/"):
        raise InvalidInput(f"{what} {text!r}: the whole host file system cannot be bound; "
                           f"allowed: {allowed}")
    for tree in FORBIDDEN_TREES:
        if real.is_relative_to(tree):
            shown = f"{text!r}" if str(real) == text else f"{text!r} (-> {real})"
            raise InvalidInput(f"{what} {shown}: is under {tree}, which the sandbox never "
                               f"shares with the host; allowed: {allowed}")
    return real


def parse_profile(name: str, path: Path | None, text: str) -> Profile:
    """Parse and validate the TOML ``text`` of profile ``name`` (read from ``path``).

    Raises :class:`InvalidInput` ``"profile 'x' (/path): <what>; allowed: ..."``
    for a TOML syntax error (with its line), an unknown key, a wrong type, a
    bad size, a bad path or an unknown syscall name.
    """
    where = f"profile {name!r} ({path or 'built-in'})"

    def bad(what: str, allowed: str) -> InvalidInput:
        return InvalidInput(f"{where}: {what}; allowed: {allowed}")

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise bad(f"not valid TOML: {exc}", "TOML as described in docs/SANDBOX.md") from exc
    for key in data:
        if key not in KEYS:
            raise bad(f"unknown key {key!r}", ", ".join(f"{k} ({v})" for k, v in KEYS.items()))
    network = data.get("network", False)
    if not isinstance(network, bool):
        raise bad(f"network is {network!r}", "true or false")
    ro = tuple(_paths(data, "ro", bad))
    rw = tuple(_paths(data, "rw", bad))
    env = _env(data.get("env", {}), bad)
    limits = _limits(data.get("limits", {}), bad)
    extra = data.get("seccomp_extra", [])
    if not isinstance(extra, list) or not all(isinstance(s, str) for s in extra):
        raise bad(f"seccomp_extra is {extra!r}", "a list of syscall names")
    from popek.engines import seccomp

    try:
        names = seccomp.check_names(extra, "seccomp_extra")
    except InvalidInput as exc:
        raise InvalidInput(f"{where}: {exc}") from None
    return Profile(name=name, path=path, network=network, ro=ro, rw=rw, env=env,
                   limits=limits, seccomp_extra=names)


def _paths(data: dict[str, Any], key: str, bad: Any) -> list[Path]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise bad(f"{key} is {value!r}", "a list of absolute paths (strings)")
    result = []
    for text in value:
        try:
            result.append(check_bind_path(text, key))
        except InvalidInput as exc:
            msg = exc.message.split("; allowed: ")
            raise bad(msg[0], msg[-1]) from None
    return result


def _env(value: Any, bad: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise bad(f"env is {value!r}", "a table of NAME = \"value\" strings")
    for key, val in value.items():
        if not ENV_NAME.match(key):
            raise bad(f"env name {key!r} is invalid", "letters, digits and '_', not first a digit")
        if not isinstance(val, str) or "\0" in val:
            raise bad(f"env.{key} is {val!r}", "a string without NUL characters")
    return dict(value)


def _limits(value: Any, bad: Any) -> Limits:
    if not isinstance(value, dict):
        raise bad(f"limits is {value!r}", "a table with " + ", ".join(LIMIT_KEYS))
    for key in value:
        if key not in LIMIT_KEYS:
            raise bad(f"unknown key limits.{key}",
                      ", ".join(f"limits.{k} ({v})" for k, v in LIMIT_KEYS.items()))
    memory = value.get("memory")
    if memory is not None:
        from popek.units import parse_size

        if not isinstance(memory, str):
            raise bad(f"limits.memory is {memory!r}", LIMIT_KEYS["memory"])
        try:
            memory = parse_size(memory, "limits.memory")
        except InvalidInput as exc:
            raise bad(re.split(r"[:;] expected", exc.message)[0], LIMIT_KEYS["memory"]) from None
        if memory < MIN_MEMORY:
            raise bad(f"limits.memory {value['memory']!r} is too small", "at least 16MiB")
    counts: dict[str, int | None] = {}
    for key, low in (("nproc", 1), ("nofile", 16), ("cpu_seconds", 1)):
        count = value.get(key)
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)
                                  or count < low):
            raise bad(f"limits.{key} is {count!r}", LIMIT_KEYS[key])
        counts[key] = count
    return Limits(memory=memory, **counts)


def merge(profile: Profile, options: RunOptions) -> Profile:
    """Return ``profile`` with the run's ``options`` applied (flags win over the profile)."""
    ro = [p for p in profile.ro if p not in options.rw] + list(options.ro)
    rw = [p for p in profile.rw if p not in options.ro] + list(options.rw)
    limits = profile.limits
    if options.memory is not None:
        if options.memory < MIN_MEMORY:
            raise InvalidInput(f"--memory {options.memory} bytes is too small; allowed: "
                               "at least 16MiB")
        limits = replace(limits, memory=options.memory)
    return replace(profile, network=profile.network or options.network,
                   ro=tuple(dict.fromkeys(ro)), rw=tuple(dict.fromkeys(rw)),
                   env={**options.env, **profile.env}, limits=limits)
