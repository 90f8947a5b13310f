"""KernelRace (miner/core/search/measure.py): each kernel times its own share of the first batch of a
shape class, the fastest runs the rest, and later batches of the class use it, timed again."""

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
    # the batch of 3,000 (another class) is that class's record, from the one measured
    assert race.describe() == {"2048x256": {"a": 3e6, "b": 1e6, "c": 2e6}, "4096x256": {"a": 3e6, "b": 1e6, "c": 2e6}}


def test_a_kernel_given_a_larger_share_races_on_it(monkeypatch):
    """A kernel whose cost per query falls with its batch (list-major IVF: more queries meet each
    list) races on the larger share it is given; the others keep a sixteenth. Here the batch kernel
    wins on its quarter, where on a sixteenth its fixed cost would have lost it the race."""
    clock = FakeClock()
    monkeypatch.setattr(measure, "time", clock)
    fixed = {"lists": 100.0, "faiss": 0.0}
    per = {"lists": 1.0, "faiss": 2.0}
    seen = []

    def call(kernel, part):
        clock.now += fixed[kernel] + per[kernel] * len(part)
        seen.append((kernel, int(part[0]), int(part[-1]) + 1))
        return (part,)

    race = KernelRace(("lists", "faiss"), small="faiss", shares={"lists": 4})
    race.run(1024, 800, call)
    assert seen == [("lists", 0, 256), ("faiss", 256, 320), ("lists", 320, 1024)]
    seen.clear()
    KernelRace(("lists", "faiss"), small="faiss").run(1024, 800, call)
    assert seen == [("lists", 0, 64), ("faiss", 64, 128), ("faiss", 128, 1024)]


def test_batches_too_small_to_share_run_the_small_kernel():
    seen = []
    race = KernelRace(("a", "b"), small="b")
    race.run(20, 10, lambda kernel, part: seen.append(kernel) or (part,))
    assert seen == ["b"] and race.choice(20, 10) is None


def test_a_kernel_measured_too_fast_gives_way_on_the_next_batch(monkeypatch):
    """A noisy share made "a" look fastest; its first whole batch runs slower than "b" measured, so
    the next batch goes to "b"."""
    clock = FakeClock()
    monkeypatch.setattr(measure, "time", clock)
    cost = {"a": 0.5, "b": 1.0}
    seen = []

    def call(kernel, part):
        clock.now += cost[kernel] * len(part)
        seen.append(kernel)
        return (part,)

    race = KernelRace(("a", "b"))
    race.run(4096, 400, call)
    assert seen == ["a", "b", "a"] and race.choice(4096, 400) == "a"
    cost["a"] = 3.0  # what "a" really costs
    race.run(4096, 400, call)
    assert race.choice(4096, 400) == "b" and race.describe()["4096x256"]["a"] == 3e6
    seen.clear()
    race.run(4096, 400, call)
    race.run(4096, 400, call)
    assert seen == ["b", "b"]


def test_a_kernel_a_share_measured_near_the_fastest_runs_a_whole_batch(monkeypatch):
    """ "b" measured 1.5x "a" on its share (a share costs it more per query than a whole batch);
    once "a" has run a whole batch, "b" runs the next one, and the faster of the two whole
    batches keeps the class. A kernel measured beyond TRIAL_MARGIN never gets a batch."""
    clock = FakeClock()
    monkeypatch.setattr(measure, "time", clock)
    share_cost = {"a": 1.0, "b": 1.5, "c": 2.5}
    whole_cost = {"a": 1.0, "b": 0.5, "c": 0.1}
    seen = []

    def call(kernel, part):
        clock.now += (share_cost if len(part) < 1000 else whole_cost)[kernel] * len(part)
        seen.append(kernel)
        return (part,)

    race = KernelRace(("a", "b", "c"))
    race.run(4096, 400, call)
    assert seen == ["a", "b", "c", "a"]
    seen.clear()
    for _ in range(4):
        race.run(4096, 400, call)
    assert seen == ["a", "b", "b", "b"]
