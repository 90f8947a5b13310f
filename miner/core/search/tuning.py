"""Recall is measured, not assumed: tune an approximate back-end's search parameter to a candidate
recall@depth measured against exact search on a sample of the composed queries."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from cir_mine.miner.core.search.backends import Reranked
from cir_mine.miner.core.search.lists import probe_positions
from cir_mine.miner.core.search.params import SEARCH_PARAM, faiss_nlist, set_search_params, tunable

log = logging.getLogger(__name__)


def candidate_recall(I_approx: np.ndarray, I_exact: np.ndarray) -> float:
    """Mean over queries of |approx ∩ exact| / |exact| for two int64[b, k] row lists (-1 ignored)."""
    hits, total = 0, 0
    for a, e in zip(I_approx, I_exact):
        e = e[e >= 0]
        hits += np.intersect1d(a[a >= 0], e, assume_unique=True).size
        total += e.size
    return float(hits / total) if total else 1.0


@dataclass
class Tuning:
    # fmt: off
    param: str                     # tuned parameter ('' when nothing was tunable)
    value: Optional[int]           # chosen value
    recall: float                  # candidate recall@depth at the chosen value
    target: float                  # the asked recall
    reached: bool                  # recall >= target
    depth: int                     # depth the recall was measured at
    queries: int                   # sampled queries
    tried: list = field(default_factory=list)   # [(value, recall, seconds)]
    seconds: float = 0.0
    overfetch: float = 1.0         # over-fetch the recall was reached with
    deep: Optional[dict] = None    # the deepest depth's tuning: {"depth", "value", "recall", "reached", "tried"}
    method: str = "search"         # how recall was measured: "search" (a search per value) or "lists" (probe_positions)
    # fmt: on

    def to_dict(self) -> dict:
        out = {
            "param": self.param,
            "value": self.value,
            "recall": round(self.recall, 4),
            "target": self.target,
            "reached": self.reached,
            "depth": self.depth,
            "queries": self.queries,
            "tried": [[v, round(r, 4), round(s, 3)] for v, r, s in self.tried],
            "seconds": round(self.seconds, 3),
            "overfetch": self.overfetch,
            "method": self.method,
        }
        if self.deep is not None:
            out["deep"] = self.deep
        return out


# Recall gained by doubling nprobe / efSearch below which the search is limited by something else:
# for compressed codes, by how many candidates are re-ranked, so the over-fetch doubles instead.
PLATEAU = 0.005


def recall_by_nprobe(pos: np.ndarray, nlist: int) -> np.ndarray:
    """float64[nlist + 1]: candidate recall (pooled, as :func:`candidate_recall`) at every nprobe
    0..nlist, from :func:`probe_positions` of the exact rows."""
    p = pos[pos >= 0]
    if p.size == 0:
        return np.ones(nlist + 1)
    return np.r_[0.0, np.cumsum(np.bincount(p, minlength=nlist)[:nlist]) / p.size]


def cheapest_nprobe(curve: np.ndarray, target: float, low: int = 1) -> int:
    """The smallest nprobe >= ``low`` whose recall on ``curve`` reaches ``target`` (every list when none does)."""
    hit = np.flatnonzero(curve[low:] >= target)
    return int(low + hit[0]) if hit.size else len(curve) - 1


def by_lists(backend: "Reranked") -> bool:
    """Recall can be read off the lists (no search per value): a CPU IVF-Flat whose candidates are all
    re-ranked exactly, so a search returns every exact row its probed lists hold."""
    return backend.lists is not None and backend.overfetch == 1


def list_positions(backend: "Reranked", xq: np.ndarray, exact_I: np.ndarray) -> np.ndarray:
    """:func:`probe_positions` of the exact rows ``exact_I`` of queries ``xq`` in ``backend``'s lists
    (see :func:`by_lists`): int32[b, L]. Those of the first ``depth`` exact rows are its first
    ``depth`` columns, so one call serves the tuning at every depth."""
    return probe_positions(backend.lists, backend.layout_of(), xq, exact_I)


def _lists_curve(backend: "Reranked", xq: np.ndarray, exact_I: np.ndarray, positions=None) -> np.ndarray:
    """Recall at every nprobe of ``backend`` (see :func:`by_lists`) for queries ``xq`` whose exact
    rows are ``exact_I`` (``positions``: their :func:`list_positions`, when already made)."""
    pos = list_positions(backend, xq, exact_I) if positions is None else positions[:, : exact_I.shape[1]]
    return recall_by_nprobe(pos, backend.lists.nlist)


def _lists_tried(curve: np.ndarray, value: int) -> list:
    """The curve at the powers of two below ``value`` and at ``value``: [(nprobe, recall, 0.0)]."""
    points = [v for v in (2**i for i in range(31)) if v < value] + [value]
    return [(int(v), float(curve[v]), 0.0) for v in points]


DEEP_STEPS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)  # deep tuning: multiples of the tuned value tried


def tune_deep(
    backend: Reranked, exact_I: np.ndarray, xq: np.ndarray, depth: int, target: float, positions=None
) -> Optional[dict]:
    """After :func:`tune`: the cheapest multiple (DEEP_STEPS) of the tuned value whose candidate
    recall@``depth`` (the deepest depth deepening searches; ``exact_I`` that deep) reaches
    ``target``, recorded in ``backend.info["deep"]`` for :meth:`Reranked.beam_for`. Recall falls
    more slowly with depth than the value-to-depth ratio assumes, so this probes fewer lists than
    scaling would. A :func:`by_lists` back-end reads it off its lists instead: the smallest nprobe at
    or above the tuned one that reaches ``target`` (``positions``: :func:`list_positions` of
    ``exact_I``, when made). None (nothing recorded) when the back-end has no tuned value."""
    name = SEARCH_PARAM.get(backend.kind)
    tuned = (backend.info.get("params") or {}).get(name)
    if not name or not tuned or hasattr(backend.source, "getDevice"):
        return None
    t0, tried = time.perf_counter(), []
    if name == "nprobe" and by_lists(backend):
        curve = _lists_curve(backend, xq, exact_I[:, :depth], positions)
        v = cheapest_nprobe(curve, target, low=int(tuned))
        r, method = float(curve[v]), "lists"
        tried = [[a, round(c, 4), t] for a, c, t in _lists_tried(curve, v) if a >= tuned]
        backend.info["deep"] = {"depth": int(depth), "params": {name: int(v)}}
    else:
        top = faiss_nlist(backend.source) if name == "nprobe" else 1 << 14
        method = "search"
        for v in sorted({min(top, int(math.ceil(tuned * f))) for f in DEEP_STEPS}):
            ts = time.perf_counter()
            backend.info["deep"] = {"depth": int(depth), "params": {name: int(v)}}  # searched as mining will
            _, I = backend.search(xq, depth)
            r = candidate_recall(I, exact_I[:, :depth])
            tried.append([v, round(r, 4), round(time.perf_counter() - ts, 3)])
            if r >= target:
                break
    return {
        "depth": int(depth),
        "value": int(v),
        "recall": round(r, 4),
        "reached": bool(r >= target),
        "tried": tried,
        "seconds": round(time.perf_counter() - t0, 3),
        "method": method,
    }


def tune(
    backend: Reranked,
    exact_I: np.ndarray,
    xq: np.ndarray,
    depth: int,
    target: float,
    max_overfetch: float = 32.0,
    positions=None,
) -> Tuning:
    """Set the cheapest value of the index's search parameter whose candidate recall@``depth`` on the
    sample ``xq`` (exact rows ``exact_I``) reaches ``target``. For an index that stores compressed
    codes (over-fetch > 1), recall that stops rising with the parameter (less than PLATEAU per
    doubling), or falls short at its largest value, is limited by the code's ranking: the over-fetch
    doubles (up to ``max_overfetch``) at the same value before the parameter grows further. The
    largest tried when none reaches it. A CPU IVF-Flat re-ranked exactly (:func:`by_lists`) reads
    the recall at every nprobe off its lists instead of searching, and takes the smallest that
    reaches the target (``positions``: :func:`list_positions` of ``exact_I``, when made)."""
    t0 = time.perf_counter()
    name, values = tunable(backend.source)
    if not name:
        _, I = backend.search(xq, depth)
        r = candidate_recall(I, exact_I)
        return Tuning("", None, r, target, r >= target, depth, len(xq), [], time.perf_counter() - t0)
    if name == "nprobe" and by_lists(backend):
        curve = _lists_curve(backend, xq, exact_I, positions)
        v = cheapest_nprobe(curve, target)
        r, tried, method = float(curve[v]), _lists_tried(curve, v), "lists"
    else:
        v, r, tried = _tune_by_search(backend, name, values, exact_I, xq, depth, target, max_overfetch)
        method = "search"
    backend.set_params({name: v})
    backend.info["depth"] = int(depth)  # the depth this recall holds at (see Reranked.beam_for)
    if r < target:
        log.warning("search tuning: %s=%d reaches candidate recall %.3f < %.3f", name, v, r, target)
    return Tuning(
        name,
        v,
        r,
        target,
        r >= target,
        depth,
        len(xq),
        tried,
        time.perf_counter() - t0,
        backend.overfetch,
        method=method,
    )


def _tune_by_search(
    backend: Reranked,
    name: str,
    values: list,
    exact_I: np.ndarray,
    xq: np.ndarray,
    depth: int,
    target: float,
    max_overfetch: float,
) -> tuple:
    """:func:`tune`'s search per value (doubling the over-fetch of compressed codes where recall
    stalls). -> (value, its recall, [(value, recall, seconds)] tried)."""
    tried = []
    i, prev = 0, None
    while True:
        v = values[i]
        set_search_params(backend.source, {name: v})
        ts = time.perf_counter()
        _, I = backend.search(xq, depth)
        r = candidate_recall(I, exact_I)
        tried.append((v, r, time.perf_counter() - ts))
        if r >= target:
            return v, r, tried
        last = i == len(values) - 1
        stalled = prev is not None and r - prev < PLATEAU
        if backend.overfetch > 1 and (stalled or last) and backend.overfetch * 2 <= max_overfetch:
            backend.overfetch *= 2  # compressed codes: fetch more, re-rank exactly
            prev = None
            continue
        if last:
            return v, r, tried
        prev, i = r, i + 1
