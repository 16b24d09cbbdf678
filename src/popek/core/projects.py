"""Projects: tenancy, each project's defaults and its quotas.

A project scopes instances (``/popek/instances/P/NAME``) and profiles; it exists
when it has its key ``/popek/projects/P/config`` (JSON), made by ``popek project
create``.  The project ``default`` always exists.  The key holds:

- ``default.limits.disk``: the size of a new container's writable layer (an
  instance's own ``limits.disk``, from ``launch --disk`` or ``config set``, wins);
- the quotas, each unset (no limit) until set: ``limits.instances`` (how many
  instances), ``limits.cpu`` (their vCPUs together), ``limits.memory`` (their memory
  together) and ``limits.disk`` (their containers' writable layers together).

Every instance counts, whatever its state (a stopped one may be started at any
time), so only a launch and a ``config set`` that grows an instance can go over
a quota: both are checked before anything is made or changed
(:meth:`Projects.check_quotas`).  Records written before projects had quotas
kept the container default as ``limits.disk``; they are read as
``default.limits.disk``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from popek.engines.container.disk import DEFAULT_DISK, check_size
from popek.errors import (
    WRONG_STATE,
    AlreadyExists,
    InvalidInput,
    NotFound,
    PopekError,
    ResourceError,
)
from popek.names import DEFAULT_PROJECT, validate_name
from popek.state.schema import PROJECTS_CONFIG_PREFIX, profiles_prefix, project_config_key
from popek.state.store import Compare, Delete, Put, StateStore
from popek.units import format_size, parse_size

if TYPE_CHECKING:
    from popek.core.model import Instance, InstanceSpec

DEFAULT_DISK_KEY = "default.limits.disk"
QUOTA_KEYS = ("limits.instances", "limits.cpu", "limits.memory", "limits.disk")
PROJECT_KEYS = (DEFAULT_DISK_KEY, *QUOTA_KEYS)
#: the quotas given in bytes (the others are counts)
_SIZES = ("limits.memory", "limits.disk")
#: the version of the stored document (1: the container default was ``limits.disk``)
_VERSION = 2
PREFIX = PROJECTS_CONFIG_PREFIX


def _key(project: str) -> str:
    return project_config_key(project)


class ProjectNotEmpty(PopekError):
    """A project still holds instances or profiles (they are named); nothing was deleted."""

    exit_code = WRONG_STATE


class QuotaExceeded(ResourceError):
    """A launch or a change would take a project over one of its quotas."""


def usage(instances: list[Instance]) -> dict[str, int]:
    """What ``instances`` use of each quota."""
    return {"limits.instances": len(instances),
            "limits.cpu": sum(i.spec.vcpus for i in instances),
            "limits.memory": sum(i.spec.memory for i in instances),
            "limits.disk": sum(int(i.spec.limits.get("disk", 0)) for i in instances)}


def _show(key: str, value: int) -> str:
    return format_size(value) if key in _SIZES or key == DEFAULT_DISK_KEY else str(value)


class Projects:
    """The projects of this host, their defaults and quotas, in the state store."""

    def __init__(self, store: StateStore) -> None:
        """Over ``store``."""
        self.store = store

    def _load(self, project: str) -> dict[str, Any]:
        kv = self.store.get(_key(project))
        data = json.loads(kv.value) if kv is not None else {}
        if not isinstance(data, dict):
            return {}
        if data.get("version", 1) < _VERSION and "limits.disk" in data:
            data[DEFAULT_DISK_KEY] = data.pop("limits.disk")
        return data

    def exists(self, project: str) -> bool:
        """Whether ``project`` exists (``default`` always does)."""
        return project == DEFAULT_PROJECT or self.store.get(_key(project)) is not None

    def require(self, project: str) -> str:
        """``project`` when it exists; NotFound naming the projects there are."""
        if not self.exists(project):
            raise NotFound(f"project {project!r} not found; existing projects: "
                           f"{', '.join(self.names())} (popek project create NAME)")
        return project

    def names(self) -> list[str]:
        """Every project, sorted, ``default`` among them."""
        found = {kv.key[len(PREFIX):].partition("/")[0] for kv in self.store.range(PREFIX)}
        return sorted(found | {DEFAULT_PROJECT})

    def create(self, project: str) -> None:
        """Make ``project`` (no quotas, the built-in defaults); AlreadyExists if it is there."""
        validate_name(project, "project name")
        if project == DEFAULT_PROJECT:
            raise AlreadyExists("project 'default' always exists")
        doc = json.dumps({"version": _VERSION}).encode()
        key = _key(project)
        if not self.store.txn([Compare(key, "version", "==", 0)], [Put(key, doc)]).succeeded:
            raise AlreadyExists(f"project {project!r} already exists")

    def delete(self, project: str, instances: list[str], networks: Sequence[str] = (),
               images: Sequence[str] = (), volumes: Sequence[str] = ()) -> None:
        """Delete ``project``; refused while it holds ``instances``, profiles, ``networks``,
        ``images`` or ``volumes`` (named)."""
        if project == DEFAULT_PROJECT:
            raise InvalidInput("the project 'default' cannot be deleted")
        self.require(project)
        profiles = [kv.key[len(profiles_prefix(project)):]
                    for kv in self.store.range(profiles_prefix(project))]
        held = []
        if instances:
            held.append(f"instances {', '.join(instances)}")
        if profiles:
            held.append(f"profiles {', '.join(profiles)}")
        if networks:
            held.append(f"networks {', '.join(networks)}")
        if images:
            held.append(f"images {', '.join(images)}")
        if volumes:
            held.append(f"volumes {', '.join(volumes)}")
        if held:
            raise ProjectNotEmpty(f"project {project!r} is not empty: it holds "
                             f"{'; '.join(held)}; delete them first")
        self.store.txn([], [Delete(_key(project))])

    def disk(self, project: str) -> int:
        """The ``limits.disk`` a new container of ``project`` gets."""
        return int(self._load(project).get(DEFAULT_DISK_KEY, DEFAULT_DISK))

    def quotas(self, project: str) -> dict[str, int]:
        """The quotas set on ``project`` (a missing key: no limit)."""
        data = self._load(project)
        return {k: int(data[k]) for k in QUOTA_KEYS if k in data}

    def show(self, project: str, used: dict[str, int] | None = None) -> dict[str, str]:
        """Every default and quota of ``project`` as the CLI shows them; with ``used``,
        what its instances use of each quota too."""
        out = {DEFAULT_DISK_KEY: format_size(self.disk(project))}
        quotas = self.quotas(project)
        for key in QUOTA_KEYS:
            out[key] = _show(key, quotas[key]) if key in quotas else "unlimited"
            if used is not None:
                out[f"used.{key.removeprefix('limits.')}"] = _show(key, used[key])
        return out

    @staticmethod
    def parse(key: str, value: str) -> int | None:
        """The stored value of ``key`` given as ``value`` (``None``: unset); InvalidInput."""
        if key not in PROJECT_KEYS:
            raise InvalidInput(f"unknown project key {key!r}; allowed: {', '.join(PROJECT_KEYS)}")
        if value == "" and key in QUOTA_KEYS:
            return None
        if key == DEFAULT_DISK_KEY:
            return check_size(parse_size(value, key))
        if key in _SIZES:
            return parse_size(value, key)
        if not value.isdigit() or int(value) > 1 << 20:
            raise InvalidInput(f"invalid {key} {value!r}: must be a whole number from 0 "
                               f"to {1 << 20}, or empty for no limit")
        return int(value)

    def set(self, project: str, key: str, value: str) -> None:
        """Set ``key`` of ``project`` (an empty value unsets a quota); existing instances
        keep their own values, and a quota below what is used stops only growth."""
        parsed = self.parse(key, value)
        self.require(project)
        data = self._load(project)
        data["version"] = _VERSION
        if parsed is None:
            data.pop(key, None)
        else:
            data[key] = parsed
        self.store.put(_key(project), json.dumps(data).encode())

    def check_quotas(self, project: str, instances: Callable[[str], list[Instance]],
                     spec: InstanceSpec, replacing: InstanceSpec | None = None) -> None:
        """Raise :class:`QuotaExceeded` when ``spec`` (a new instance, or one whose spec
        was ``replacing``) would take ``project`` over a quota it grows against.

        ``instances(project)`` gives the project's instances; it is called only when
        the project has a quota.  ``limits.disk`` counts the project's volumes too (their
        sizes: what they may grow to, thin or not).
        """
        quotas = self.quotas(project)
        if not quotas:
            return
        new = usage([_as_instance(spec)])
        old = usage([_as_instance(replacing)]) if replacing is not None else None
        used = usage(instances(project))
        used["limits.disk"] += self.volume_bytes(project)
        for key, limit in quotas.items():
            delta = new[key] - (old[key] if old is not None else 0)
            if delta > 0 and used[key] + delta > limit:
                what = "a new instance" if old is None else "the change"
                raise QuotaExceeded(
                    f"project {project!r} quota {key}={_show(key, limit)} exceeded: "
                    f"{_show(key, used[key])} used, {what} needs {_show(key, delta)} more "
                    f"({_show(key, used[key] + delta)} in all); nothing was changed "
                    f"(popek project set {project} {key}=...)")

    def volume_bytes(self, project: str) -> int:
        """The sizes of ``project``'s volumes, in every pool."""
        from popek.storage.service import Storage

        return sum(v.size for v in Storage(self.store).volumes(None, project))

    def check_volume_quota(self, project: str, instances: Callable[[str], list[Instance]],
                           more: int, what: str) -> None:
        """Raise :class:`QuotaExceeded` when ``more`` bytes of volumes (``what``: a new
        volume, a resize) would take ``project`` over its ``limits.disk``."""
        limit = self.quotas(project).get("limits.disk")
        if limit is None or more <= 0:
            return
        used = usage(instances(project))["limits.disk"] + self.volume_bytes(project)
        if used + more > limit:
            key = "limits.disk"
            raise QuotaExceeded(
                f"project {project!r} quota {key}={_show(key, limit)} exceeded: "
                f"{_show(key, used)} used (instances' writable layers and volumes), {what} "
                f"needs {_show(key, more)} more ({_show(key, used + more)} in all); nothing "
                f"was changed (popek project set {project} {key}=...)")


def _as_instance(spec: InstanceSpec) -> Instance:
    from popek.core.lifecycle import State
    from popek.core.model import Instance

    return Instance(name="quota", spec=spec, state=State.STOPPED, uid=0, created="")
