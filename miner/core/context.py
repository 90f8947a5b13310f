"""The batch context: what a strategy sees and programs against.

A strategy (:mod:`cir_mine.miner.core.strategies.registry`) is called once per batch of b queries
as ``fn(ctx, k, stream, params) -> Picks`` with ``ctx`` a :class:`BatchContext`:

- ``ctx.ranked``: the batch's ranked search candidates (:class:`Candidates`, [b, depth] matrices of
  gallery rows, exact scores s(q, c), ranks, Δ and the guards' ``valid`` mask), or None for a mix
  that needs no search;
- candidate sources, each guarded like the ranking: :meth:`~BatchContext.candidates` (any [b, L]
  matrix of rows), :meth:`~BatchContext.random_candidates` (uniform draws from the gallery or a
  category), :meth:`~BatchContext.target_neighbors` (the target's own neighbours),
  :meth:`~BatchContext.verified_candidates` (the triplets' verified negatives);
- selection helpers: :meth:`~BatchContext.random_keys` (the seeded per-query stream),
  :meth:`~BatchContext.available` (not picked by an earlier part of the mix), :meth:`~BatchContext.take`;
- attribute views of candidates against the target and reference (:meth:`~BatchContext.status`,
  :meth:`~BatchContext.overlap`, :meth:`~BatchContext.group_diff`, ...);
- ``ctx.prepared``: the strategy's ``prepare()`` state, computed once per run.

Every matrix is indexed [query of the batch, candidate]; integer gallery rows never leave miner/.
The guards' removals are counted per query in ``ctx.counts``.
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

from cir_mine.miner.core.config import MineConfig
from cir_mine.miner.core.guards import GUARDS, apply_guards, member, pair_keys
from cir_mine.miner.core.prepare import Pool, QuerySet
from cir_mine.miner.core.scores import delta as delta_of
from cir_mine.miner.core.search.backends import search_batched
from cir_mine.miner.core.search.exact import gathered_dot
from cir_mine.miner.core.search.measure import Clock
from cir_mine.miner.core.strategies import Candidates, Picks, hash_keys


class BatchContext:
    """What a strategy sees for b queries: the guarded ranked candidates and samplers."""

    def __init__(
        self,
        pool: Pool,
        qs: QuerySet,
        q: np.ndarray,
        cfg: MineConfig,
        index=None,
        depth: int = 0,
        clock: Optional[Clock] = None,
    ):
        self.pool, self.qs, self.q, self.cfg = pool, qs, q, cfg
        self.clock = clock  # seconds of the guards (see :class:`~cir_mine.miner.core.search.measure.Clock`)
        self.index, self.depth = index, depth
        self.gcfg = cfg.guards
        self.b = len(q)
        self.local = np.arange(self.b, dtype=np.int64)
        self.counts = {g: np.zeros(self.b, np.int64) for g in GUARDS}
        self.taken_keys = np.zeros(0, np.int64)
        self.ranked: Optional[Candidates] = None
        self.prepared: dict = {}  # strategy name -> its prepare() state for this run
        self._cache: dict = {}

    # candidates
    def candidates(
        self,
        rows: np.ndarray,
        scores: Optional[np.ndarray] = None,
        ranks: Optional[np.ndarray] = None,
        distinct: bool = False,
    ) -> Candidates:
        """Guard a [b, L] matrix of gallery rows (scores s(q, c) computed when not given;
        ``distinct``: no row repeats within a query's list, as in a search's results)."""
        pool, qs, q = self.pool, self.qs, self.q
        rows = np.asarray(rows, np.int64)
        present = rows >= 0
        safe = np.where(present, rows, 0)
        if scores is None:
            scores = gathered_dot(pool.xb, rows, qs.emb[q])
        if ranks is None:
            ranks = np.full(rows.shape, -1, np.int32)
        ts = qs.target_score[q]
        d = delta_of(ts, scores)
        product = np.where(present, pool.product[safe], -1)
        t = time.perf_counter()
        valid, counts = apply_guards(
            rows,
            product,
            scores,
            lambda need: self._near_dup_sims(rows, d, need),
            ts,
            pool.product[qs.target_rows[q]],
            pool.product[qs.ref_rows[q]],
            q,
            qs.extra,
            qs.verified,
            self.gcfg,
            distinct and pool.n_products == len(pool.product),
        )
        if self.clock is not None:
            self.clock.add("guards", time.perf_counter() - t)
        for name, c in counts.items():
            self.counts[name] += c
        return Candidates(rows, product, scores.astype(np.float32, copy=False), ranks.astype(np.int32), d, valid)

    def _near_dup_sims(self, rows: np.ndarray, d: np.ndarray, need: np.ndarray) -> np.ndarray:
        """s(c, t) where ``need`` and it can reach dup_threshold, -inf elsewhere. On unit vectors
        |s(q,c) - s(q,t)| <= ||c - t|| = sqrt(2 - 2 s(c,t)), so only |Δ| <= sqrt(2(1 - τ)) can be
        near-duplicates: the rest is skipped exactly (their rows passed as -1, never read)."""
        tau = self.gcfg.dup_threshold
        bound = np.sqrt(max(0.0, 2.0 * (1.0 - tau))) + 1e-5
        check = need & (np.abs(d) <= bound) & (rows >= 0)
        xb = self.pool.xb
        return gathered_dot(xb, np.where(check, rows, -1), np.asarray(xb[self.qs.target_rows[self.q]], np.float32))

    def sim_target_full(self, c: Candidates) -> np.ndarray:
        """s(c, t) for every candidate: float32[b, L] (-inf for empty slots)."""
        key = ("sim_t", id(c))
        if key not in self._cache:
            self._cache[key] = gathered_dot(self.pool.xb, c.rows, self.pool.xb[self.qs.target_rows[self.q]])
        return self._cache[key]

    def random_candidates(self, kind: str, k: int, stream: int) -> Candidates:
        """Uniform draws from the gallery ('all'), the target's category ('same-cat') or the other
        categories ('other-cat'), in random order, guarded. Pools no larger than the number of draws
        are enumerated in a random permutation (exact); larger ones are drawn with replacement
        (repeats removed by the duplicate-product guard)."""
        pool, q = self.pool, self.q
        n = len(pool.product)
        L = 2 * k + self.cfg.random_draws
        tcat = pool.cat[self.qs.target_rows[q]]
        if kind == "all":
            start, size = np.zeros(self.b, np.int64), np.full(self.b, n, np.int64)
        else:
            cs, ce = pool.cat_start[tcat], pool.cat_start[tcat + 1]
            start, size = (cs, ce - cs) if kind == "same-cat" else (np.zeros(self.b, np.int64), n - (ce - cs))
        L = int(min(L, max(1, size.max(initial=1))))
        j = np.broadcast_to(np.arange(L, dtype=np.int64), (self.b, L))
        h = hash_keys(self.qs.qhash[q], j, stream)
        exact = (size <= L)[:, None]
        idx = np.where(exact, j, (h % np.maximum(size, 1).astype(np.uint64)[:, None]).astype(np.int64))
        ok = idx < size[:, None]
        if kind == "other-cat":
            cs, ce = pool.cat_start[tcat], pool.cat_start[tcat + 1]
            idx = np.where(idx >= cs[:, None], idx + (ce - cs)[:, None], idx)
        pos = np.where(ok, start[:, None] + idx, 0)
        rows = pool.cat_order[pos] if kind != "all" else pos
        rows = np.where(ok, rows, -1)
        # exact pools: order by a hash of the row (a random permutation); others: draw order
        order_key = np.where(exact, hash_keys(self.qs.qhash[q], rows, stream), j.astype(np.uint64))
        order_key = np.where(ok, order_key, np.iinfo(np.uint64).max)
        order = np.argsort(order_key, axis=1, kind="stable")
        return self.candidates(np.take_along_axis(rows, order, 1))

    def target_neighbors(self) -> Candidates:
        """The target's own nearest gallery images (depth ``self.depth``), guarded; ``rank`` is -1
        (not the query's ranking) and ``scores`` are s(q, c)."""
        if "target_nn" not in self._cache:
            _, I = search_batched(
                self.index, self.pool.xb[self.qs.target_rows[self.q]], self.depth, batch_size=max(1, self.b)
            )
            self._cache["target_nn"] = self.candidates(I, distinct=True)
        return self._cache["target_nn"]

    def verified_candidates(self) -> Candidates:
        return self.candidates(self.qs.verified_rows[self.q])

    # selection helpers
    def random_keys(self, c: Candidates, stream: int) -> np.ndarray:
        return hash_keys(self.qs.qhash[self.q], c.rows, stream)

    def available(self, c: Candidates) -> np.ndarray:
        """Not picked by an earlier part of the mix (compared by product)."""
        if self.taken_keys.size == 0:
            return np.ones(c.shape, bool)
        return ~member(pair_keys(self.local, c.product, self.pool.n_products), self.taken_keys)

    def take(self, p: Picks) -> None:
        ok = p.rows >= 0
        prod = self.pool.product[np.where(ok, p.rows, 0)]
        keys = pair_keys(self.local, prod, self.pool.n_products)[ok]
        self.taken_keys = np.union1d(self.taken_keys, keys)

    # attributes
    def status(self, c: Candidates) -> np.ndarray:
        return self.pool.attrs.status(self.q, np.where(c.rows >= 0, c.rows, 0))

    def overlap(self, c: Candidates) -> np.ndarray:
        return self.pool.attrs.overlap(np.where(c.rows >= 0, c.rows, 0), self.qs.target_rows[self.q][:, None])

    def group_diff(self, c: Candidates) -> np.ndarray:
        return self.pool.attrs.group_diff(np.where(c.rows >= 0, c.rows, 0), self.qs.target_rows[self.q])

    def group_present(self, c: Candidates) -> np.ndarray:
        a = self.pool.attrs
        gc = a.group_code[a.combo[np.where(c.rows >= 0, c.rows, 0)]]
        tc = a.group_code[a.combo[self.qs.target_rows[self.q]]][:, None, :]
        return (gc != 0) | (tc != 0)

    def group_asked(self) -> np.ndarray:
        return self.pool.attrs.q_group_asked[self.q]

    def group_as_reference(self, c: Candidates) -> np.ndarray:
        """bool[b, L, G]: the candidate has a value in the group and it is the reference's."""
        a = self.pool.attrs
        gc = a.group_code[a.combo[np.where(c.rows >= 0, c.rows, 0)]]
        rc = a.group_code[a.combo[self.qs.ref_rows[self.q]]][:, None, :]
        return (gc != 0) & (gc == rc)
