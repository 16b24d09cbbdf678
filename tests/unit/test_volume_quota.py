"""Volumes count toward a project's ``limits.disk`` (issue 14.3's quotas, applied to 15).

Before, a tenant under a disk quota could make volumes without end: the
quota counted only its containers' writable layers.  Real store, real files
(qemu-img), no root.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from popek.core.model import InstanceSpec
from popek.core.projects import Projects, QuotaExceeded
from popek.core.requests import VolumeClone, VolumeCreate, VolumeResize, VolumeSnapshot
from popek.core.service import Core
from popek.state.store import SQLiteStore
from popek.storage.service import Storage

MiB = 1 << 20


@pytest.fixture
def core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Core]:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    store = SQLiteStore(tmp_path / "home" / "state.db")
    Projects(store).create("lab")
    Projects(store).set("lab", "limits.disk", "100MiB")
    yield Core(store, project="lab")
    store.close()


def test_volumes_are_held_to_the_projects_disk_quota(core: Core) -> None:
    core.handle(VolumeCreate("local", "a", 64 * MiB))
    with pytest.raises(QuotaExceeded, match=r"quota limits.disk=100MiB exceeded: 64MiB used .*"
                                            r"the new volume needs 64MiB more"):
        core.handle(VolumeCreate("local", "b", 64 * MiB))
    with pytest.raises(QuotaExceeded, match="the resize needs 64MiB more"):
        core.handle(VolumeResize("local", "a", 128 * MiB))
    core.handle(VolumeSnapshot("local", "a", "s"))
    with pytest.raises(QuotaExceeded, match="the clone needs 64MiB more"):
        core.handle(VolumeClone("local", "a", "s", "c"))
    assert [v.name for v in Storage(core.store).volumes(None, "lab")] == ["a"]  # nothing made
    core.handle(VolumeCreate("local", "b", 36 * MiB))  # up to the quota exactly


def test_a_launch_counts_the_projects_volumes(core: Core) -> None:
    core.handle(VolumeCreate("local", "a", 96 * MiB))
    spec = InstanceSpec("minimal", "container", limits={"disk": 8 * MiB})
    with pytest.raises(QuotaExceeded, match="96MiB used"):
        Projects(core.store).check_quotas("lab", lambda _p: [], spec)
    Projects(core.store).check_quotas("default", lambda _p: [], spec)  # another project's
