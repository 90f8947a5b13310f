"""The negatives table: one row per (query, negative). Schema, atomic writer, validating reader.

File metadata (Parquet footer, key ``cir_mine``, JSON) holds the schema version, the full mining
config, the split and its data hash (:meth:`Workspace.split_hash`), the workspace manifest hash,
the round, the negative bank the table assumes and the shortfall (queries that got fewer than k
negatives). See docs/formats.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pyarrow as pa

from cir_mine.data.errors import DataError, SchemaError
from cir_mine.data.io import read_parquet
from cir_mine.data.workspace import Workspace, now_iso, read_metadata, write_table

NEGATIVES_SCHEMA_VERSION = 2
# Version 1 tables (written before ``neg_category``) still read: their ``neg_category`` is null.
READABLE_VERSIONS = (1, 2)
META_KEY = "cir_mine"

NEGATIVES_SCHEMA = pa.schema(
    [
        pa.field("query_id", pa.string()),  # triplets.query_id
        pa.field("ref_id", pa.string()),  # reference image id
        pa.field("target_id", pa.string()),  # target image id
        pa.field("neg_id", pa.string()),  # mined negative image id
        pa.field(
            "neg_category", pa.string()
        ),  # the negative's gallery category (its gallery key: neg_category, neg_id)
        pa.field("strategy", pa.string()),  # strategy that picked it (random, midzone, ...)
        pa.field(
            "rank", pa.int32()
        ),  # 0-based rank of the negative by s(q, c) in the search; -1 if not from the ranking
        pa.field("score", pa.float32()),  # s(q, neg), cosine
        pa.field("target_score", pa.float32()),  # s(q, target), cosine
        pa.field("delta", pa.float32()),  # target_score - score
        pa.field("round", pa.int32()),  # mining round (0 = offline, r = r-th refresh)
        pa.field("category_match", pa.bool_()),  # negative's category == target's category
        pa.field("attr_overlap", pa.float32()),  # Jaccard overlap of negative and target attributes
        pa.field("seed", pa.int64()),  # sampling seed
    ]
)


@dataclass
class NegativesTable:
    # fmt: off
    path: Optional[Path]
    table: pa.Table
    meta: dict               # the ``cir_mine`` footer entry
    ws: Optional[Workspace] = field(default=None, repr=False)  # the workspace it was checked against
    # fmt: on

    @property
    def config(self) -> dict:
        return self.meta.get("config", {})

    @property
    def split(self) -> str:
        """The split the table was mined from (``train`` when the footer does not say)."""
        return self.meta.get("split") or "train"

    def grouped(self, ws: Optional[Workspace] = None, split: Optional[str] = None, loaded: Optional[tuple] = None):
        """The table per query (:class:`~cir_mine.miner.core.grouped.GroupedNegatives`, numpy).

        k is the table's ``k_mined``. With ``ws`` (default: the one given to :func:`read_negatives`;
        checked like it does): one row per query of the table's split (or ``split``) in the
        triplets' row order, and the gallery rows of the negatives, references and targets.
        ``loaded``: ``ws.load(split)`` already in memory."""
        from cir_mine.miner.core.grouped import group_negatives_table

        k = self.meta.get("k_mined", self.meta.get("k"))
        ws = ws if ws is not None else self.ws
        if ws is None:
            return group_negatives_table(self.table, k, triplets=_queries_of(self.table, self.meta))
        _check_workspace(self.path, self.meta, ws)
        g, t = loaded if loaded is not None else ws.load(split or self.split)
        return group_negatives_table(self.table, k, gallery=g, triplets=t)


def _queries_of(table: pa.Table, meta: dict):
    """The queries a table covers without its workspace: those with rows (first appearance order),
    then those the guards left without negatives (listed in the footer's
    ``shortfall.without_negatives``). None when the footer lists none (every query has rows)."""
    import numpy as np
    import pyarrow.compute as pc
    from types import SimpleNamespace

    empty = (meta.get("shortfall") or {}).get("without_negatives") or {}
    if not empty.get("query_ids"):
        return None
    ids = table.select(["query_id", "ref_id", "target_id"])
    first = pc.index_in(pc.unique(ids.column("query_id")), value_set=ids.column("query_id").combine_chunks())
    ids = ids.take(first)
    col = lambda name, extra: np.asarray(ids.column(name).to_pylist() + list(extra), dtype=object)
    return SimpleNamespace(
        query_ids=col("query_id", empty["query_ids"]),
        ref_ids=col("ref_id", empty["ref_ids"]),
        target_ids=col("target_id", empty["target_ids"]),
    )


def as_negatives_table(negatives, ws: Optional[Workspace] = None, what: str = "negatives") -> NegativesTable:
    """A :class:`NegativesTable` from any form a negatives table comes in: a path (read and checked
    against ``ws``), a NegativesTable, a MineResult (``mine_negatives``'s, ``Remine``'s) or a pyarrow
    Table in the negatives schema (its ``cir_mine`` schema metadata, when present, is its footer).
    A GroupedNegatives is refused: it has lost the table's queries without negatives and its footer."""
    import json

    from cir_mine.data.errors import UsageError
    from cir_mine.miner.core.grouped import GroupedNegatives

    if isinstance(negatives, (str, Path)):
        return read_negatives(negatives, ws)
    if isinstance(negatives, NegativesTable):
        return negatives
    if isinstance(negatives, GroupedNegatives):
        raise UsageError(
            f"{what} takes the negatives table (a path, read_negatives(...), a MineResult or a "
            f"pyarrow Table), not its grouped form: it regroups it over the split's queries."
        )
    if isinstance(negatives, pa.Table):
        raw = (negatives.schema.metadata or {}).get(META_KEY.encode())
        meta = json.loads(raw) if raw else {}
        return NegativesTable(
            None, negatives, meta if isinstance(meta, dict) and meta.get("table") == "negatives" else {}
        )
    if hasattr(negatives, "table") and hasattr(negatives, "meta"):
        return NegativesTable(getattr(negatives, "path", None), negatives.table, negatives.meta)
    raise UsageError(
        f"{what}: expected a negatives table (a path, read_negatives(...), a MineResult or a "
        f"pyarrow Table), got {type(negatives).__name__}."
    )


def write_negatives(table: pa.Table, path: str | Path, meta: dict) -> None:
    """Validate ``table`` against the schema and write it atomically with ``meta`` in the footer."""
    table = conform(table, Path(path))
    meta = {"schema_version": NEGATIVES_SCHEMA_VERSION, "table": "negatives", "created": now_iso(), **meta}
    write_table(table, path, metadata={META_KEY: meta})


def conform(table: pa.Table, path: Path, version: int = NEGATIVES_SCHEMA_VERSION) -> pa.Table:
    """Check columns and types (safe casts allowed, e.g. int64 rank -> int32); order as the schema.

    A version 1 table has no ``neg_category``: it gets a null one."""
    if version == 1 and "neg_category" not in table.schema.names:
        table = table.append_column("neg_category", pa.nulls(table.num_rows, pa.string()))
    for f in NEGATIVES_SCHEMA:
        if f.name not in table.schema.names:
            raise SchemaError(
                f"{path}: missing column '{f.name}' ({f.type}); a negatives table needs the columns "
                f"{', '.join(NEGATIVES_SCHEMA.names)}. See docs/formats.md."
            )
        t = table.schema.field(f.name).type
        compatible = (
            t == f.type
            or (pa.types.is_integer(t) and pa.types.is_integer(f.type))
            or (pa.types.is_floating(t) and pa.types.is_floating(f.type))
            or (pa.types.is_large_string(t) and pa.types.is_string(f.type))
        )
        if not compatible:
            raise SchemaError(f"{path}: column '{f.name}' has type {t}, expected {f.type}. See docs/formats.md.")
    return table.select(NEGATIVES_SCHEMA.names).cast(NEGATIVES_SCHEMA)


def read_negatives(path: str | Path, ws: Optional[Workspace] = None) -> NegativesTable:
    """Read and validate a negatives table; with ``ws``, refuse a table mined from another workspace."""
    path = Path(path)
    _exists(path)
    raw = read_parquet(path)  # one read: rows and footer of the same version of the file
    meta = _parse_footer(path, raw.schema.metadata or {})
    table = conform(raw, path, meta["schema_version"])
    _check_workspace(path, meta, ws)
    return NegativesTable(path, table, meta, ws)


def read_negatives_meta(path: str | Path, ws: Optional[Workspace] = None) -> dict:
    """The footer (``cir_mine`` metadata: config, counts, ...) of a negatives table, checked like
    :func:`read_negatives` does, without reading its rows."""
    path = Path(path)
    meta = _footer(path)
    _check_workspace(path, meta, ws)
    return meta


def _exists(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: negatives table not found. Mine one with `cir-mine negatives`.")


def _footer(path: Path) -> dict:
    _exists(path)
    return _parse_footer(path, None)


def _parse_footer(path: Path, raw: Optional[dict]) -> dict:
    """The ``cir_mine`` footer entry (from the file, or from ``raw``: the schema metadata of a table read)."""
    if raw is None:
        meta = read_metadata(path).get(META_KEY)
    else:
        try:
            meta = json.loads(raw.get(META_KEY.encode(), b"null").decode())
        except ValueError:
            meta = None
    if not isinstance(meta, dict) or meta.get("table") != "negatives":
        raise SchemaError(
            f"{path}: not a cir-mine negatives table (no '{META_KEY}' metadata). Mine one with `cir-mine negatives`."
        )
    if meta.get("schema_version") not in READABLE_VERSIONS:
        raise SchemaError(
            f"{path}: negatives schema version {meta.get('schema_version')} is not "
            f"{NEGATIVES_SCHEMA_VERSION}; re-mine it with this version of cir-mine."
        )
    return meta


def _check_workspace(path: Path, meta: dict, ws: Optional[Workspace]) -> None:
    """A table belongs to the split it was mined on: its ``data_hash`` must be that split's
    :meth:`Workspace.split_hash` (tables without one are compared by the whole manifest hash)."""
    if ws is None:
        return
    split = meta.get("split")
    if "data_hash" in meta and split:
        if split not in ws.splits():
            have = ", ".join(ws.splits()) or "none"
            raise DataError(
                f"{path}: mined on split '{split}', which {ws.root} does not have (splits: {have}). "
                f"Pass the workspace it was mined from with work.",
                params=("work",),
            )
        mine, theirs = ws.split_hash(split), meta["data_hash"]
        if theirs != mine:
            raise DataError(
                f"{path}: mined from another workspace (split '{split}' data hash {theirs}, {ws.root} has {mine}). "
                f"Re-mine it with `cir-mine negatives work={ws.root} split={split}`.",
                params=("work", "split"),
            )
        return
    mine, theirs = ws.manifest_hash(), meta.get("manifest_hash")
    if theirs != mine:
        raise DataError(
            f"{path}: mined from another workspace (manifest hash {theirs}, {ws.root} has {mine}). "
            f"Re-mine it with `cir-mine negatives work={ws.root}`.",
            params=("work",),
        )
