"""Profiles: named sets of config keys and networks that ``popek launch -p`` applies.

A profile holds a description, config keys (those of :data:`popek.core.config.CONFIG_KEYS`,
the ``label`` among them) and networks (names only: a static address belongs to one
instance, ``launch --network NAME=IP``).  One key per profile
(``/popek/profiles/P/NAME``, JSON).  A launch applies, as incus does: the built-in
defaults, then each ``-p`` profile in the order given, then the shorthand options
(``--memory``, ``--vcpus``...), then each ``-c KEY=VALUE`` (so ``-c`` wins over a
shorthand for the same key).  Profiles are copied at launch: the instance records
their names (``spec.profiles``) and its own values, so editing a profile changes the
instances launched later, not those already running; ``config unset`` falls back to
what the instance's profiles say now.  A profile an instance names cannot be deleted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from popek.core import config as cfg
from popek.core.lifecycle import State
from popek.core.model import DEFAULT_PROJECT, Instance, InstanceSpec, validate_name
from popek.errors import (
    AlreadyExists,
    ConflictError,
    InvalidInput,
    NotFound,
    StateError,
    StoreError,
)
from popek.state.schema import profile_key, profiles_prefix
from popek.state.store import Compare, Delete, Put, StateStore

#: the fields of a profile document (``profile edit``, ``profile show --format json``)
FIELDS = ("description", "config", "networks")
MAX_DESCRIPTION = 1000


@dataclass
class Profile:
    """One profile: what ``launch -p NAME`` adds to an instance."""

    name: str
    description: str = ""
    config: dict[str, str] = field(default_factory=dict)
    networks: list[str] = field(default_factory=list)

    def to_doc(self) -> dict[str, Any]:
        """The document ``profile show`` prints and ``profile edit`` reads back."""
        return {"name": self.name, "description": self.description,
                "config": dict(self.config), "networks": list(self.networks)}


def check(profile: Profile) -> Profile:
    """``profile`` when its name, keys, values and networks are valid; else InvalidInput.

    A value is checked as ``config set`` checks it (on a stopped probe instance), so a
    profile never holds a value a launch would refuse for its form (the host's CPUs
    and memory are checked again at each launch).
    """
    validate_name(profile.name, "profile name")
    if not isinstance(profile.description, str) or len(profile.description) > MAX_DESCRIPTION:
        raise InvalidInput(f"invalid description: text of at most {MAX_DESCRIPTION} characters")
    probe = _probe("container")  # limits.disk is a container's: a VM's launch refuses it
    for key, value in profile.config.items():
        cfg.apply(probe, cfg.check_key(key), value)
    seen = set()
    for net in profile.networks:
        if not isinstance(net, str) or "=" in net:
            raise InvalidInput(f"invalid network {net!r} in profile {profile.name!r}: a "
                               "network name; a static address belongs to one instance "
                               "(launch --network NAME=IP)")
        validate_name(net, "network name")
        if net in seen:
            raise InvalidInput(f"network {net!r} appears twice in profile {profile.name!r}")
        seen.add(net)
    return profile


def _probe(engine: str) -> Instance:
    """A stopped instance with the built-in defaults, to check and merge values on."""
    limits = {"pids": cfg.CONTAINER_PIDS} if engine == "container" else {}
    return Instance(name="probe", spec=InstanceSpec("", engine=engine, limits=dict(limits)),
                    state=State.STOPPED, uid=0, created="")


def from_doc(name: str, doc: Any) -> Profile:
    """Read a profile document (``profile edit``): a mapping of :data:`FIELDS`, all optional.

    ``name`` in the document, if there, must be ``name`` (a profile is renamed by none of
    its commands).  Config values may be numbers (``limits.cpu: 2``), kept as text.
    """
    if not isinstance(doc, dict):
        raise InvalidInput(f"invalid profile document: a mapping of {', '.join(FIELDS)}")
    extra = sorted(set(doc) - {*FIELDS, "name"})
    if extra:
        raise InvalidInput(f"unknown field {extra[0]!r} in the profile document; allowed: "
                           f"{', '.join(FIELDS)}")
    if doc.get("name", name) != name:
        raise InvalidInput(f"the document names profile {doc['name']!r}, not {name!r}; "
                           "a profile cannot be renamed")
    config = doc.get("config") or {}
    networks = doc.get("networks") or []
    if not isinstance(config, dict):
        raise InvalidInput("invalid config in the profile document: a mapping of KEY: VALUE")
    if not isinstance(networks, list):
        raise InvalidInput("invalid networks in the profile document: a list of names")
    values: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise InvalidInput(f"invalid value of {key!r} in the profile document: text or "
                               "a number")
        values[str(key)] = str(value)
    return check(Profile(name, str(doc.get("description") or ""), values, list(networks)))


def parse_document(text: str) -> Any:
    """A profile document as JSON or YAML text (YAML needs PyYAML; JSON is YAML too)."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    import importlib

    try:
        yaml = importlib.import_module("yaml")  # PyYAML, untyped
    except ImportError as exc:
        raise InvalidInput("invalid profile document: not JSON (YAML needs PyYAML, "
                           "not installed)") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise InvalidInput(f"invalid profile document: not JSON or YAML{at}") from exc


class Profiles:
    """The profiles of one project, in the state store."""

    def __init__(self, store: StateStore, project: str = DEFAULT_PROJECT) -> None:
        """Over ``store``."""
        self.store = store
        self.project = project

    def _read(self, name: str) -> tuple[Profile, int] | None:
        kv = self.store.get(profile_key(self.project, name))
        if kv is None:
            return None
        return self._decode(name, kv.value), kv.mod_revision

    @staticmethod
    def _decode(name: str, value: bytes) -> Profile:
        try:
            d = json.loads(value)
            return Profile(name, str(d.get("description", "")), dict(d.get("config", {})),
                           list(d.get("networks", [])))
        except (ValueError, TypeError, AttributeError) as exc:
            raise StoreError(f"broken profile record {name!r} in the state store: {exc}") \
                from exc

    def get(self, name: str) -> Profile:
        """Profile ``name``; :class:`NotFound` names the profiles there are."""
        found = self._read(name)
        if found is None:
            there = ", ".join(p.name for p in self.all()) or "none yet"
            raise NotFound(f"profile {name!r} not found (profiles: {there}; "
                           "popek profile create NAME)")
        return found[0]

    def all(self) -> list[Profile]:
        """Every profile of the project, sorted by name."""
        prefix = profiles_prefix(self.project)
        return [self._decode(kv.key[len(prefix):], kv.value)
                for kv in self.store.range(prefix)]

    @staticmethod
    def _encode(profile: Profile) -> bytes:
        doc = profile.to_doc()
        del doc["name"]
        return json.dumps(doc, sort_keys=True).encode()

    def create(self, profile: Profile) -> Profile:
        """Record a new profile; :class:`AlreadyExists` when the name is taken."""
        check(profile)
        key = profile_key(self.project, profile.name)
        if not self.store.txn([Compare(key, "version", "==", 0)],
                              [Put(key, self._encode(profile))]).succeeded:
            raise AlreadyExists(f"profile {profile.name!r} already exists; change it with "
                                f"popek profile edit {profile.name}")
        return profile

    def replace(self, profile: Profile) -> Profile:
        """Replace existing profile ``profile.name`` with ``profile`` (``profile edit``)."""
        check(profile)
        found = self._read(profile.name)
        if found is None:
            self.get(profile.name)  # NotFound, naming the profiles there are
        assert found is not None
        key = profile_key(self.project, profile.name)
        if not self.store.txn([Compare(key, "mod_revision", "==", found[1])],
                              [Put(key, self._encode(profile))]).succeeded:
            raise ConflictError(f"profile {profile.name!r} changed meanwhile; try again")
        return profile

    def delete(self, name: str, users: list[str]) -> None:
        """Delete profile ``name``, refused while instances (``users``) were launched with it."""
        found = self._read(name)
        if found is None:
            self.get(name)
        assert found is not None
        if users:
            raise StateError(f"profile {name!r}", "delete",
                             f"in use by instance(s) {', '.join(users)}",
                             ("unused (delete those instances first)",))
        key = profile_key(self.project, name)
        if not self.store.txn([Compare(key, "mod_revision", "==", found[1])],
                              [Delete(key)]).succeeded:
            raise ConflictError(f"profile {name!r} changed meanwhile; try again")

    def resolve(self, names: list[str] | tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
        """The config keys and networks of profiles ``names`` applied in order (a later
        profile's key wins; networks are joined, each once)."""
        config: dict[str, str] = {}
        networks: list[str] = []
        for name in names:
            p = self.get(name)
            config.update(p.config)
            networks += [n for n in p.networks if n not in networks]
        return config, networks


def users(instances: list[Instance], name: str) -> list[str]:
    """The instances (names, sorted) launched with profile ``name``."""
    return sorted(i.name for i in instances if name in i.spec.profiles)


def launch_spec(spec: InstanceSpec, profiles: dict[str, str], shorthand: dict[str, Any],
                config: dict[str, str]) -> InstanceSpec:
    """The spec a launch gets: ``spec`` (the built-in defaults for its engine), then the
    profiles' keys, then the shorthand options given (``vcpus``, ``memory``, ``label``,
    ``limits``), then ``config`` (``-c``); every value checked as ``config set`` does."""
    probe = Instance(name="probe", spec=spec, state=State.STOPPED, uid=0, created="")
    for key, value in profiles.items():
        cfg.apply(probe, cfg.check_key(key), value)
    for attr in ("vcpus", "memory", "label"):
        if shorthand.get(attr) is not None:
            setattr(probe.spec, attr, shorthand[attr])
    probe.spec.limits = {**probe.spec.limits, **(shorthand.get("limits") or {})}
    for key, value in config.items():
        cfg.apply(probe, cfg.check_key(key), value)
    return probe.spec



def for_launch(store: StateStore, engine: str, names: tuple[str, ...] | list[str],
               shorthand: dict[str, Any], config: dict[str, str],
               networks: tuple[str, ...] | list[str],
               project: str = DEFAULT_PROJECT) -> tuple[InstanceSpec, list[str]]:
    """The resources, limits and label (an :class:`InstanceSpec`) and the networks of a
    launch with profiles ``names``, shorthand options and ``-c`` keys; see the module.

    A network ``--network`` names wins over the same network of a profile (it may carry
    a static address).  Raises :class:`NotFound` for a missing profile and
    :class:`InvalidInput` for an unknown key or a bad value, before anything is made.
    """
    from popek.core.netglue import split_network

    for name in names:
        validate_name(name, "profile name")
    pconfig, pnets = Profiles(store, project).resolve(names)
    for key in config:
        cfg.check_key(key)
    spec = launch_spec(_probe(engine).spec, pconfig, shorthand, config)
    given = [split_network(n)[0] for n in networks]
    return spec, [n for n in pnets if n not in given] + list(networks)
