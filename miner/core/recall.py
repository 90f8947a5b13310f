"""The recall report of an approximate back-end against exact mining (``MineConfig.check_recall``)."""

from __future__ import annotations

import time

import numpy as np

from cir_mine.miner.core.config import MineConfig
from cir_mine.miner.core.prepare import Prepared
from cir_mine.miner.core.schedule import Mined, mine_queries
from cir_mine.miner.core.search.build import sample_rows
from cir_mine.miner.core.search.tuning import candidate_recall


def check_recall(prep: Prepared, cfg: MineConfig, backend, mined: Mined, exact) -> dict:
    """The recall report: on ``cfg.check_recall`` sampled queries, candidate recall@depth of the
    back-end against exact search, and the share of each query's mined negatives that exact
    mining (same config, seed and queries) also picks. ``exact``: the reference's exact search
    (:func:`~cir_mine.miner.core.backend.exact_reference`); exact mining of the sample runs
    first, and the candidate recall reads its exact rows where that mining searched deep enough."""
    t0 = time.perf_counter()
    sample = sample_rows(prep.m, cfg.check_recall, cfg.seed, 2)
    xq = prep.qs.emb[sample]
    rec = {"queries": int(sample.size), "depth": prep.depth}
    exact = Remembered(exact)
    ref = mine_queries(prep, cfg, exact, sample)
    if prep.need_ranked:
        _, Ie = exact.search(xq, prep.depth)
        _, Ia = backend.search(xq, prep.depth)
        rec["candidate_recall"] = round(candidate_recall(Ia, Ie), 4)
    n = len(prep.g)
    picked = np.zeros(prep.m, bool)
    picked[sample] = True

    def keys(md: Mined) -> np.ndarray:  # query * n + row of every negative of a sampled query
        if not md.out["q"]:
            return np.zeros(0, np.int64)
        q, row = np.concatenate(md.out["q"]), np.concatenate(md.out["row"])
        return np.unique(q[picked[q]] * n + row[picked[q]])

    ka, ke = keys(mined), keys(ref)
    per_q_e = np.bincount(ke // n, minlength=prep.m)[sample]
    common = np.bincount(np.intersect1d(ka, ke, assume_unique=True) // n, minlength=prep.m)[sample]
    rec["negative_overlap"] = round(float(common.sum() / max(per_q_e.sum(), 1)), 4)
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


class Remembered:
    """An exact back-end whose results are kept per query vector: a search no deeper than one
    already made for the same vectors is answered from it, since an exact search's top k are the
    first k of any deeper one (the search contract: exact scores whatever the batch, ties to the
    lower row). Everything else is the wrapped back-end's."""

    def __init__(self, inner):
        self.inner = inner
        self.kept: dict = {}  # query vector bytes -> (D, I) of its deepest search

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _keep(self, xq: np.ndarray, D: np.ndarray, I: np.ndarray) -> None:
        for v, d, i in zip(xq, D, I):
            have = self.kept.get(v.tobytes())
            if have is None or have[1].size < i.size:
                self.kept[v.tobytes()] = (d, i)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        xq = np.ascontiguousarray(xq, np.float32)
        k = int(min(k, self.inner.ntotal))
        got = [self.kept.get(v.tobytes()) for v in xq]
        if len(xq) and all(g is not None and g[1].size >= k for g in got):
            return np.stack([g[0][:k] for g in got]), np.stack([g[1][:k] for g in got])
        D, I = self.inner.search(xq, k)
        self._keep(xq, D, I)
        return D, I

    def search_ahead(self, xq: np.ndarray, k: int, deep: int) -> tuple:
        """The wrapped back-end's ``search_ahead`` (else one search ``deep`` deep, as the schedule
        searches a back-end without it), its results kept."""
        xq = np.ascontiguousarray(xq, np.float32)
        if not callable(getattr(self.inner, "search_ahead", None)):
            D, I = self.search(xq, deep)
            return D, I, lambda sel: (D[sel], I[sel])
        D, I, later = self.inner.search_ahead(xq, k, deep)
        self._keep(xq, D, I)

        def kept_later(sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            Dl, Il = later(sel)
            self._keep(xq[np.asarray(sel, np.int64)], Dl, Il)
            return Dl, Il

        return D, I, kept_later
