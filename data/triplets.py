"""The triplets table: one row per query (reference, captions, target, their embeddings), validated
on read (:data:`cir_mine.data.schema.TRIPLETS`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from cir_mine.data.embeddings import check_embeddings, embedding_array, embedding_numpy
from cir_mine.data.errors import DataError, SchemaError
from cir_mine.data.gallery import Gallery
from cir_mine.data.parquet import read_parquet
from cir_mine.data.schema import (
    TRIPLETS,
    check_no_empty_ids,
    check_no_nulls,
    object_array,
    triplets_schema,
)


@dataclass
class Triplets:
    """A validated triplets table. ``text_embeddings``: float32[m, d], L2-normalized."""

    # fmt: off
    path: Path
    query_ids: np.ndarray
    categories: np.ndarray
    ref_ids: np.ndarray
    target_ids: np.ndarray
    captions: list
    text_embeddings: np.ndarray
    extra_positive_ids: list         # list[m] of list[str] (empty lists when the column is absent)
    verified_negative_ids: list
    img_set: list
    source: Optional[np.ndarray] = None
    # fmt: on

    def __len__(self) -> int:
        return int(self.query_ids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.text_embeddings.shape[1])

    def subset(self, idx: np.ndarray) -> "Triplets":
        idx = np.asarray(idx, dtype=np.int64)
        pick = lambda lst: [lst[i] for i in idx.tolist()]
        return Triplets(
            self.path,
            self.query_ids[idx],
            self.categories[idx],
            self.ref_ids[idx],
            self.target_ids[idx],
            pick(self.captions),
            self.text_embeddings[idx],
            pick(self.extra_positive_ids),
            pick(self.verified_negative_ids),
            pick(self.img_set),
            None if self.source is None else self.source[idx],
        )


def read_triplets(path: str | Path, dim: Optional[int] = None, check_norm: bool = True) -> Triplets:
    path = Path(path)
    return triplets_from_table(read_parquet(path), path, dim, check_norm)


def triplets_from_table(table: pa.Table, path: Path, dim: Optional[int] = None, check_norm: bool = True) -> Triplets:
    """Validate a triplets-schema Arrow table (``path`` names it in errors) -> :class:`Triplets`."""
    TRIPLETS.check(table.schema, path)
    qids = object_array(table.column("query_id"))
    if table.column("query_id").null_count:
        raise SchemaError(f"{path}: column 'query_id' has null values.")
    check_no_nulls(table, path, qids, "query", ("category", "ref_id", "target_id", "source"))
    check_no_empty_ids(table, path, ["query_id", "ref_id", "target_id"], "query")
    same = np.flatnonzero(object_array(table.column("ref_id")) == object_array(table.column("target_id")))
    if same.size:
        i = int(same[0])
        raise SchemaError(
            f"{path}: {same.size} query(ies) name their reference as their target (first: query "
            f"'{qids[i]}', image '{table.column('ref_id')[i]}'); a query asks for another image. Drop "
            f"those rows."
        )
    if len(set(qids.tolist())) != len(qids):
        raise SchemaError(f"{path}: column 'query_id' has duplicated ids; query ids must be unique.")
    try:
        emb = embedding_numpy(table.column("text_embedding"))
    except ValueError:
        raise SchemaError(f"{path}: column 'text_embedding' has null rows.") from None
    if dim is not None and emb.shape[1] != dim:
        raise SchemaError(
            f"{path}: column 'text_embedding' has dimension {emb.shape[1]} but the gallery has "
            f"dimension {dim}. Both must come from the same encoder; re-embed one of them."
        )
    if check_norm:
        check_embeddings(emb, path, "text_embedding", qids)
    n = len(qids)

    def lists(name):
        if name not in table.schema.names:
            return [[] for _ in range(n)]
        return [list(v or []) for v in table.column(name).to_pylist()]

    captions = lists("captions")
    for i, caps in enumerate(captions):
        # Real FashionIQ holds some empty captions beside a non-empty one; a query needs one.
        if not any(c is not None and str(c).strip() for c in caps):
            raise SchemaError(
                f"{path}: column 'captions' of query '{qids[i]}' has no non-empty caption. "
                f"Drop the query or give it a caption."
            )
    return Triplets(
        path,
        qids,
        object_array(table.column("category")),
        object_array(table.column("ref_id")),
        object_array(table.column("target_id")),
        captions,
        emb,
        lists("extra_positive_ids"),
        lists("verified_negative_ids"),
        lists("img_set"),
        object_array(table.column("source")) if "source" in table.schema.names else None,
    )


def triplets_table(
    query_ids, categories, ref_ids, target_ids, captions, text_embeddings: np.ndarray, **optional
) -> pa.Table:
    dim = int(text_embeddings.shape[1])
    names = [
        k for k in ("extra_positive_ids", "verified_negative_ids", "img_set", "source") if optional.get(k) is not None
    ]
    schema = triplets_schema(dim, names)
    cols = [
        pa.array(list(query_ids), pa.string()),
        pa.array(list(categories), pa.string()),
        pa.array(list(ref_ids), pa.string()),
        pa.array(list(target_ids), pa.string()),
        pa.array([list(c) for c in captions], pa.list_(pa.string())),
        embedding_array(text_embeddings),
    ]
    for k in names:
        v = optional[k]
        cols.append(
            pa.array(list(v), pa.string()) if k == "source" else pa.array([list(x) for x in v], pa.list_(pa.string()))
        )
    return pa.Table.from_arrays(cols, schema=schema)


def check_triplets_against_gallery(t: Triplets, g: Gallery) -> None:
    """Every reference and target must be a gallery image."""
    for col, ids in (("ref_id", t.ref_ids), ("target_id", t.target_ids)):
        absent = np.flatnonzero(g.lookup(ids) < 0)
        if absent.size:
            raise DataError(
                f"{t.path}: column '{col}' names {absent.size} image(s) missing from {g.path} "
                f"(first: {ids[absent[0]]}, query {t.query_ids[absent[0]]}). "
                f"Re-embed the gallery or drop those triplets."
            )
