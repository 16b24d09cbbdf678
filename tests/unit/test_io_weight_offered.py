"""A container asks its runtime for an I/O weight only where the host can weigh I/O (no root).

On a host whose disks run no proportional I/O scheduler (``none``,
``mq-deadline``, ``kyber``: no ``blkio.weight`` nor ``blkio.bfq.weight`` on
cgroup v1), runc 1.1 failed every container start with "open
.../blkio.bfq.weight: no such file or directory"; popek asked for a weight
unconditionally.  The cgroup trees here are fakes of the two layouts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from popek.engines.cgroupfs import io_weight_offered
from popek.engines.container.spec import Limits


def v1(tmp_path: Path, *files: str) -> Path:
    for name in ("memory", "cpu", "pids", "blkio"):
        (tmp_path / name).mkdir()
    for f in files:
        (tmp_path / "blkio" / f).write_text("100\n")
    return tmp_path


@pytest.mark.parametrize("files, offered", [
    ((), False),  # none / mq-deadline / kyber on every disk
    (("blkio.bfq.weight",), True),
    (("blkio.weight",), True),
])
def test_v1_offers_a_weight_only_with_a_weight_file(tmp_path: Path, files: tuple[str, ...],
                                                    offered: bool) -> None:
    assert io_weight_offered(v1(tmp_path, *files)) is offered


def test_v1_without_a_blkio_hierarchy_offers_none(tmp_path: Path) -> None:
    (tmp_path / "memory").mkdir()
    assert io_weight_offered(tmp_path) is False


@pytest.mark.parametrize("controllers, offered", [
    ("cpuset cpu io memory pids", True),
    ("cpuset cpu memory pids", False),
])
def test_v2_offers_a_weight_with_the_io_controller(tmp_path: Path, controllers: str,
                                                   offered: bool) -> None:
    (tmp_path / "cgroup.controllers").write_text(controllers + "\n")
    assert io_weight_offered(tmp_path) is offered


def test_the_runtime_is_asked_for_a_weight_only_when_there_is_one() -> None:
    assert Limits(1 << 27, 1.0, 64).resources()["blockIO"] == {"weight": 100}
    assert "blockIO" not in Limits(1 << 27, 1.0, 64, io_weight=0).resources()

