"""Every test here runs real engines as root: marked ``integration``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from framework import ceph
from framework.ceph import CephCluster


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/integration/" in str(item.path):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[CephCluster]:
    """A real Ceph cluster (1 mon, 1 mgr, 3 BlueStore OSDs on sparse files), started once
    per session on loopback under a tmp dir, every daemon killed at the end
    (tests/framework/ceph.py); skipped, saying why, only where Debian's packages are
    missing."""
    why = ceph.missing()
    if why:
        pytest.skip(f"no Ceph cluster can be made here: {why}")
    cluster = CephCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
