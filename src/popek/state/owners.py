"""Intent owners: which popek process is carrying out an operation.

An operation that takes time (a launch, a stop, a network create) first
writes its intent together with an owner key naming its process (pid and
start time, so that a recycled pid is not mistaken for it).  Reconcile
leaves an intent alone while its owner lives and settles it once the owner
is gone.  The owner is read in the same store snapshot as the record it
guards (see :func:`read_with_owner`), so a reconcile never judges a record
by an owner key written after it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from popek import proc
from popek.state.store import KeyValue


@dataclass(frozen=True)
class Owner:
    """The popek process that owns an intent (pid and start time)."""

    pid: int
    start_time: int

    @classmethod
    def me(cls) -> Owner:
        """Return the owner record of the current process."""
        pid = os.getpid()
        return cls(pid, proc.start_time(pid) or 0)

    def alive(self) -> bool:
        """Return whether the owning process still runs."""
        return proc.alive(self.pid, self.start_time)

    def to_bytes(self) -> bytes:
        """The value stored under an owner key."""
        return f"{self.pid} {self.start_time}".encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Owner | None:
        """Read an owner key's value; ``None`` when it is not one."""
        try:
            pid, started = (int(x) for x in data.decode().split())
        except ValueError:
            return None
        return cls(pid, started)


def live_owner(kv: KeyValue | None) -> Owner | None:
    """The owner recorded in ``kv`` if that process still runs, else ``None``."""
    if kv is None:
        return None
    owner = Owner.from_bytes(kv.value)
    return owner if owner is not None and owner.alive() else None
