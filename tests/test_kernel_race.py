"""KernelRace (miner/core/search/measure.py): each kernel times its own share of the first batch of a
shape class, the fastest runs the rest, and later batches of the class use it."""

import numpy as np

from cir_mine.miner.core.search import measure
from cir_mine.miner.core.search.measure import KernelRace


class FakeClock:
    """perf_counter advanced by the kernels themselves: seconds per query by kernel."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_each_kernel_runs_a_share_and_the_fastest_the_rest(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(measure, "time", clock)
    cost = {"a": 3.0, "b": 1.0, "c": 2.0}
    seen = []

    def call(kernel, part):
        clock.now += cost[kernel] * len(part)
        seen.append((kernel, int(part[0]), int(part[-1]) + 1))
        return (part * 10, np.full(len(part), kernel))

    race = KernelRace(("a", "b", "c"))
    got = race.run(4096, 400, call)
    assert seen == [("a", 0, 256), ("b", 256, 512), ("c", 512, 768), ("b", 768, 4096)]
    assert np.array_equal(got[0], np.arange(4096) * 10)  # stacked in query order
    assert race.choice(4096, 400) == "b" and race.choice(1024, 400) == "b" and race.choice(4096, 64) is None
    seen.clear()
    race.run(3000, 400, call)
    assert seen == [("b", 0, 3000)]
    assert race.describe() == {"4096x256": {"a": 3e6, "b": 1e6, "c": 2e6}}


def test_batches_too_small_to_share_run_the_small_kernel():
    seen = []
    race = KernelRace(("a", "b"), small="b")
    race.run(20, 10, lambda kernel, part: seen.append(kernel) or (part,))
    assert seen == ["b"] and race.choice(20, 10) is None
