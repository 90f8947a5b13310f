"""Steps 3-5 of a mining run over the query batches: search, guard, select, along a ladder of depths.

Queries go through in bounded batches (``query_batch``): per batch, one search of the back-end,
guard masks and strategy selections on [batch, depth] matrices, no per-query Python loop.
Queries still short of k are mined again along a ladder of deeper depths
(:func:`depth_ladder`), from rows already searched where a deeper search costs about the same
(:class:`DepthSchedule`; those rows re-scored only for the queries that need them,
:func:`search_ahead`). A batch's guards and selections run on one thread per core, each on a
contiguous part of its queries (:func:`select_threads`). Rows depend on (inputs, config, seed) only,
never on the batch size, the parts or how deep a batch was searched.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cir_mine.data.progress import Progress
from cir_mine.data.workspace import release_pages
from cir_mine.miner.core.config import MineConfig
from cir_mine.miner.core.context import BatchContext
from cir_mine.miner.core.guards import GUARDS
from cir_mine.miner.core.prepare import Prepared
from cir_mine.miner.core.search.faiss_api import load_faiss
from cir_mine.miner.core.search.measure import Clock, usable_cores
from cir_mine.miner.core.strategies import REGISTRY

# Tuned settings (docs/search.md, "Tuned settings"): a batch's guards and selections run in parts of at
# least SELECT_PART queries, one thread per core and at most SELECT_THREADS threads (numpy releases
# the GIL on [queries, depth] matrices, so the parts run in parallel)
SELECT_PART = 512
SELECT_THREADS = 8


@dataclass
class Mined:
    """Rows picked for a set of queries (gallery rows, not yet ids) and what the guards removed."""

    # fmt: off
    out: dict                  # column -> list of arrays: q, row, part, rank, score
    got: np.ndarray            # int64[m] negatives per query (all queries of the split; 0 if not mined)
    guard_counts: dict         # guard -> int64[m]
    depth: int                 # deepest search depth used
    deepened: int              # queries searched again
    search_s: float            # seconds inside back-end searches
    select_s: float            # seconds guarding and selecting
    deepen_s: float = 0.0      # seconds of the deepening passes (search and selection)
    # fmt: on


def search_ahead(backend, xq: np.ndarray, k: int, depth: int) -> tuple:
    """(D, I, later): the exact top-``k`` rows of each query, and ``later(sel) -> (D, I)`` the
    top-``depth`` rows of the queries ``sel`` (positions in ``xq``), from one search: re-scored
    when asked by a back-end with ``search_ahead``, else searched ``depth`` deep at once."""
    if k < depth and callable(getattr(backend, "search_ahead", None)):
        return backend.search_ahead(xq, k, depth)
    D, I = backend.search(xq, depth)
    return D, I, lambda sel: (D[sel], I[sel])


def search_batches(backend, xq: np.ndarray, batches, k: int, prefetch: bool):
    """Step 3 (search): yield (q, depth, D, I, later, seconds) per item (q, depth) of ``batches``
    (an iterable of query indices and search depths, read one item ahead at most), the queries
    mined at depth ``k`` first (:func:`search_ahead`). With ``prefetch`` the next batch is searched
    in a worker thread while the caller guards the current one (FAISS releases the GIL; on a GPU
    the device is not left idle)."""

    def run(item):
        q, depth = item
        t = time.perf_counter()
        D, I, later = search_ahead(backend, xq[q], k, depth)
        return q, depth, D, I, later, time.perf_counter() - t

    it = iter(batches)
    if not prefetch:
        for item in it:
            yield run(item)
        return
    from concurrent.futures import ThreadPoolExecutor

    first = next(it, None)
    if first is None:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cir-mine-search") as pool:
        fut = pool.submit(run, first)
        for nxt in it:
            res = fut.result()
            fut = pool.submit(run, nxt)
            yield res
        yield fut.result()


def guard(ctx: BatchContext, D: np.ndarray, I: np.ndarray) -> None:
    """Step 4 (guard): the ranked candidates of the batch, exact scores, every guard applied."""
    ranks = np.broadcast_to(np.arange(I.shape[1], dtype=np.int32), I.shape)
    ctx.ranked = ctx.candidates(I, D, ranks, distinct=True)


def select_parts(ctx: BatchContext, prep: Prepared) -> tuple[dict, np.ndarray]:
    """Step 5 (select): each mined part picks its k from what the earlier parts left.
    -> (rows per column, int64[b] negatives per query); the rows' attribute overlap with the target
    is computed here, on the selection threads, rather than when the table is assembled."""
    res = {c: [] for c in COLUMNS}
    got = np.zeros(ctx.b, np.int64)
    for i, (name, ki, si) in enumerate(prep.mined):
        p = REGISTRY[name].fn(ctx, ki, si + 1, ctx.cfg.params_of(name))
        if i < len(prep.mined) - 1:  # the later parts pick from what this one left
            ctx.take(p)
        ok = p.rows >= 0
        qi, col = np.nonzero(ok)
        res["q"].append(ctx.q[qi])
        res["row"].append(p.rows[qi, col])
        res["part"].append(np.full(qi.size, si, np.int8))
        res["rank"].append(p.ranks[qi, col])
        res["score"].append(p.scores[qi, col])
        res["overlap"].append(ctx.pool.attrs.overlap(res["row"][-1], ctx.qs.target_rows[res["q"][-1]]))
        got += ok.sum(1)
    return res, got


COLUMNS = ("q", "row", "part", "rank", "score", "overlap")  # overlap: the attribute overlap with the target


def depth_ladder(prep: Prepared, cfg: MineConfig) -> list:
    """The depths a query is mined at, in order: the first-pass depth, then 4x deeper each time up
    to ``max_candidates`` (the gallery at most). A query short of k at one depth is mined again at
    the next; its rows are those of the first depth that fills it (or of the deepest)."""
    ladder = [prep.depth]
    top = min(len(prep.g), cfg.max_candidates) if cfg.max_candidates else prep.depth
    while ladder[-1] < top:
        ladder.append(min(top, ladder[-1] * 4))
    return ladder


def reserve_depth(prep: Prepared, cfg: MineConfig, backend) -> int:
    """Depth the first batch is searched at: the ladder's second depth when a deeper search costs
    about the same (``backend.cheap_depth``), so short queries are mined again from it with no
    second search; else the mining depth."""
    ladder = depth_ladder(prep, cfg)
    return ladder[min(1, len(ladder) - 1)] if getattr(backend, "cheap_depth", False) else ladder[0]


def select_threads() -> int:
    """Threads that guard and select a batch: the cores this process may run on, at most SELECT_THREADS."""
    return max(1, min(SELECT_THREADS, usable_cores()))


def _one_faiss_thread() -> None:
    """A selection thread's FAISS calls (near-duplicate scores, a strategy's own searches) run on one
    OpenMP thread: the parts already use every core. OpenMP's thread count is per calling thread, so
    the mining thread's searches keep theirs."""
    load_faiss().omp_set_num_threads(1)


PROBE_FRACTION = 4  # the first batch, whose short share picks the later batches' depth, is this much smaller


class DepthSchedule:
    """Steps 3-5 for a set of queries: search in batches, guard, select at each depth of the ladder a
    query still needs (see :func:`depth_ladder`), from the rows its batch was searched to; then
    search the queries still short again, deeper (:meth:`deepen`). Rows depend on the inputs,
    config and seed only, never on the batch size, on how deep a batch was searched, or on which
    other queries are mined.

    The schedule's state: per query, the negatives it got and the ladder index it was last mined at;
    the reserve (the ladder index first-pass batches are searched at: the second depth where a
    deeper search costs about the same, the deepest once a batch shows that most of its queries
    need it, ``backend.deep_share``)."""

    def __init__(self, prep: Prepared, cfg: MineConfig, backend, prefetch: bool = False, progress: Progress = None):
        self.prep, self.cfg, self.backend, self.prefetch, self.progress = prep, cfg, backend, prefetch, progress
        m = prep.m
        self.got = np.zeros(m, np.int64)  # negatives per query
        self.level = np.zeros(m, np.int64)  # ladder index each query was last mined at
        self.counts = {name: np.zeros(m, np.int64) for name in GUARDS}
        self.search_s = self.select_s = 0.0
        self.ladder = depth_ladder(prep, cfg)
        self.reserve = self.ladder.index(reserve_depth(prep, cfg, backend))
        self.reserved = 0  # queries mined again from rows already searched
        self.share = getattr(backend, "deep_share", None)
        self.threads = select_threads()
        self._pool = None  # the selection threads, started by the first batch large enough to split

    def mine(self, queries: np.ndarray) -> Mined:
        """Mine the query indices ``queries``: the first pass, then the deepening passes."""
        try:
            batches = self.run(self.first_items(queries), True, 0)
            t = time.perf_counter()
            batches, deepened = self.deepen(batches, queries)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
        ladder, level = self.ladder, self.level
        depth = ladder[int(level[queries].max())] if queries.size else self.prep.depth  # the deepest depth mined
        return Mined(
            {c: [v for b in batches for v in b[c]] for c in COLUMNS},
            self.got,
            self.counts,
            depth,
            deepened + self.reserved,
            self.search_s,
            self.select_s,
            time.perf_counter() - t,
        )

    def first_items(self, queries: np.ndarray):
        """First-pass batches, each searched at the current reserve, with the query count that
        keeps a batch's [queries, depth] matrices as large as at the ladder's second depth."""
        ladder = self.ladder
        second, s = ladder[min(1, len(ladder) - 1)], 0
        probe = self.share is not None and self.reserve < len(ladder) - 1
        while s < queries.size:
            depth = ladder[self.reserve]
            step = max(1, self.cfg.query_batch * second // max(depth, second))
            if probe and s == 0:
                step = max(1, step // PROBE_FRACTION)  # a smaller first batch decides where the rest goes
            yield queries[s : s + step], depth
            s += step

    def run(self, items, first_pass: bool, start: int) -> list:
        """Search each (queries, depth) item, then mine its queries from ladder index ``start``."""
        prep = self.prep
        done = []
        if prep.need_ranked:
            stream = search_batches(self.backend, prep.qs.emb, items, self.ladder[start], self.prefetch)
        else:
            stream = ((q, 0, None, None, None, 0.0) for q, _ in items)
        for q, depth, D, I, later, secs in stream:
            t = time.perf_counter()
            res = self.mine_levels(q, D, I, start, depth, later)
            done.append(res)
            release_pages(prep.pool.xb)
            self.search_s += secs
            self.select_s += time.perf_counter() - t
            if first_pass and D is not None and self.share is not None and self.reserve < len(self.ladder) - 1:
                # most of this batch must be searched again: the later batches go to the deepest
                # depth at once (``backend.deep_share``; rows are the same either way)
                if np.mean(self.got[q] < prep.k_mined) > self.share:
                    self.reserve = len(self.ladder) - 1
            if first_pass and self.progress:
                self.progress(len(q))
        return done

    def mine_levels(self, q: np.ndarray, D, I, start: int, searched: int, later) -> dict:
        """Mine ``q`` at ladder index ``start`` from (D, I), then its short queries at each deeper
        index the search (``searched`` deep) reaches, their rows from ``later(positions)``."""
        ladder = self.ladder
        res = self.mine_batch(q, D, I, ladder[start] if D is not None else 0)
        self.level[q] = start
        if D is None:
            return res
        deep = None  # (positions in q, D, I) of the rows fetched deeper, for the first short queries
        for j in range(start + 1, len(ladder)):
            if ladder[j] > searched:
                break
            short = self.got[q] < self.prep.k_mined
            if not short.any():
                break
            pos = np.flatnonzero(short)
            if deep is None:  # later levels' short queries are among these
                deep = (pos, *later(pos))
            at = np.searchsorted(deep[0], pos)
            sq = q[short]
            redo = np.zeros(self.prep.m, bool)
            redo[sq] = True
            kept = [~redo[qq] for qq in res["q"]]  # one mask per part, shared by its columns
            keep = {c: [v[k] for v, k in zip(vals, kept)] for c, vals in res.items()}
            again = self.mine_batch(sq, deep[1][at], deep[2][at], ladder[j])
            res = {c: keep[c] + again[c] for c in COLUMNS}
            self.level[sq] = j
            self.reserved += int(sq.size)
        return res

    def mine_batch(self, q: np.ndarray, D, I, depth: int) -> dict:
        """Guard and select the queries ``q`` from their first ``depth`` searched rows, in parts of
        at least SELECT_PART queries on the selection threads (one part: on this thread)."""
        parts = max(1, min(self.threads, q.size // SELECT_PART))
        cut = np.linspace(0, q.size, parts + 1).astype(np.int64)
        if parts == 1:
            outs = [self.mine_part(q, D, I, depth, self.prep.clock)]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, "cir-mine-select", initializer=_one_faiss_thread)
            clocks = [Clock() for _ in range(parts)]
            t = time.perf_counter()
            futures = [
                self._pool.submit(
                    self.mine_part,
                    q[a:b],
                    None if D is None else D[a:b],
                    None if I is None else I[a:b],
                    depth,
                    clock,
                )
                for a, b, clock in zip(cut[:-1], cut[1:], clocks)
            ]
            outs = [f.result() for f in futures]
            self._add_parallel(clocks, [o[3] for o in outs], time.perf_counter() - t)
        for a, b, (_, got, counts, _) in zip(cut[:-1], cut[1:], outs):
            self.got[q[a:b]] = got
            for name, c in counts.items():
                self.counts[name][q[a:b]] = c
        return {c: [v for o in outs for v in o[0][c]] for c in COLUMNS}

    def mine_part(self, q: np.ndarray, D, I, depth: int, clock: Clock) -> tuple:
        """Guard and select the queries ``q``: (rows per column, negatives per query, guard
        counts, seconds)."""
        t = time.perf_counter()
        ctx = BatchContext(self.prep.pool, self.prep.qs, q, self.cfg, self.backend, depth, clock)
        ctx.prepared = self.prep.prepared
        if D is not None:
            guard(ctx, D[:, :depth], I[:, :depth])
        res, got = select_parts(ctx, self.prep)
        return res, got, ctx.counts, time.perf_counter() - t

    def _add_parallel(self, clocks: list, spent: list, wall: float) -> None:
        """The stage seconds of parts run side by side: their wall time, split between the stages
        as the threads spent it."""
        total = sum(spent)
        for clock in clocks:
            for stage, secs in clock.snapshot().items():
                self.prep.clock.add(stage, wall * secs / total if total > 0 else 0.0)

    def deepen(self, batches: list, queries: np.ndarray) -> tuple:
        """Adaptive depth: queries still short after the rows their batch was searched to (typically
        those whose target ranks deep, so that the positive-aware cap removes every candidate above
        it) are searched again and mined at the next depths of the ladder. Their earlier rows are
        replaced; other queries are untouched. A back-end whose deeper searches cost about the same
        (``cheap_depth``) is searched at the deepest depth once, and the depths in between are mined
        from it; others are searched one depth at a time. -> (batches, queries searched again)."""
        prep, ladder, level, got = self.prep, self.ladder, self.level, self.got
        deepened = 0
        mine = np.zeros(prep.m, bool)
        mine[queries] = True
        cheap = getattr(self.backend, "cheap_depth", False)
        while prep.need_ranked:
            short = np.flatnonzero(mine & (got < prep.k_mined) & (level < len(ladder) - 1))
            if short.size == 0:
                break
            nxt = int(level[short].min()) + 1  # the shallowest level still to mine
            short = short[level[short] == nxt - 1]
            depth = ladder[-1] if cheap else ladder[nxt]
            redo = np.zeros(prep.m, bool)
            redo[short] = True
            batches = [{c: [v[~redo[b["q"][i]]] for i, v in enumerate(vals)] for c, vals in b.items()} for b in batches]
            step = max(1, self.cfg.query_batch * ladder[0] // depth)  # same memory per batch as the first pass
            items = [(short[s : s + step], depth) for s in range(0, short.size, step)]
            batches += self.run(items, False, nxt)
            deepened += int(short.size)
        return batches, deepened


def mine_queries(
    prep: Prepared, cfg: MineConfig, backend, queries: np.ndarray, prefetch: bool = False, progress: Progress = None
) -> Mined:
    """Steps 3-5 for the query indices ``queries`` (see :class:`DepthSchedule`)."""
    return DepthSchedule(prep, cfg, backend, prefetch, progress).mine(queries)
