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
    (:func:`~cir_mine.miner.core.backend.exact_reference`)."""
    t0 = time.perf_counter()
    sample = sample_rows(prep.m, cfg.check_recall, cfg.seed, 2)
    xq = prep.qs.emb[sample]
    rec = {"queries": int(sample.size), "depth": prep.depth}
    if prep.need_ranked:
        _, Ie = exact.search(xq, prep.depth)
        _, Ia = backend.search(xq, prep.depth)
        rec["candidate_recall"] = round(candidate_recall(Ia, Ie), 4)
    ref = mine_queries(prep, cfg, exact, sample)
    n = len(prep.g)
    keys = lambda md: (
        np.unique(np.concatenate(md.out["q"]) * n + np.concatenate(md.out["row"]))
        if md.out["q"]
        else np.zeros(0, np.int64)
    )
    ka, ke = keys(mined), keys(ref)
    ka = ka[np.isin(ka // n, sample)]
    per_q_e = np.bincount(ke // n, minlength=prep.m)[sample]
    common = np.bincount(np.intersect1d(ka, ke, assume_unique=True) // n, minlength=prep.m)[sample]
    rec["negative_overlap"] = round(float(common.sum() / max(per_q_e.sum(), 1)), 4)
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec
