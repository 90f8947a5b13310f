"""The long negatives table regrouped per query: numpy arrays [nq, k], torch on request.

``group_negatives_table(table, ...)`` turns one row per (query, negative) into one row per query
with k slots, in the table's pick order; slots past a query's last negative are empty (``mask``
False). No torch here: :meth:`GroupedNegatives.to_torch` imports it when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cir_mine.data.rows import gather

SEP = "\x1f"  # joins (category, image_id) into one key; never part of an id


@dataclass
class GroupedNegatives:
    """Negatives per query: nq queries x k slots (empty slots: mask False)."""

    # fmt: off
    query_ids: np.ndarray               # object[nq] of str
    ref_ids: np.ndarray                 # object[nq] of str
    target_ids: np.ndarray              # object[nq] of str
    neg_ids: np.ndarray                 # object[nq, k] of str (None in empty slots)
    strategy: np.ndarray                # object[nq, k] of str (None in empty slots)
    score: np.ndarray                   # float32[nq, k] s(q, neg) (NaN in empty slots)
    delta: np.ndarray                   # float32[nq, k] s(q, target) - s(q, neg) (NaN in empty slots)
    target_score: np.ndarray            # float32[nq] s(q, target) (NaN for a query without negatives)
    mask: np.ndarray                    # bool[nq, k] True where the slot holds a negative
    short: np.ndarray                   # bool[nq] the query got fewer than k negatives
    gallery_rows: Optional[np.ndarray] = None  # int64[nq, k] gallery rows of the negatives (-1 empty); None without a gallery
    neg_category: Optional[np.ndarray] = None  # object[nq, k] of str: the negatives' gallery categories; None when the table has none
    ref_rows: Optional[np.ndarray] = None      # int64[nq] gallery rows of the references; None without a gallery
    target_rows: Optional[np.ndarray] = None   # int64[nq] gallery rows of the targets; None without a gallery
    # fmt: on

    def __len__(self) -> int:
        return int(self.query_ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.mask.shape[1])

    @property
    def counts(self) -> np.ndarray:
        """int64[nq] negatives per query."""
        return self.mask.sum(1).astype(np.int64)

    def index_of(self, query_id: str) -> int:
        """Position of ``query_id`` in ``query_ids``; KeyError when absent."""
        if not hasattr(self, "_pos"):
            self._pos = {q: i for i, q in enumerate(self.query_ids.tolist())}
        return self._pos[query_id]

    def to_torch(self, device=None) -> dict:
        """The numeric arrays as torch tensors: delta, score, target_score (float32), mask, short
        (bool) and, with a gallery, gallery_rows, ref_rows, target_rows (int64). Ids stay numpy."""
        import torch

        names = ["delta", "score", "target_score", "mask", "short", "gallery_rows", "ref_rows", "target_rows"]
        return {n: torch.as_tensor(getattr(self, n), device=device) for n in names if getattr(self, n) is not None}


def _strings(col) -> np.ndarray:
    return np.asarray(col.to_pylist(), dtype=object)


def _index(values, value_set) -> np.ndarray:
    """Position of each value in ``value_set`` (its first occurrence) -> int64[len] (-1 absent)."""
    idx = pc.fill_null(pc.index_in(values, value_set=value_set), -1)
    return idx.to_numpy(zero_copy_only=False).astype(np.int64)


def _resolve(ids: pa.Array, cats: Optional[pa.Array], gallery) -> np.ndarray:
    """Gallery rows of ``ids`` (within ``cats`` first, then by id alone) -> int64[len] (-1 unknown)."""
    g_ids = gallery.id_array
    by_id = _index(ids, g_ids)
    if cats is None:
        return by_id
    g_keys = pc.binary_join_element_wise(pa.array(gallery.categories.tolist(), pa.string()), g_ids, SEP)
    by_key = _index(pc.binary_join_element_wise(cats, ids, SEP), g_keys)
    return np.where(by_key >= 0, by_key, by_id)


def group_negatives_table(table: pa.Table, k: Optional[int] = None, gallery=None, triplets=None) -> GroupedNegatives:
    """Long negatives table -> :class:`GroupedNegatives`.

    k: slots per query (default: the most negatives any query has; a larger k pads).
    triplets: the split's Triplets: one output row per query of the split in its row order
    (queries without negatives get an empty row; table rows of other queries are dropped);
    without it, the table's queries in order of first appearance.
    gallery: the split's Gallery: fills ``gallery_rows``/``ref_rows``/``target_rows``. A negative
    is resolved within its own category (a ``neg_category`` column) or else the query's (from
    ``triplets``) first, then by id alone.
    """
    qcol = table.column("query_id").combine_chunks() if table.num_rows else pa.array([], pa.string())
    if triplets is not None:
        query_ids = pa.array(triplets.query_ids.tolist(), pa.string())
    else:
        query_ids = pc.unique(qcol)
    nq = len(query_ids)
    code = _index(qcol, query_ids)
    keep = np.flatnonzero(code >= 0)
    code = code[keep]
    order = np.argsort(code, kind="stable")  # by query, pick order kept
    src, code = keep[order], code[order]
    counts = np.bincount(code, minlength=nq).astype(np.int64)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]]) if nq else np.zeros(0, np.int64)
    pos = np.arange(code.size) - start[code]
    width = int(counts.max(initial=0))
    kk = max(width, k or 0)

    def grid(name: str, fill, dtype) -> np.ndarray:
        out = np.full((nq, kk), fill, dtype=dtype)
        if code.size:
            col = gather(table.column(name), src)
            vals = _strings(col) if dtype is object else col.to_numpy(zero_copy_only=False)
            out[code, pos] = vals
        return out

    mask = np.zeros((nq, kk), bool)
    mask[code, pos] = True
    has = counts > 0
    first = np.full(nq, -1, np.int64)
    first[has] = src[start[has]]  # each query's first table row

    def per_query(name: str) -> np.ndarray:
        if triplets is not None and name in ("ref_id", "target_id"):
            return (triplets.ref_ids if name == "ref_id" else triplets.target_ids).astype(object)
        out = np.full(nq, None, dtype=object)
        if has.any():
            out[has] = _strings(gather(table.column(name), first[has]))
        return out

    ts = np.full(nq, np.nan, np.float32)
    if has.any():
        ts[has] = gather(table.column("target_score"), first[has]).to_numpy(zero_copy_only=False)
    neg_ids = grid("neg_id", None, object)
    out = GroupedNegatives(
        _strings(query_ids),
        per_query("ref_id"),
        per_query("target_id"),
        neg_ids,
        grid("strategy", None, object),
        grid("score", np.nan, np.float32),
        grid("delta", np.nan, np.float32),
        ts,
        mask,
        counts < kk,
        neg_category=grid("neg_category", None, object) if "neg_category" in table.schema.names else None,
    )
    if gallery is not None:
        _fill_rows(out, table, gallery, triplets, src, code, pos)
    return out


def _fill_rows(out: GroupedNegatives, table: pa.Table, gallery, triplets, src, code, pos) -> None:
    """``out``'s gallery rows of every negative (at its grid slot: query ``code``, slot ``pos`` of
    table row ``src``), reference and target, each resolved within its category first."""
    qcats = pa.array(triplets.categories.tolist(), pa.string()) if triplets is not None else None
    rows = np.full(out.mask.shape, -1, np.int64)
    if code.size:
        ids = gather(table.column("neg_id"), src).combine_chunks()
        cats = gather(qcats, code) if qcats is not None else None
        if "neg_category" in table.schema.names:
            own = gather(table.column("neg_category"), src).combine_chunks()
            cats = own if cats is None else pc.coalesce(own, cats)
        rows[code, pos] = _resolve(ids, cats, gallery)
    out.gallery_rows = rows
    for name in ("ref_id", "target_id"):
        ids = pa.array([x if x is not None else "" for x in getattr(out, name + "s").tolist()], pa.string())
        setattr(out, name.replace("_id", "_rows"), _resolve(ids, qcats, gallery))
