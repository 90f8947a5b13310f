"""Measuring the search: where its seconds go (:class:`Clock`), and which of the kernels that return the
same candidates is faster on this machine (:class:`KernelRace`), measured on the work itself.

Which kernel is faster is a property of the machine (its BLAS, its cores, FAISS's SIMD level) and
of the batch's shape, not a constant. The first search of each shape class (queries and depth, each
rounded to a power of two) runs every kernel on its own sixteenth of the batch's queries, keeps the
seconds per query, and runs the rest of the batch with the fastest; later searches of that class, and
of classes of the same depth with up to 4x more or fewer queries, use the fastest too. Every later
batch times the kernel it runs as its class's record: a kernel a share measured faster than it runs
gives way, and one that a share measured within 2x of the fastest whole batch runs a whole batch
itself (a share is small, so its seconds per query are noisier, and higher for kernels with a fixed
cost per call). The candidates are decided exactly
afterwards (:func:`~cir_mine.miner.core.search.exact.exact_cut`), so the choice changes the time,
never the rows.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import numpy as np

from cir_mine.data.cores import usable_cores

MIN_RACE_QUERIES = 8  # a batch with fewer queries per kernel is not split to measure (too small to time)
CHALLENGER_SHARE = 16  # each kernel runs on 1/CHALLENGER_SHARE of the raced batch's queries, the fastest on the rest
NEAR_CLASSES = 2  # a measured class decides for classes of the same depth this many powers of two away
TRIAL_MARGIN = 2.0  # a kernel timed on a share within this factor of the fastest whole batch runs one whole batch


_pools: dict = {}
_pools_lock = threading.Lock()


def core_pool(name: str) -> ThreadPoolExecutor:
    """The process's pool ``name``: one thread per usable core, made on first use. Each user names
    its own, so work on one pool never waits for a task queued behind it on the same pool."""
    with _pools_lock:
        if name not in _pools:
            _pools[name] = ThreadPoolExecutor(usable_cores(), name)
        return _pools[name]


def shape_class(nq: int, depth: int) -> tuple[int, int]:
    """(queries, depth) rounded down to powers of two."""
    return int(nq).bit_length(), int(depth).bit_length()


class KernelRace:
    """Per shape class, the seconds per query each of ``names`` took on its share of one batch (the
    fastest then runs the rest of it); ``small``: the kernel of batches too small to split."""

    def __init__(self, names: Sequence[str], small: Optional[str] = None, shares: Optional[dict] = None):
        self.names = tuple(names)
        self.small = small or self.names[0]  # the kernel of batches too small to race
        # kernel -> it races on 1/this of a batch (CHALLENGER_SHARE where not given): a larger share
        # for a kernel whose cost per query falls with the queries it is given at once
        self.shares = {name: int((shares or {}).get(name, CHALLENGER_SHARE)) for name in self.names}
        self.seen: dict = {}  # shape class -> {kernel: seconds per query}
        self.whole: dict = {}  # shape class -> kernels whose seconds are a whole batch's (else a share's)
        self._lock = threading.Lock()

    def choice(self, nq: int, depth: int):
        """The kernel the next batch of this shape class runs (see :meth:`run`), or None when neither
        it nor a class of the same depth at most NEAR_CLASSES powers of two of queries away is
        measured."""
        q, d = shape_class(nq, depth)
        with self._lock:
            near = [(abs(k[0] - q), k) for k in self.seen if k[1] == d and abs(k[0] - q) <= NEAR_CLASSES]
            return self._pick(min(near)[1]) if near else None

    def _pick(self, key) -> str:
        """The fastest kernel of measured class ``key``; when that time is a whole batch's, a kernel
        timed on a share alone within TRIAL_MARGIN of it runs the next whole batch instead (a
        share's seconds per query are its own size's, noisier and mostly higher)."""
        per, whole = self.seen[key], self.whole.get(key, set())
        best = min(per, key=per.get)
        doubt = [k for k in per if best in whole and k not in whole and per[k] < TRIAL_MARGIN * per[best]]
        return min(doubt, key=per.get) if doubt else best

    def run(self, nq: int, depth: int, call: Callable[[str, np.ndarray], tuple]) -> tuple:
        """``call(kernel, query positions) -> tuple of arrays`` over all ``nq`` queries, the results
        stacked in query order. The first batch of an unmeasured shape class runs each kernel on a
        contiguous share of its queries (timed) and the fastest on the rest; later batches run
        :meth:`choice` and time it as their class's record (its other kernels' times copied from
        the class measured), so that a kernel a share measured faster than it runs gives way."""
        name = self.choice(nq, depth)
        if name is not None and len(self.names) > 1 and nq >= MIN_RACE_QUERIES:
            t = time.perf_counter()
            out = call(name, np.arange(nq, dtype=np.int64))
            self._record(nq, depth, name, (time.perf_counter() - t) / nq)
            return out
        if name is not None or len(self.names) == 1 or nq < MIN_RACE_QUERIES * (len(self.names) + 1):
            return call(name or self.small, np.arange(nq, dtype=np.int64))
        sizes = [min(max(MIN_RACE_QUERIES, nq // self.shares[k]), nq // (len(self.names) + 1)) for k in self.names]
        bounds = np.r_[0, np.cumsum(sizes), nq].astype(np.int64)
        parts, per = [], {}
        for kernel, a, b in zip(self.names, bounds[:-2], bounds[1:-1]):
            t = time.perf_counter()
            parts.append(call(kernel, np.arange(a, b, dtype=np.int64)))
            per[kernel] = (time.perf_counter() - t) / max(1, int(b - a))
        with self._lock:
            self.seen.setdefault(shape_class(nq, depth), per)
        parts.append(call(min(per, key=per.get), np.arange(bounds[-2], nq, dtype=np.int64)))
        return tuple(stack_rows([p[i] for p in parts]) for i in range(len(parts[0])))

    def _record(self, nq: int, depth: int, name: str, seconds: float) -> None:
        """``name`` took ``seconds`` per query on a whole batch: its class's record (made from the
        nearest measured class), and the record of near classes where only a share timed it."""
        own = shape_class(nq, depth)
        with self._lock:
            near = [k for k in self.seen if k[1] == own[1] and abs(k[0] - own[0]) <= NEAR_CLASSES]
            if own not in self.seen:
                self.seen[own] = dict(self.seen[min(near, key=lambda k: abs(k[0] - own[0]))])
            for key in {own, *(k for k in near if name not in self.whole.get(k, ()))}:
                self.seen[key][name] = seconds
                self.whole.setdefault(key, set()).add(name)

    def describe(self) -> dict:
        """What the footer records: per measured class, each kernel's microseconds per query."""
        with self._lock:
            return {
                f"{1 << (q - 1) if q else 0}x{1 << (d - 1) if d else 0}": {n: round(s * 1e6, 1) for n, s in per.items()}
                for (q, d), per in sorted(self.seen.items())
            }


def stack_rows(arrays: list) -> np.ndarray:
    """Arrays of consecutive queries stacked; [queries, width] ones of several widths padded to the
    widest (-1 for rows, -inf for scores)."""
    if arrays[0].ndim != 2 or len({a.shape[1] for a in arrays}) == 1:
        return np.concatenate(arrays)
    fill = -np.inf if np.issubdtype(arrays[0].dtype, np.floating) else -1
    out = np.full((sum(len(a) for a in arrays), max(a.shape[1] for a in arrays)), fill, arrays[0].dtype)
    s = 0
    for a in arrays:
        out[s : s + len(a), : a.shape[1]] = a
        s += len(a)
    return out


class Clock:
    """Seconds per stage, added from any thread."""

    def __init__(self):
        self.seconds: dict = {}
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + float(seconds)

    def timed(self, stage: str, fn: Callable, *args):
        """``fn(*args)``, its seconds added to ``stage``."""
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.add(stage, time.perf_counter() - t)

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self.seconds)
