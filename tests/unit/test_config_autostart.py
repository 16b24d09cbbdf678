"""The ``boot.autostart`` config key (issue 13.8): a boolean, set at any time, shown, unset."""

from __future__ import annotations

import pytest

from popek.core import config
from popek.core.lifecycle import State
from popek.core.model import Instance, InstanceSpec
from popek.errors import InvalidInput


def _instance(state: State = State.RUNNING) -> Instance:
    return Instance(name="web", spec=InstanceSpec("minimal"), state=state, uid=900000000,
                    created="2026-12-03T00:00:00Z")


@pytest.mark.parametrize(("text", "value"), [("true", True), ("YES", True), ("1", True),
                                             ("on", True), ("false", False), ("0", False),
                                             (" off ", False), ("no", False)])
def test_autostart_takes_a_boolean_even_while_running(text: str, value: bool) -> None:
    inst = _instance()
    assert config.apply(inst, "boot.autostart", text) is config.Live.NONE
    assert inst.spec.autostart is value
    assert config.show(inst)["boot.autostart"] == ("true" if value else "false")


@pytest.mark.parametrize("text", ["", "maybe", "2", "truee"])
def test_autostart_refuses_anything_else_and_names_what_is_allowed(text: str) -> None:
    inst = _instance()
    with pytest.raises(InvalidInput, match="allowed: true or false"):
        config.apply(inst, "boot.autostart", text)
    assert inst.spec.autostart is False


def test_autostart_is_a_known_key_and_unsets_to_false() -> None:
    assert config.parse_pairs(["boot.autostart=true"]) == {"boot.autostart": "true"}
    inst = _instance(State.STOPPED)
    config.apply(inst, "boot.autostart", "true")
    config.unset(inst, "boot.autostart", {}, 0)
    assert inst.spec.autostart is False


def test_old_records_without_the_field_read_as_false() -> None:
    inst = _instance()
    doc = inst.to_json().replace(b', "autostart": false', b"")
    assert b"autostart" not in doc
    assert Instance.from_json(doc).spec.autostart is False
