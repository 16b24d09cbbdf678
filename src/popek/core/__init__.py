"""The core of popek: instance model, lifecycle, state store, operations, reconcile."""

from popek.core.instances import Instances
from popek.core.lifecycle import State
from popek.core.model import Instance, InstanceSpec, validate_name
from popek.state.store import SQLiteStore

__all__ = ["Instance", "InstanceSpec", "Instances", "SQLiteStore", "State", "validate_name"]
