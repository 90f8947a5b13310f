"""Negatives tables in DuckDB: views, summary statistics, round-to-round overlap, ad-hoc SQL.

``connect`` opens an in-memory DuckDB with the views

- ``negs``: every given negatives table (``read_parquet([...])``) plus a ``filename`` column;
- ``gallery``, ``triplets``: the workspace tables of one split without their embedding columns;
- ``gallery_emb`` (image_id, category, embedding), ``triplet_emb`` (query_id, text_embedding):
  the embeddings as DuckDB ``FLOAT[d]`` arrays, for similarity queries (``array_cosine_similarity``).

Every view reads the Parquet files directly (nothing is copied). The statistics are computed in
DuckDB; ``summarize`` returns plain numbers (no rendering), ``format_stats``/``format_rows`` turn
them into text for the CLI.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import duckdb
import numpy as np
import pyarrow.parquet as pq

from data.errors import DataError, UsageError
from data.workspace import Workspace
from miner.tables import NegativesTable, read_negatives

log = logging.getLogger(__name__)

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
HIST_BINS = 20
# attr_overlap buckets: (label, lo, hi) with lo <= x < hi, the last one closed
OVERLAP_BUCKETS = (("0", 0.0, 1e-9), ("(0, 0.5)", 1e-9, 0.5), ("[0.5, 1)", 0.5, 1.0 - 1e-9), ("1", 1.0 - 1e-9, 2.0))


def _lit(path: Path | str) -> str:
    """A SQL string literal."""
    return "'" + str(path).replace("'", "''") + "'"


def load_tables(paths: Sequence[str | Path], ws: Optional[Workspace] = None) -> list[NegativesTable]:
    """Read and validate each negatives table (refusing tables of another workspace when ``ws``)."""
    if not paths:
        raise UsageError("give at least one negatives table (NEGS.parquet).")
    return [read_negatives(p, ws) for p in paths]


def table_split(tables: Sequence[NegativesTable], split: Optional[str]) -> str:
    """The split to read the workspace at: ``split`` if given, else the tables' own (default train)."""
    if split:
        return split
    splits = sorted({t.meta.get("split") or "train" for t in tables})
    if len(splits) > 1:
        raise UsageError(f"the tables were mined on different splits ({', '.join(splits)}); pass one with --split.")
    return splits[0] if splits else "train"


def connect(neg_paths: Sequence[str | Path], ws: Optional[Workspace] = None,
            split: str = "train") -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the views described in the module docstring."""
    con = duckdb.connect(":memory:")
    if neg_paths:
        files = ", ".join(_lit(Path(p).resolve()) for p in neg_paths)
        con.execute(f"CREATE VIEW negs AS SELECT * FROM read_parquet([{files}], filename = true)")
    if ws is not None:
        gp, tp = ws.gallery_path(split), ws.triplets_path(split)
        if not gp.exists():
            have = ", ".join(ws.splits()) or "none"
            raise DataError(f"{gp}: file not found; splits in {ws.root}: {have}. Pass one with --split.")
        gcols = [c for c in pq.read_schema(gp).names if c != "embedding"]
        con.execute(f"CREATE VIEW gallery AS SELECT {', '.join(gcols)} FROM read_parquet({_lit(gp.resolve())})")
        d = pq.read_schema(gp).field("embedding").type.list_size
        con.execute(f"CREATE VIEW gallery_emb AS SELECT image_id, category, embedding::FLOAT[{d}] AS embedding "
                    f"FROM read_parquet({_lit(gp.resolve())})")
        if tp.exists():
            tcols = [c for c in pq.read_schema(tp).names if c != "text_embedding"]
            con.execute(f"CREATE VIEW triplets AS SELECT {', '.join(tcols)} FROM read_parquet({_lit(tp.resolve())})")
            con.execute(f"CREATE VIEW triplet_emb AS SELECT query_id, text_embedding::FLOAT[{d}] AS text_embedding "
                        f"FROM read_parquet({_lit(tp.resolve())})")
    return con


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[tuple]


def run_sql(con: duckdb.DuckDBPyConnection, sql: str) -> QueryResult:
    """Run one SQL statement; DuckDB errors become DataError naming the views."""
    try:
        rel = con.execute(sql)
        cols = [d[0] for d in rel.description] if rel.description else []
        rows = rel.fetchall() if cols else []
    except duckdb.Error as e:
        first = str(e).strip().splitlines()[0].rstrip(".!") if str(e).strip() else type(e).__name__
        have = [r[0] for r in con.execute(
            "SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY view_name").fetchall()
            if not re.fullmatch(r"t\d+", r[0])]
        hint = "" if "gallery" in have else "; gallery and triplets need --work"
        raise DataError(f"SQL: {first}. Views: {', '.join(have) or 'none'}{hint}. "
                        f"See docs/queries.md for examples.") from None
    return QueryResult(cols, rows)


def sql_query(sql: str, neg_paths: Sequence[str | Path], work: Optional[str | Path] = None,
              split: Optional[str] = None) -> QueryResult:
    """``cir-mine sql``: validate the tables, open the views, run ``sql``."""
    ws = Workspace(work).require() if work is not None else None
    tables = load_tables(neg_paths, ws) if neg_paths else []
    con = connect(neg_paths, ws, table_split(tables, split) if tables else (split or "train"))
    return run_sql(con, sql)


# ----------------------------------------------------------------------------------------------
# Statistics


@dataclass
class TableStats:
    """Numbers of one negatives table (all plain Python / numpy, no rendering)."""

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


@dataclass
class Stats:
    tables: list[TableStats]
    overlap: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # float64[n, n] Jaccard of (query, neg) pairs
    shared_pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))  # int64[n, n] |A ∩ B|


def _table_stats(con, view: str, nt: NegativesTable, has_gallery: bool) -> TableStats:
    one = lambda sql: con.execute(sql).fetchone()
    rows, queries = one(f"SELECT count(*), count(DISTINCT query_id) FROM {view}")
    pq_ = one(f"SELECT min(n), avg(n), median(n), max(n) FROM "
              f"(SELECT count(*) AS n FROM {view} GROUP BY query_id)")
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
        neg_cats = dict(con.execute(
            f"SELECT coalesce(g.category, '(not in gallery)'), count(*) FROM {view} n LEFT JOIN "
            f"(SELECT image_id, any_value(category) AS category FROM gallery GROUP BY 1) g "
            f"ON n.neg_id = g.image_id GROUP BY 1 ORDER BY 2 DESC, 1").fetchall())
    sf = nt.meta.get("shortfall") or {}
    guards = nt.meta.get("guards") or {}
    k = nt.meta.get("k", nt.config.get("k"))
    nan = float("nan")
    return TableStats(
        path=str(nt.path), rows=int(rows), queries=int(queries), k=int(k) if k is not None else None,
        per_query=dict(zip(("min", "mean", "median", "max"), (float(x) if x is not None else nan for x in pq_))),
        delta_quantiles={q: (float(v) if v is not None else nan) for q, v in zip(QUANTILES, qv)},
        delta_hist=(counts.astype(np.int64), edges), delta_mean=float(qv[len(QUANTILES)] or nan),
        strategies=strategies, rounds=rounds,
        category_match=float(qv[len(QUANTILES) + 1] if qv[len(QUANTILES) + 1] is not None else nan),
        neg_categories=neg_cats,
        attr_overlap_mean=float(qv[len(QUANTILES) + 2] if qv[len(QUANTILES) + 2] is not None else nan),
        attr_overlap_mix={lab: float(v or 0.0) for (lab, _, _), v in zip(OVERLAP_BUCKETS, mix)},
        shortfall={**sf, "count": int(sf.get("count", len(sf.get("query_ids", [])))),
                   "query_ids": list(sf.get("query_ids", [])), "hints": list(sf.get("hints") or [])},
        mined_queries=int(nt.meta["n_queries"]) if "n_queries" in nt.meta else None,
        guards={g: int(v.get("removed", 0) if isinstance(v, dict) else v) for g, v in guards.items()},
    )


def pair_overlap(con, views: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Jaccard overlap of the distinct (query_id, neg_id) pairs of every two views.

    Returns (jaccard float64[n, n], shared int64[n, n]); the diagonal is 1 (0 for an empty table).
    """
    n = len(views)
    sizes = [con.execute(f"SELECT count(*) FROM (SELECT DISTINCT query_id, neg_id FROM {v})").fetchone()[0]
             for v in views]
    jac, shared = np.zeros((n, n)), np.zeros((n, n), np.int64)
    for i in range(n):
        shared[i, i], jac[i, i] = sizes[i], 1.0 if sizes[i] else 0.0
        for j in range(i + 1, n):
            inter = con.execute(f"SELECT count(*) FROM (SELECT query_id, neg_id FROM {views[i]} "
                                f"INTERSECT SELECT query_id, neg_id FROM {views[j]})").fetchone()[0]
            union = sizes[i] + sizes[j] - inter
            shared[i, j] = shared[j, i] = inter
            jac[i, j] = jac[j, i] = inter / union if union else 0.0
    return jac, shared


def open_tables(neg_paths: Sequence[str | Path], work: Optional[str | Path] = None,
                split: Optional[str] = None):
    """Validate the tables and open the views; also one view ``t{i}`` per table.

    Returns (con, tables, ws, split).
    """
    ws = Workspace(work).require() if work is not None else None
    tables = load_tables(neg_paths, ws)
    split = table_split(tables, split)
    con = connect(neg_paths, ws, split)
    for i, t in enumerate(tables):
        con.execute(f"CREATE VIEW t{i} AS SELECT * FROM read_parquet({_lit(Path(t.path).resolve())})")
    return con, tables, ws, split


def summarize(neg_paths: Sequence[str | Path], work: Optional[str | Path] = None,
              split: Optional[str] = None) -> Stats:
    """``cir-mine stats``: per-table statistics and, for several tables, their pair overlap."""
    con, tables, ws, split = open_tables(neg_paths, work, split)
    return stats_of(con, tables, has_gallery=ws is not None)


def stats_of(con, tables: Sequence[NegativesTable], has_gallery: bool) -> Stats:
    """Statistics of the tables opened by :func:`open_tables` (views ``t{i}``)."""
    out = [_table_stats(con, f"t{i}", t, has_gallery) for i, t in enumerate(tables)]
    jac, shared = pair_overlap(con, [f"t{i}" for i in range(len(tables))])
    return Stats(out, jac, shared)


# ----------------------------------------------------------------------------------------------
# Text rendering (pure functions; the CLI echoes them)


def text_histogram(counts: np.ndarray, edges: np.ndarray, width: int = 40) -> list[str]:
    """One line per bin: ``[lo, hi)  count  ####``; bar length proportional to the count."""
    top = max(int(counts.max()) if len(counts) else 0, 1)
    lines = []
    for c, lo, hi in zip(counts.tolist(), edges[:-1], edges[1:]):
        bar = "#" * int(round(width * c / top))
        lines.append(f"  [{lo:+.3f}, {hi:+.3f})  {c:>8}  {bar}")
    return lines


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"


def format_stats(stats: Stats) -> str:
    out = []
    for i, s in enumerate(stats.tables):
        out.append(f"== [{i}] {s.path}")
        of = f" (of {s.mined_queries} mined)" if s.mined_queries is not None and s.mined_queries != s.queries else ""
        out.append(f"rows: {s.rows}  queries: {s.queries}{of}  k: {s.k if s.k is not None else '?'}  "
                   f"rounds: {', '.join(map(str, s.rounds)) or '-'}")
        pqs = s.per_query
        none = s.mined_queries - s.queries if s.mined_queries is not None else 0
        out.append(f"negatives per query: min {pqs['min']:.0f}  mean {pqs['mean']:.2f}  "
                   f"median {pqs['median']:.1f}  max {pqs['max']:.0f}"
                   + (f"  (over queries with any; {none} mined queries got none)" if none > 0 else ""))
        out.append("strategies: " + ", ".join(f"{k} {v}" for k, v in s.strategies.items()))
        out.append("delta quantiles: " + "  ".join(f"q{int(q * 100):02d} {v:+.4f}" for q, v in s.delta_quantiles.items())
                   + f"  mean {s.delta_mean:+.4f}")
        out.append(f"delta histogram ({HIST_BINS} bins):")
        out.extend(text_histogram(*s.delta_hist))
        out.append(f"category mix: same category {_pct(s.category_match)}, other {_pct(1 - s.category_match)}")
        if s.neg_categories:
            out.append("negative categories: " + ", ".join(f"{k or '-'} {v}" for k, v in s.neg_categories.items()))
        out.append(f"attribute overlap: mean {s.attr_overlap_mean:.3f}; "
                   + ", ".join(f"{k} {_pct(v)}" for k, v in s.attr_overlap_mix.items()))
        ids = s.shortfall["query_ids"]
        more = f" ... (+{len(ids) - 10})" if len(ids) > 10 else ""
        out.append(f"shortfall: {s.shortfall['count']} queries with fewer than k negatives"
                   + (f": {', '.join(ids[:10])}{more}" if ids else ""))
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


def _cell(v) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple, np.ndarray)):
        return json.dumps(list(v) if not isinstance(v, np.ndarray) else v.tolist(), default=str)
    return str(v)


def format_rows(res: QueryResult, fmt: str = "table") -> str:
    """Render a query result as an aligned text table, CSV, or JSON lines-free array of objects."""
    if fmt == "json":
        return json.dumps([dict(zip(res.columns, r)) for r in res.rows], default=str, indent=1) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(res.columns)
        w.writerows([[_cell(v) if v is not None else "" for v in r] for r in res.rows])
        return buf.getvalue()
    if fmt != "table":
        raise UsageError(f"--format must be table, csv or json, not '{fmt}'.")
    cells = [[_cell(v) for v in r] for r in res.rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(res.columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()
    out = [line(res.columns), line(["-" * w for w in widths])] + [line(r) for r in cells]
    out.append(f"({len(cells)} row{'s' if len(cells) != 1 else ''})")
    return "\n".join(out) + "\n"
