"""Storage virtualization: pools of volumes (driver ``dir``: files; ``ceph``: to come).

:class:`popek.storage.service.Storage` manages pools and volumes in the state
store, :mod:`popek.storage.dirpool` the files of a ``dir`` pool.
"""
