"""How many refused credentials of one client get an audit record each: a flood is summed up.

Every refused token or certificate on TCP is audited (:mod:`popek.core.authn`),
and the client chooses how many it sends: a loop of bad tokens would write a
record per request, about 500 bytes each, until the disk holding
``POPEK_HOME`` is full.  So each client address gets :data:`BURST` records in a
window of :data:`WINDOW_S` seconds; the refusals after that are counted, and
when the window is over one record (op :data:`SUMMARY_OP`, the address as
target) says how many were not recorded one by one, from when to when.  The
answers do not change: every refused request is still a ``401``.

A summary is written by the next refusal after its window (of any client) or
by :meth:`RefusalBudget.flush` (``popek serve`` calls it when it stops).  The
budget is this process's: one ``popek serve`` owns the TCP listener.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from popek.trust.keys import iso, now

#: records of refusals of one client address per window
BURST = 20
#: the window, in seconds
WINDOW_S = 60.0
#: the op of the record that sums up the refusals a window did not record one by one
SUMMARY_OP = "auth.refused"
#: the windows kept at most: beyond, every ended one is summed up and dropped at once
MAX_SOURCES = 4096


@dataclass
class Summary:
    """Refusals of ``source`` not recorded one by one: how many, the first and last (UTC)."""

    source: str
    count: int
    first: str
    last: str

    def result(self) -> str:
        """The audit record's result, in words."""
        return (f"denied: {self.count} more refused credential(s) from {self.source} between "
                f"{self.first} and {self.last}, not recorded one by one (at most {BURST} "
                f"records per {WINDOW_S:g} s per client address)")


@dataclass
class _Window:
    start: float
    written: int = 0
    dropped: int = 0
    first: str = ""
    last: str = ""


def source_of(client: str) -> str:
    """The address of ``client`` (``HOST:PORT``, ``[V6]:PORT`` or ``V6:PORT``) without
    its port: one client's connections share a budget."""
    host = client.rsplit(":", 1)[0] if ":" in client else client
    return host.strip("[]") or "?"


class RefusalBudget:
    """The refusal records each client address has left in its current window."""

    def __init__(self, burst: int = BURST, window: float = WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``burst`` records per ``window`` seconds of ``clock`` per address."""
        self.burst, self.window, self.clock = burst, window, clock
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()

    def admit(self, client: str) -> tuple[bool, list[Summary]]:
        """Whether this refusal of ``client`` gets a record of its own, and the summaries
        of the windows (of every client) that ended, to write first."""
        at = self.clock()
        with self._lock:
            ended = self._ended(at, everything=len(self._windows) >= MAX_SOURCES)
            src = source_of(client)
            w = self._windows.get(src)
            if w is None:
                w = self._windows[src] = _Window(at)
            if w.written < self.burst:
                w.written += 1
                return True, ended
            w.dropped += 1
            w.last = iso(now())
            w.first = w.first or w.last
            return False, ended

    def flush(self) -> list[Summary]:
        """Every count not written yet, windows ended or not (the server stops)."""
        with self._lock:
            return self._ended(self.clock(), everything=True)

    def _ended(self, at: float, everything: bool) -> list[Summary]:
        out: list[Summary] = []
        for src, w in list(self._windows.items()):
            if everything or at - w.start >= self.window:
                del self._windows[src]
                if w.dropped:
                    out.append(Summary(src, w.dropped, w.first, w.last))
        return out


#: the budget of this process's refusals
REFUSALS = RefusalBudget()
