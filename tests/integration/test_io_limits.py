"""Disk I/O limits on real instances (issue 15.4): ``limits.disk.write_bps`` and the others.

A VM writes to its volume with ``dd oflag=direct`` (no guest page cache): unlimited
it goes several times faster than the limit, and with the volume's limit set on the
running VM (``popek storage volume set``: QMP ``qom-set`` on its throttle group) it
goes at the limit; the instance's own limit (``popek config set``), which all its
volumes share, likewise, and both survive a restart.  A container writes to its
writable layer with ``oflag=direct`` the same way, limited through the cgroup I/O
controller (blkio.throttle on this v1 host) at start and live.  Bad values are
refused in one line and change nothing.

"Near the limit": from :data:`LOW` to :data:`HIGH` times it (QEMU lets a request through
while its bucket holds less than a tenth of a second's worth, so the first request of
each run is free: 256 KiB requests keep that small).  A limited run writes two to
three seconds' worth (4 MiB at 2 MiB/s, 3 MiB at 1 MiB/s): the free start moves the
figure by at most about 15 %, inside :data:`HIGH`, and a slow start of ``dd`` in a loaded
guest by about as much the other way, inside :data:`LOW`.  "Well above": at least
:data:`ABOVE` times it unlimited.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from framework import popek, popek_json, require_root_and_tools
from popek.errors import BAD_INPUT

require_root_and_tools()

VM, CT = "iol-vm", "iol-ct"
VOL = "iol-data"
MiB = 1 << 20
LIMIT = 2 * MiB
LOW, HIGH, ABOVE = 0.6, 1.3, 3.0


def rate(name: str, target: str, mib: int) -> float:
    """Bytes per second of ``mib`` MiB written with O_DIRECT to ``target`` in ``name``."""
    script = (f"a=$(cut -d' ' -f1 /proc/uptime); dd if=/dev/zero of={target} bs=256K "
              f"count={mib * 4} oflag=direct conv=notrunc 2>/dev/null; "
              "b=$(cut -d' ' -f1 /proc/uptime); echo \"$a $b\"")
    a, b = (float(x) for x in popek("exec", name, "--", "sh", "-c", script,
                                    timeout=180).stdout.split())
    got = mib * MiB / max(b - a, 0.01)
    print(f"{name} {target}: {got / MiB:.2f} MiB/s")
    return got


def near(measured: float, limit: int) -> bool:
    return LOW * limit <= measured <= HIGH * limit


@pytest.fixture(scope="module")
def vm(minimal_image: str) -> Iterator[str]:
    popek("storage", "volume", "create", "local", VOL, "--size", "64MiB")
    popek("launch", minimal_image, VM, "--memory", "256MiB", "--disk", f"local/{VOL}")
    yield VM
    popek("delete", "--force", VM, check=False)
    popek("storage", "volume", "delete", "local", VOL, check=False)


def test_a_volume_limit_slows_a_running_vm_to_it(vm: str) -> None:
    free = rate(vm, "/dev/vda", 32)
    assert free >= ABOVE * LIMIT, f"unlimited only {free / MiB:.1f} MiB/s: no proof"
    out = popek("storage", "volume", "set", "local", VOL, "limits.disk.write_bps=2MiB").stdout
    assert out == f"Volume local/{VOL}: limits.disk.write_bps=2MiB.\n"
    limited = rate(vm, "/dev/vda", 4)
    assert near(limited, LIMIT), f"{limited / MiB:.2f} MiB/s under a 2 MiB/s limit " \
                                 f"({free / MiB:.1f} unlimited)"
    info = popek_json("storage", "volume", "info", "local", VOL)
    assert info["config"] == {"limits.disk.write_bps": "2MiB"}
    popek("storage", "volume", "set", "local", VOL, "limits.disk.write_bps=0")
    assert rate(vm, "/dev/vda", 32) >= ABOVE * LIMIT  # lifted live
    assert popek_json("storage", "volume", "info", "local", VOL)["config"] == {}


def test_the_instance_limit_is_live_and_survives_a_restart(vm: str) -> None:
    popek("config", "set", vm, "limits.disk.write_bps=1MiB")
    assert near(rate(vm, "/dev/vda", 3), MiB)
    assert popek("config", "get", vm, "limits.disk.write_bps").stdout == "1MiB\n"
    popek("stop", vm)
    popek("start", vm)
    assert near(rate(vm, "/dev/vda", 3), MiB)  # from the command line this time
    popek("config", "unset", vm, "limits.disk.write_bps")
    assert rate(vm, "/dev/vda", 32) >= ABOVE * LIMIT


def test_bad_values_are_refused_and_change_nothing(vm: str) -> None:
    popek("storage", "volume", "set", "local", VOL, "limits.disk.read_iops=300")
    for args, says in (
            (["config", "set", vm, "limits.disk.write_bps=fast"],
             "invalid limits.disk.write_bps 'fast'"),
            (["config", "set", vm, "limits.disk.write_bps=1KiB"], "from 64KiB to"),
            (["config", "set", vm, "limits.disk.write_iops=-3"], "from 1 to"),
            (["storage", "volume", "set", "local", VOL, "limits.disk.read_iops=many"],
             "whole number of operations per second"),
            (["storage", "volume", "set", "local", VOL, "limits.disk.speed=1"],
             "KEY one of limits.disk.read_bps"),
            (["storage", "volume", "set", "local", VOL, "limits.disk.write_bps=5MB",
              "limits.disk.read_bps=1"], "unknown unit")):
        proc = popek(*args, check=False)
        assert proc.returncode == BAD_INPUT, proc.stderr
        assert says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert popek_json("storage", "volume", "info", "local", VOL)["config"] == {
        "limits.disk.read_iops": "300"}  # the pair with a bad half set neither
    assert "limits.disk.write_bps" not in popek_json("config", "show", vm)
    popek("storage", "volume", "set", "local", VOL, "limits.disk.read_iops=0")


def test_a_hot_plugged_volume_comes_with_its_limit(vm: str) -> None:
    """A volume plugged into the running VM gets its group and filters (``object-add``,
    ``blockdev-add``), with the limit the volume has; unplugging removes them, so the
    same slot takes a volume again."""
    popek("storage", "volume", "create", "local", "iol-hot", "--size", "32MiB")
    try:
        popek("storage", "volume", "set", "local", "iol-hot", "limits.disk.write_bps=2MiB")
        for _ in range(2):  # plugged, unplugged, plugged again into the same slot
            popek("storage", "volume", "attach", "local/iol-hot", vm)
            dev = popek("exec", vm, "--", "sh", "-c",
                        "readlink -f /dev/disk/by-id/virtio-iol-hot || "
                        "for d in /sys/block/vd*; do [ \"$(cat $d/serial)\" = iol-hot ] && "
                        "echo /dev/${d##*/}; done").stdout.split()[-1]
            assert near(rate(vm, dev, 4), LIMIT)
            popek("storage", "volume", "detach", "local/iol-hot", vm)
    finally:
        popek("storage", "volume", "detach", "local/iol-hot", vm, check=False)
        popek("storage", "volume", "delete", "local", "iol-hot", check=False)


@pytest.fixture(scope="module")
def container(minimal_image: str) -> Iterator[str]:
    popek("launch", minimal_image, CT, "--container", "--memory", "128MiB")
    yield CT
    popek("delete", "--force", CT, check=False)


def test_a_container_is_limited_live_and_from_its_start(container: str) -> None:
    free = rate(container, "/probe", 32)
    assert free >= ABOVE * LIMIT, f"unlimited only {free / MiB:.1f} MiB/s: no proof"
    popek("config", "set", container, "limits.disk.write_bps=2MiB")
    limited = rate(container, "/probe", 4)
    assert near(limited, LIMIT), f"{limited / MiB:.2f} MiB/s under a 2 MiB/s limit " \
                                 f"({free / MiB:.1f} unlimited)"
    popek("restart", "--force", container)
    assert near(rate(container, "/probe", 4), LIMIT)  # from the runtime's spec
    popek("config", "set", container, "limits.cpu=1")  # runc update keeps the limit
    assert near(rate(container, "/probe", 4), LIMIT)
    popek("config", "set", container, "limits.disk.write_bps=0")
    assert rate(container, "/probe", 32) >= ABOVE * LIMIT


def test_a_containers_volume_is_limited_on_its_own_device(container: str) -> None:
    """A filesystem volume's loop device gets the volume's limit (live, and from the next
    start), while the writable layer stays unlimited."""
    popek("storage", "volume", "create", "local", "iol-fs", "--size", "64MiB", "--type",
          "filesystem")
    try:
        popek("storage", "volume", "attach", "local/iol-fs", container, "--path", "/data")
        assert rate(container, "/data/f", 32) >= ABOVE * LIMIT
        popek("storage", "volume", "set", "local", "iol-fs", "limits.disk.write_bps=2MiB")
        assert near(rate(container, "/data/f", 4), LIMIT)
        assert rate(container, "/probe", 32) >= ABOVE * LIMIT  # its own layer: no limit
        popek("restart", "--force", container)
        assert near(rate(container, "/data/f", 4), LIMIT)
    finally:
        popek("storage", "volume", "detach", "local/iol-fs", container, check=False)
        popek("storage", "volume", "delete", "local", "iol-fs", check=False)
