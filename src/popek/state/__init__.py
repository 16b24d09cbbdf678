"""The state at the bottom of popek: the store, its key schema, intent owners.

Everything above (core, network, trust) is typed against
:class:`~popek.state.store.StateStore`, the etcd-like protocol (revisions,
compare-and-swap transactions, change replay), never against the SQLite
class that implements it on one host; a cluster puts etcd behind the same
protocol.  This package imports nothing of popek but the small shared
helpers (:mod:`popek.errors`, :mod:`popek.paths`, :mod:`popek.proc`).
"""

from popek.state.store import (
    Compare,
    Delete,
    Event,
    KeyValue,
    Op,
    Put,
    SQLiteStore,
    StateStore,
    TxnResult,
)

__all__ = ["Compare", "Delete", "Event", "KeyValue", "Op", "Put", "SQLiteStore", "StateStore",
           "TxnResult", "open_store"]


def open_store(any_thread: bool = False) -> StateStore:
    """The state store of this host: SQLite at ``$POPEK_HOME/state.db``.

    The one place that picks the implementation: a cluster puts etcd here,
    behind the same :class:`StateStore` protocol.  ``any_thread``: threads may
    use it one at a time (the API server's pool, :mod:`popek.api.runner`).
    """
    from popek import paths

    return SQLiteStore(paths.state_db(), any_thread=any_thread)
