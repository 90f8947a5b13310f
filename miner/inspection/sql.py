"""Negatives tables in DuckDB: the views, and ad-hoc SQL over them.

``connect`` opens an in-memory DuckDB with the views
- ``negs``: every given negatives table (``read_parquet([...])``) plus a ``filename`` column;
- ``gallery``, ``triplets``: the workspace tables of one split without their embedding columns;
- ``gallery_emb`` (image_id, category, embedding), ``triplet_emb`` (query_id, text_embedding):
  the embeddings as DuckDB ``FLOAT[d]`` arrays, for similarity queries (``array_cosine_similarity``).

Every view reads the Parquet files directly (nothing is copied). ``format_rows`` renders a query's
result for the CLI.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import duckdb
import numpy as np
import pyarrow.parquet as pq

from cir_mine.data.errors import DataError, UsageError
from cir_mine.data.workspace import Workspace
from cir_mine.miner.core.tables import NegativesTable, read_negatives

log = logging.getLogger(__name__)


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
        raise UsageError(
            f"the tables were mined on different splits ({', '.join(splits)}); pass one with `split`.",
            params=("split",),
        )
    return splits[0] if splits else "train"


def _dataset(path):
    """A lazily scanned Arrow dataset of one Parquet file, or of a list of row-aligned parts in order
    (read by pyarrow, not by DuckDB's file system)."""
    import pyarrow.dataset as pds

    files = [str(p) for p in path] if isinstance(path, (list, tuple)) else str(path)
    return pds.dataset(files, format="parquet")


def connect(
    neg_paths: Sequence[str | Path], ws: Optional[Workspace] = None, split: str = "train", table_views: bool = False
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the views described in the module docstring.

    Read-only over its inputs: the views scan Arrow datasets of the files, and DuckDB's own file
    access is then switched off (``enable_external_access = false``), so no statement (``COPY``,
    ``ATTACH``, ``EXPORT``, ``INSTALL``, ``read_csv``...) can read or write any file.
    ``table_views`` adds one view ``t{i}`` per negatives table.
    """
    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})

    if neg_paths:
        parts = []
        for i, p in enumerate(neg_paths):
            con.register(f"_src_t{i}", _dataset(Path(p)))
            parts.append(f"SELECT *, {_lit(Path(p).resolve())} AS filename FROM _src_t{i}")
            if table_views:
                con.execute(f"CREATE VIEW t{i} AS SELECT * FROM _src_t{i}")
        con.execute(f"CREATE VIEW negs AS {' UNION ALL '.join(parts)}")
    if ws is not None:
        gp, tp = ws.gallery_path(split), ws.triplets_path(split)
        if not gp.exists():
            have = ", ".join(ws.splits()) or "none"
            raise DataError(
                f"{gp}: file not found; splits in {ws.root}: {have}. Pass one with `split`.", params=("split",)
            )
        gfiles = ws.gallery_files(split)  # one file, or a parts folder in row order
        gschema = pq.read_schema(gfiles[0])
        gcols = [c for c in gschema.names if c != "embedding"]
        d = gschema.field("embedding").type.list_size
        con.register("_src_gallery", _dataset(gfiles))
        con.execute(f"CREATE VIEW gallery AS SELECT {', '.join(gcols)} FROM _src_gallery")
        con.execute(
            f"CREATE VIEW gallery_emb AS SELECT image_id, category, embedding::FLOAT[{d}] AS embedding "
            f"FROM _src_gallery"
        )
        if tp.exists():
            tcols = [c for c in pq.read_schema(tp).names if c != "text_embedding"]
            con.register("_src_triplets", _dataset(tp))
            con.execute(f"CREATE VIEW triplets AS SELECT {', '.join(tcols)} FROM _src_triplets")
            con.execute(
                f"CREATE VIEW triplet_emb AS SELECT query_id, text_embedding::FLOAT[{d}] AS text_embedding "
                f"FROM _src_triplets"
            )
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
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
        have = [
            r[0]
            for r in con.execute(
                "SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY view_name"
            ).fetchall()
            if not re.fullmatch(r"t\d+|_src_\w+", r[0])
        ]
        hint = "" if "gallery" in have else "; gallery and triplets need `work`"
        raise DataError(
            f"SQL: {first}. Views: {', '.join(have) or 'none'}{hint}. See docs/queries.md for examples.",
            params=("work",) if hint else (),
        ) from None
    return QueryResult(cols, rows)


def sql_query(
    sql: str, neg_paths: Sequence[str | Path], work: Optional[str | Path] = None, split: Optional[str] = None
) -> QueryResult:
    """``cir-mine sql``: validate the tables, open the views, run ``sql`` (read-only)."""
    if not sql.strip():
        raise UsageError("SQL: the query is empty. Pass a statement, e.g. 'SELECT count(*) FROM negs'.")
    ws = Workspace(work).require() if work is not None else None
    tables = load_tables(neg_paths, ws) if neg_paths else []
    con = connect(neg_paths, ws, table_split(tables, split) if tables else (split or "train"))
    return run_sql(con, sql)


def open_tables(neg_paths: Sequence[str | Path], work: Optional[str | Path] = None, split: Optional[str] = None):
    """Validate the tables and open the views; also one view ``t{i}`` per table.

    Returns (con, tables, ws, split).
    """
    ws = Workspace(work).require() if work is not None else None
    tables = load_tables(neg_paths, ws)
    split = table_split(tables, split)
    con = connect([t.path for t in tables], ws, split, table_views=True)
    return con, tables, ws, split


def still_current(tables: Sequence[NegativesTable], ws: Optional[Workspace], split: str) -> None:
    """After reading: the split is still the version the tables were checked against when opened
    (their ``data_hash``), so the numbers come from one version of the data (DataError otherwise)."""
    hashes = {t.meta.get("data_hash") for t in tables if t.meta.get("split") == split} - {None}
    if ws is not None and len(hashes) == 1:
        ws.check_unchanged(split, hashes.pop())


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
        raise UsageError(f"format must be table, csv or json, not '{fmt}'.", params=("format",))
    cells = [[_cell(v) for v in r] for r in res.rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(res.columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()
    out = [line(res.columns), line(["-" * w for w in widths])] + [line(r) for r in cells]
    out.append(f"({len(cells)} row{'s' if len(cells) != 1 else ''})")
    return "\n".join(out) + "\n"
