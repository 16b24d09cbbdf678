"""Noisy neighbours: a guest that spins, fills its memory or floods the disk starves nobody.

The threat (survey, section V): one guest exhausting the host's CPU, memory
or I/O so that its neighbours stop working.  popek gives every container
cgroup limits (CPU quota = its vCPUs, memory without swap, pids, I/O
weight) and every VM a fixed number of vCPU threads and fixed guest memory
(plus, when the QEMU jail is in place, a cgroup of its own).  Each test
measures a neighbour's throughput alone, then while the attacker runs, and
requires at least 80 % of the baseline (medians of several samples).
VMs have no disk yet (they boot from an initrd), so the disk flood applies
to containers only.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator

import pytest

from framework import popek

THRESHOLD = 0.80
SAMPLES = 3
CPU_SCRIPT = ("a=$(cut -d' ' -f1 /proc/uptime); i=0; while [ $i -lt {n} ]; do i=$((i+1)); "
              "done; b=$(cut -d' ' -f1 /proc/uptime); echo \"$a $b\"")
DISK_MIB = 64
DISK_SCRIPT = ("a=$(cut -d' ' -f1 /proc/uptime); "
               f"dd if=/dev/zero of=/probe bs=1M count={DISK_MIB} conv=fsync 2>/dev/null; "
               "b=$(cut -d' ' -f1 /proc/uptime); rm -f /probe; echo \"$a $b\"")
ATTACKS = {
    "cpu": "for i in 1 2 3 4; do (while :; do :; done) </dev/null >/dev/null 2>&1 & done",
    "memory": "(while :; do tail /dev/zero; done) </dev/null >/dev/null 2>&1 &",
    "disk": "(while :; do dd if=/dev/zero of=/flood bs=1M count=128 conv=fsync; "
            "rm -f /flood; done) </dev/null >/dev/null 2>&1 &",
}


def _sh(name: str, script: str) -> str:
    return popek("exec", name, "--", "sh", "-c", script, timeout=120).stdout


class Probe:
    """Throughput of the neighbour: shell loop iterations/s, or fsynced MB/s."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.n = 2000
        for _ in range(4):  # calibrate the loop to about 1 s alone
            if self._cpu_seconds() > 0.5:
                break
            self.n *= 4

    def _cpu_seconds(self) -> float:
        a, b = (float(x) for x in _sh(self.name, CPU_SCRIPT.format(n=self.n)).split())
        return max(b - a, 0.01)

    def cpu(self) -> float:
        """Loop iterations per second (median of SAMPLES)."""
        return statistics.median(self.n / self._cpu_seconds() for _ in range(SAMPLES))

    def disk(self) -> float:
        """Bytes per second written with fsync (median of SAMPLES)."""
        rates = []
        for _ in range(SAMPLES):
            a, b = (float(x) for x in _sh(self.name, DISK_SCRIPT).split())
            rates.append(DISK_MIB * (1 << 20) / max(b - a, 0.01))
        return statistics.median(rates)


def _under_attack(attacker: str, attack: str, measure: object) -> float:
    _sh(attacker, ATTACKS[attack])
    time.sleep(2)  # let the attack ramp up (and the memory hog hit its limit)
    assert callable(measure)
    return float(measure())


@pytest.fixture(scope="module", params=["container", "vm"])
def pair(request: pytest.FixtureRequest, minimal_image: str) -> Iterator[tuple[str, str, str]]:
    kind = str(request.param)
    extra = ["--container", "--memory", "128MiB"] if kind == "container" else \
        ["--memory", "256MiB"]
    neighbour, attacker = f"nb-{kind}", f"noisy-{kind}"
    popek("launch", minimal_image, neighbour, *extra)
    popek("launch", minimal_image, attacker, *extra)
    yield kind, neighbour, attacker
    for name in (neighbour, attacker):
        popek("delete", "--force", name, check=False)


def _restart(attacker: str) -> None:
    popek("restart", "--force", "--timeout", "1", attacker)


@pytest.mark.parametrize("attack", ["cpu", "memory", "disk"])
def test_neighbour_keeps_its_throughput(pair: tuple[str, str, str], attack: str) -> None:
    kind, neighbour, attacker = pair
    if attack == "disk" and kind == "vm":
        pytest.skip("VMs have no disk yet: they boot from an initrd held in guest memory")
    probe = Probe(neighbour)
    measure = probe.disk if attack == "disk" else probe.cpu
    baseline = measure()
    try:
        loaded = _under_attack(attacker, attack, measure)
    finally:
        _restart(attacker)
    ratio = loaded / baseline
    print(f"{kind} {attack}: neighbour at {ratio:.2f} of its baseline "
          f"({loaded:.0f} vs {baseline:.0f})")
    assert ratio >= THRESHOLD, (f"{kind} neighbour fell to {ratio:.0%} of its baseline under "
                                f"the {attack} attack")
