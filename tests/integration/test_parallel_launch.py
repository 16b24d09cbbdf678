"""Parallel launches all end running (issue 12, tests; the race of issue 11).

A reconcile used to read a record and, separately, its owner key: a launch
that finished in between was taken for a dead one, and its container was
cleaned up although the launch had reported success (seen once in 10
parallel launches).  Here 10 containers are launched at once through the
real CLI, 20 times over, and every one must still run at the end of its
round, its init alive, as a reconciling ``list`` finds it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from framework import popek, popek_json

ROUNDS, WIDTH = 20, 10


def _launch(image: str, name: str) -> tuple[float, float, int, str]:
    t0 = time.monotonic()
    r = popek("launch", image, name, "--container", "--memory", "64MiB", "--pids", "64",
              "--disk", "64MiB", check=False)
    return t0, time.monotonic(), r.returncode, r.stderr


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def names() -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    with ThreadPoolExecutor(WIDTH) as pool:
        list(pool.map(lambda n: popek("delete", "--force", n, check=False), made))


def test_ten_parallel_launches_twenty_times_all_stay_running(
        minimal_image: str, names: list[str]) -> None:
    overlaps = 0
    for r in range(ROUNDS):
        batch = [f"par-{r}-{i}" for i in range(WIDTH)]
        names[:] = batch
        with ThreadPoolExecutor(WIDTH) as pool:
            results = list(pool.map(lambda n: _launch(minimal_image, n), batch))
        failed = [(n, res[3]) for n, res in zip(batch, results, strict=True) if res[2] != 0]
        assert not failed, f"round {r}: launches failed: {failed}"
        # the launches really ran at once: some started before another had finished
        starts, ends = sorted(x[0] for x in results), sorted(x[1] for x in results)
        overlaps += sum(1 for s in starts[1:] if s < ends[0])
        listed = {i["name"]: i for i in popek_json("list")}  # reconciles every instance
        for n in batch:
            assert listed[n]["state"] == "running", f"round {r}: {n} is {listed[n]}"
            assert _alive(listed[n]["pid"]), f"round {r}: {n}'s init is gone"
        with ThreadPoolExecutor(WIDTH) as pool:
            list(pool.map(lambda n: popek("delete", "--force", n), batch))
        names.clear()
    assert overlaps >= ROUNDS  # on average, more than one launch in flight per round
