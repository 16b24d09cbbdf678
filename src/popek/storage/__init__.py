"""Storage virtualization: pools of volumes (driver ``dir``: files; ``ceph``: RBD images).

:class:`popek.storage.service.Storage` manages pools and volumes in the state
store, :mod:`popek.storage.dirpool` the files of a ``dir`` pool,
:mod:`popek.storage.cephpool` the RBD images of a ``ceph`` pool.
"""
