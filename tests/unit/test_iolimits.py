"""Disk I/O limits: the values popek takes, the config keys of instances and volumes,
and what the engines are given (QEMU's groups: test_qemu_config; the cgroup files here,
written into a directory laid out as the kernel's)."""

from __future__ import annotations

from pathlib import Path

import pytest

from popek import iolimits
from popek.core import config as cfg
from popek.core.lifecycle import State
from popek.core.model import Instance, InstanceSpec
from popek.engines import cgroupfs
from popek.engines.container.spec import Limits
from popek.errors import InvalidInput
from popek.iolimits import IoLimits


def test_values_sizes_per_second_and_operations() -> None:
    assert iolimits.parse("limits.disk.write_bps", "10MB") == 10_000_000
    assert iolimits.parse("limits.disk.read_bps", "64MiB/s") == 64 << 20
    assert iolimits.parse("limits.disk.write_iops", "500") == 500
    for none in ("0", "none", "off", ""):
        assert iolimits.parse("limits.disk.read_iops", none) == 0


@pytest.mark.parametrize(("key", "value", "says"), [
    ("limits.disk.write_bps", "fast", "invalid limits.disk.write_bps 'fast'"),
    ("limits.disk.write_bps", "10", "unknown unit"),
    ("limits.disk.write_bps", "1KiB", "from 64KiB to"),
    ("limits.disk.read_bps", "2000TB", "bytes per second, or 0 for no limit"),
    ("limits.disk.write_iops", "-5", "from 1 to"),
    ("limits.disk.write_iops", "1.5", "whole number of operations per second"),
    ("limits.disk.speed", "1", "unknown key 'limits.disk.speed'"),
])
def test_bad_values_are_one_clear_line(key: str, value: str, says: str) -> None:
    with pytest.raises(InvalidInput, match=says) as err:
        iolimits.parse(key, value)
    assert "\n" not in str(err.value)


def _inst(state: State = State.RUNNING, engine: str = "qemu") -> Instance:
    return Instance(name="web", spec=InstanceSpec("img", engine), state=state, uid=100000,
                    created="")


def test_instance_config_sets_shows_and_unsets() -> None:
    inst = _inst()
    assert cfg.apply(inst, "limits.disk.write_bps", "10MiB") is cfg.Live.IO
    assert cfg.apply(inst, "limits.disk.read_iops", "200") is cfg.Live.IO
    assert inst.spec.limits == {"disk.write_bps": 10 << 20, "disk.read_iops": 200}
    assert IoLimits.of(inst.spec.limits) == IoLimits(write_bps=10 << 20, read_iops=200)
    shown = cfg.show(inst)
    assert shown["limits.disk.write_bps"] == "10MiB" and shown["limits.disk.read_iops"] == "200"
    assert "limits.disk.read_bps" not in shown
    assert cfg.apply(inst, "limits.disk.write_bps", "0") is cfg.Live.IO
    assert inst.spec.limits == {"disk.read_iops": 200}
    assert cfg.unset(inst, "limits.disk.read_iops", {}, 0) is cfg.Live.IO
    assert inst.spec.limits == {}


def test_a_bad_instance_value_changes_nothing() -> None:
    inst = _inst()
    cfg.apply(inst, "limits.disk.write_bps", "10MiB")
    with pytest.raises(InvalidInput, match="limits.disk.write_bps"):
        cfg.apply(inst, "limits.disk.write_bps", "lots")
    assert inst.spec.limits == {"disk.write_bps": 10 << 20}
    with pytest.raises(InvalidInput, match="from 64KiB"):
        cfg.check_limits({"disk.write_bps": 5})
    assert cfg.check_limits({"disk.write_bps": 1 << 20}) == {"disk.write_bps": 1 << 20}


def test_v1_throttle_files_and_a_rule_removed_with_0() -> None:
    settings = cgroupfs.io_limit_settings((7, 3), IoLimits(write_bps=1 << 20, read_iops=50),
                                          v2=False)
    assert [(s.controller, s.file, s.value) for s in settings] == [
        ("blkio", "blkio.throttle.read_bps_device", "7:3 0"),
        ("blkio", "blkio.throttle.write_bps_device", "7:3 1048576"),
        ("blkio", "blkio.throttle.read_iops_device", "7:3 50"),
        ("blkio", "blkio.throttle.write_iops_device", "7:3 0")]


def test_v2_io_max_line() -> None:
    [setting] = cgroupfs.io_limit_settings((254, 0), IoLimits(write_bps=1 << 20), v2=True)
    assert (setting.file, setting.value) == ("io.max",
                                             "254:0 rbps=max wbps=1048576 riops=max wiops=max")


def test_set_io_limits_writes_the_cgroup_and_refuses_a_missing_one(tmp_path: Path) -> None:
    """A directory laid out as a v1 host's (the kernel's files cannot be made in tmp)."""
    d = tmp_path / "blkio" / "popek" / "c1"
    d.mkdir(parents=True)
    for name, _ in cgroupfs.V1_THROTTLE:
        (d / name).write_text("")
    cgroupfs.set_io_limits("popek/c1", [(7, 3)], IoLimits(write_bps=2 << 20), tmp_path)
    assert (d / "blkio.throttle.write_bps_device").read_text() == "7:3 2097152"
    from popek.errors import EngineError

    with pytest.raises(EngineError, match="does not exist"):
        cgroupfs.set_io_limits("popek/gone", [(7, 3)], IoLimits(write_bps=2 << 20), tmp_path)


def test_the_oci_spec_throttles_the_writable_layers_device() -> None:
    lim = Limits(memory=1 << 30, cpus=1.0, pids=100, io_weight=0,
                 io=IoLimits(write_bps=5 << 20, read_iops=10), io_devices=((7, 4),))
    assert lim.resources()["blockIO"] == {
        "throttleWriteBpsDevice": [{"major": 7, "minor": 4, "rate": 5 << 20}],
        "throttleReadIOPSDevice": [{"major": 7, "minor": 4, "rate": 10}]}
    assert "blockIO" not in Limits(memory=1 << 30, cpus=1.0, pids=100, io_weight=0).resources()


def test_whole_disk_of_this_hosts_root() -> None:
    import os

    major, minor = cgroupfs.whole_disk(os.stat("/").st_dev)
    assert Path(f"/sys/dev/block/{major}:{minor}").exists()
    assert not Path(f"/sys/dev/block/{major}:{minor}/partition").exists()
