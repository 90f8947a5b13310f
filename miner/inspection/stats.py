"""Summary statistics of negatives tables, computed in DuckDB over the views of :mod:`.sql`.

``summarize`` returns plain numbers (Δ quantiles and histogram, category and attribute mix,
shortfall, round-to-round overlap); ``format_stats`` turns them into text for the CLI.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from cir_mine.miner.core.tables import NegativesTable
from cir_mine.miner.inspection.sql import open_tables, still_current

log = logging.getLogger(__name__)


QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


HIST_BINS = 20


# attr_overlap buckets: (label, lo, hi) with lo <= x < hi, the last one closed
OVERLAP_BUCKETS = (("0", 0.0, 1e-9), ("(0, 0.5)", 1e-9, 0.5), ("[0.5, 1)", 0.5, 1.0 - 1e-9), ("1", 1.0 - 1e-9, 2.0))


@dataclass
class TableStats:
    """Numbers of one negatives table (all plain Python / numpy, no rendering)."""

    # fmt: off
    path: str
    rows: int                        # (query, negative) rows
    queries: int                     # distinct query_id
    k: Optional[int]                 # k from the mining config, when recorded
    per_query: dict                  # min / mean / median / max negatives per query
    delta_quantiles: dict            # q -> Δ quantile (linear interpolation, as numpy)
    delta_hist: tuple                # (counts int64[b], edges float64[b+1]) over [min Δ, max Δ]
    delta_mean: float
    strategies: dict                 # strategy -> rows
    rounds: list                     # distinct round values
    category_match: float            # share of rows whose negative has the target's category
    neg_categories: dict             # negative category -> rows (needs the workspace; {} without)
    attr_overlap_mean: float
    attr_overlap_mix: dict           # bucket label -> share of rows
    shortfall: dict                  # {"count": int, "query_ids": [...], "hints": [...], ...} from the table metadata
    mined_queries: Optional[int]     # queries the miner was given (metadata n_queries), None if unrecorded
    guards: dict                     # guard -> candidates removed (table metadata), {} if unrecorded
    # fmt: on


@dataclass
class Stats:
    # fmt: off
    tables: list[TableStats]
    overlap: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # float64[n, n] Jaccard of (query, neg) pairs
    shared_pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))  # int64[n, n] |A ∩ B|
    # fmt: on


def _table_stats(con, view: str, nt: NegativesTable, has_gallery: bool) -> TableStats:
    one = lambda sql: con.execute(sql).fetchone()
    rows, queries = one(f"SELECT count(*), count(DISTINCT query_id) FROM {view}")
    pq_ = one(f"SELECT min(n), avg(n), median(n), max(n) FROM (SELECT count(*) AS n FROM {view} GROUP BY query_id)")
    qs = ", ".join(f"quantile_cont(delta, {q})" for q in QUANTILES)
    qv = one(f"SELECT {qs}, avg(delta), avg(category_match::DOUBLE), avg(attr_overlap) FROM {view}")
    delta = con.execute(f"SELECT delta FROM {view}").fetchnumpy()["delta"].astype(np.float64)
    counts, edges = np.histogram(delta, bins=HIST_BINS) if rows else (np.zeros(0, np.int64), np.zeros(1))
    strategies = dict(con.execute(f"SELECT strategy, count(*) FROM {view} GROUP BY 1 ORDER BY 2 DESC, 1").fetchall())
    rounds = [r[0] for r in con.execute(f"SELECT DISTINCT round FROM {view} ORDER BY 1").fetchall()]
    buckets = ", ".join(f"avg((attr_overlap >= {lo} AND attr_overlap < {hi})::DOUBLE)" for _, lo, hi in OVERLAP_BUCKETS)
    mix = one(f"SELECT {buckets} FROM {view}")
    neg_cats = {}
    if has_gallery:
        neg_cats = dict(
            con.execute(
                f"SELECT coalesce(g.category, '(not in gallery)'), count(*) FROM {view} n LEFT JOIN "
                f"(SELECT image_id, any_value(category) AS category FROM gallery GROUP BY 1) g "
                f"ON n.neg_id = g.image_id GROUP BY 1 ORDER BY 2 DESC, 1"
            ).fetchall()
        )
    sf = nt.meta.get("shortfall") or {}
    guards = nt.meta.get("guards") or {}
    k = nt.meta.get("k", nt.config.get("k"))
    nan = float("nan")
    return TableStats(
        path=str(nt.path),
        rows=int(rows),
        queries=int(queries),
        k=int(k) if k is not None else None,
        per_query=dict(zip(("min", "mean", "median", "max"), (float(x) if x is not None else nan for x in pq_))),
        delta_quantiles={q: (float(v) if v is not None else nan) for q, v in zip(QUANTILES, qv)},
        delta_hist=(counts.astype(np.int64), edges),
        delta_mean=float(qv[len(QUANTILES)] or nan),
        strategies=strategies,
        rounds=rounds,
        category_match=float(qv[len(QUANTILES) + 1] if qv[len(QUANTILES) + 1] is not None else nan),
        neg_categories=neg_cats,
        attr_overlap_mean=float(qv[len(QUANTILES) + 2] if qv[len(QUANTILES) + 2] is not None else nan),
        attr_overlap_mix={lab: float(v or 0.0) for (lab, _, _), v in zip(OVERLAP_BUCKETS, mix)},
        shortfall={
            **sf,
            "count": int(sf.get("count", len(sf.get("query_ids", [])))),
            "query_ids": list(sf.get("query_ids", [])),
            "hints": list(sf.get("hints") or []),
        },
        mined_queries=int(nt.meta["n_queries"]) if "n_queries" in nt.meta else None,
        guards={g: int(v.get("removed", 0) if isinstance(v, dict) else v) for g, v in guards.items()},
    )


def pair_overlap(con, views: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Jaccard overlap of the distinct (query_id, neg_id) pairs of every two views.

    Returns (jaccard float64[n, n], shared int64[n, n]); the diagonal is 1 (0 for an empty table).
    """
    n = len(views)
    sizes = [
        con.execute(f"SELECT count(*) FROM (SELECT DISTINCT query_id, neg_id FROM {v})").fetchone()[0] for v in views
    ]
    jac, shared = np.zeros((n, n)), np.zeros((n, n), np.int64)
    for i in range(n):
        shared[i, i], jac[i, i] = sizes[i], 1.0 if sizes[i] else 0.0
        for j in range(i + 1, n):
            inter = con.execute(
                f"SELECT count(*) FROM (SELECT query_id, neg_id FROM {views[i]} "
                f"INTERSECT SELECT query_id, neg_id FROM {views[j]})"
            ).fetchone()[0]
            union = sizes[i] + sizes[j] - inter
            shared[i, j] = shared[j, i] = inter
            jac[i, j] = jac[j, i] = inter / union if union else 0.0
    return jac, shared


def summarize(neg_paths: Sequence[str | Path], work: Optional[str | Path] = None, split: Optional[str] = None) -> Stats:
    """``cir-mine stats``: per-table statistics and, for several tables, their pair overlap."""
    con, tables, ws, split = open_tables(neg_paths, work, split)
    stats = stats_of(con, tables, has_gallery=ws is not None)
    still_current(tables, ws, split)
    return stats


def stats_of(con, tables: Sequence[NegativesTable], has_gallery: bool) -> Stats:
    """Statistics of the tables opened by :func:`open_tables` (views ``t{i}``)."""
    out = [_table_stats(con, f"t{i}", t, has_gallery) for i, t in enumerate(tables)]
    jac, shared = pair_overlap(con, [f"t{i}" for i in range(len(tables))])
    return Stats(out, jac, shared)


def text_histogram(counts: np.ndarray, edges: np.ndarray, width: int = 40) -> list[str]:
    """One line per bin: ``[lo, hi)  count  ####``; bar length proportional to the count."""
    top = max(int(counts.max()) if len(counts) else 0, 1)
    lines = []
    for c, lo, hi in zip(counts.tolist(), edges[:-1], edges[1:]):
        bar = "#" * int(round(width * c / top))
        lines.append(f"  [{lo:+.3f}, {hi:+.3f})  {c:>8}  {bar}")
    return lines


def _label(text, n: int = 48) -> str:
    """A category as printed: cut to ``n`` characters ("…" marks the cut)."""
    text = str(text or "")
    return text if len(text) <= n else text[: n - 1] + "…"


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"


def format_stats(stats: Stats) -> str:
    out = []
    for i, s in enumerate(stats.tables):
        out.append(f"== [{i}] {s.path}")
        of = f" (of {s.mined_queries} mined)" if s.mined_queries is not None and s.mined_queries != s.queries else ""
        out.append(
            f"rows: {s.rows}  queries: {s.queries}{of}  k: {s.k if s.k is not None else '?'}  "
            f"rounds: {', '.join(map(str, s.rounds)) or '-'}"
        )
        pqs = s.per_query
        none = s.mined_queries - s.queries if s.mined_queries is not None else 0
        out.append(
            f"negatives per query: min {pqs['min']:.0f}  mean {pqs['mean']:.2f}  "
            f"median {pqs['median']:.1f}  max {pqs['max']:.0f}"
            + (f"  (over queries with any; {none} mined queries got none)" if none > 0 else "")
        )
        out.append("strategies: " + ", ".join(f"{k} {v}" for k, v in s.strategies.items()))
        out.append(
            "delta quantiles: "
            + "  ".join(f"q{int(q * 100):02d} {v:+.4f}" for q, v in s.delta_quantiles.items())
            + f"  mean {s.delta_mean:+.4f}"
        )
        out.append(f"delta histogram ({HIST_BINS} bins):")
        out.extend(text_histogram(*s.delta_hist))
        out.append(f"category mix: same category {_pct(s.category_match)}, other {_pct(1 - s.category_match)}")
        if s.neg_categories:
            out.append(
                "negative categories: " + ", ".join(f"{_label(k) or '-'} {v}" for k, v in s.neg_categories.items())
            )
        out.append(
            f"attribute overlap: mean {s.attr_overlap_mean:.3f}; "
            + ", ".join(f"{k} {_pct(v)}" for k, v in s.attr_overlap_mix.items())
        )
        ids = s.shortfall["query_ids"]
        more = f" ... (+{len(ids) - 10})" if len(ids) > 10 else ""
        out.append(
            f"shortfall: {s.shortfall['count']} queries with fewer than k negatives"
            + (f": {', '.join(ids[:10])}{more}" if ids else "")
        )
        if s.shortfall["count"] and s.shortfall["hints"]:
            out.append("to loosen: " + "; ".join(s.shortfall["hints"]))
        if s.guards:
            out.append("guards removed: " + ", ".join(f"{k} {v}" for k, v in s.guards.items()))
        out.append("")
    n = len(stats.tables)
    if n > 1:
        out.append("overlap between tables (Jaccard of (query_id, neg_id) pairs; shared pairs):")
        for i in range(n):
            for j in range(i + 1, n):
                out.append(f"  [{i}] vs [{j}]: {stats.overlap[i, j]:.4f}  ({stats.shared_pairs[i, j]} shared)")
    return "\n".join(out).rstrip() + "\n"
