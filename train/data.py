"""Training arrays from a workspace and a negatives table (cached embeddings only).

Inside the trainer an image is a gallery **row** (for its embedding) and a **key** (an int per
distinct image id, so one product listed under two categories is one key: false-negative masks
compare keys). String ids stay at the boundary: tables in, tables out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import pyarrow as pa

from cir_mine.data.errors import DataError, UsageError

if TYPE_CHECKING:
    from cir_mine.data.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass
class QuerySet:
    """Queries resolved against a gallery. m queries, n gallery rows, d dims."""

    # fmt: off
    query_ids: np.ndarray        # object[m] of str
    ref_rows: np.ndarray         # int64[m] gallery rows of the references
    target_rows: np.ndarray      # int64[m] gallery rows of the targets
    text_emb: np.ndarray         # float32[m, d]
    target_keys: np.ndarray      # int64[m]
    pos_keys: np.ndarray         # int64[m, P]: target key then extra-positive keys, -1 padded
    categories: np.ndarray       # object[m] of str
    weights: Optional[np.ndarray] = None  # float32[m] loss weight per query (None: all 1)
    # fmt: on

    def __len__(self) -> int:
        return int(self.query_ids.shape[0])


def image_keys(gallery) -> tuple[np.ndarray, dict]:
    """(int64[n] key per gallery row, image_id -> key)."""
    key_of: dict = {}
    keys = np.fromiter(
        (key_of.setdefault(i, len(key_of)) for i in gallery.image_ids.tolist()), dtype=np.int64, count=len(gallery)
    )
    return keys, key_of


def resolve_queries(triplets, gallery, gallery_keys: np.ndarray, key_of: dict) -> QuerySet:
    """Resolve a Triplets table against its Gallery (ids within the query's category first)."""
    cats = triplets.categories.tolist()
    ref_rows = gallery.rows(triplets.ref_ids.tolist(), cats, what="reference")
    target_rows = gallery.rows(triplets.target_ids.tolist(), cats, what="target")
    target_keys = gallery_keys[target_rows]
    extra = [[key_of[x] for x in xs if x in key_of] for xs in triplets.extra_positive_ids]
    p = 1 + max((len(e) for e in extra), default=0)
    pos = np.full((len(triplets), p), -1, dtype=np.int64)
    pos[:, 0] = target_keys
    for i, e in enumerate(extra):
        pos[i, 1 : 1 + len(e)] = e
    return QuerySet(
        triplets.query_ids, ref_rows, target_rows, triplets.text_embeddings, target_keys, pos, triplets.categories
    )


def subset_queries(q: QuerySet, idx: np.ndarray) -> QuerySet:
    """Rows ``idx`` (int64[k]) of a QuerySet."""
    return QuerySet(
        q.query_ids[idx],
        q.ref_rows[idx],
        q.target_rows[idx],
        q.text_emb[idx],
        q.target_keys[idx],
        q.pos_keys[idx],
        q.categories[idx],
        None if q.weights is None else q.weights[idx],
    )


def concat_queries(a: QuerySet, b: QuerySet) -> QuerySet:
    """a's queries then b's; pos_keys padded with -1 to the wider of the two; weights default 1."""
    p = max(a.pos_keys.shape[1], b.pos_keys.shape[1])

    def pad(x):
        return np.pad(x, ((0, 0), (0, p - x.shape[1])), constant_values=-1)

    def w(x):
        return np.ones(len(x), dtype=np.float32) if x.weights is None else x.weights

    weights = None if a.weights is None and b.weights is None else np.concatenate([w(a), w(b)])
    return QuerySet(
        np.concatenate([a.query_ids, b.query_ids]),
        np.concatenate([a.ref_rows, b.ref_rows]),
        np.concatenate([a.target_rows, b.target_rows]),
        np.concatenate([a.text_emb, b.text_emb]),
        np.concatenate([a.target_keys, b.target_keys]),
        np.concatenate([pad(a.pos_keys), pad(b.pos_keys)]),
        np.concatenate([a.categories, b.categories]),
        weights,
    )


def extra_queries(
    paths: list, gallery, gallery_keys: np.ndarray, key_of: dict, taken_ids, weight: float = 1.0
) -> QuerySet:
    """Generated triplets (``cir-mine positives`` output, triplets schema) as extra training queries.

    Every table is validated like a workspace's triplets with the gallery's dimension; every
    reference and target must be in ``gallery``; query ids must not collide with ``taken_ids``
    (the workspace's queries, dev included) nor with each other. Each query gets loss weight
    ``weight``. Raises SchemaError / DataError naming the file.
    """
    from cir_mine.data.errors import DataError
    from cir_mine.data.workspace import read_triplets

    taken = set(taken_ids)
    parts = []
    for path in paths:
        t = read_triplets(path, dim=gallery.dim)
        for q in t.query_ids.tolist():
            if q in taken:
                raise DataError(
                    f"{path}: query id '{q}' is already a training query (of the workspace or an "
                    f"earlier extra_triplets file). Query ids must be unique; regenerate or rename them.",
                    params=("extra_triplets",),
                )
            taken.add(q)
        for what, ids in (("reference", t.ref_ids), ("target", t.target_ids)):
            absent = np.flatnonzero(gallery.lookup(ids, t.categories) < 0)
            if absent.size:
                j = int(absent[0])
                raise DataError(
                    f"{path}: {what} id '{ids[j]}' of query '{t.query_ids[j]}' is not in the gallery "
                    f"{gallery.path}. Generate the triplets from this workspace "
                    f"(cir-mine positives work WORK).",
                    params=("work",),
                )
        qs = resolve_queries(t, gallery, gallery_keys, key_of)
        qs.weights = np.full(len(qs), weight, dtype=np.float32)
        parts.append(qs)
        log.info("extra triplets %s: %d queries, loss weight %g", path, len(qs), weight)
    out = parts[0]
    for qs in parts[1:]:
        out = concat_queries(out, qs)
    return out


def dev_split(m: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded hold-out: (train_idx int64[m - k], dev_idx int64[k]) with k = round(fraction * m)."""
    if not 0.0 <= fraction < 1.0:
        raise UsageError(f"dev_fraction {fraction}: must be in [0, 1).", params=("dev_fraction",))
    perm = np.random.default_rng([seed, 7919]).permutation(m)
    k = int(round(fraction * m))
    return np.sort(perm[k:]), np.sort(perm[:k])


@dataclass
class NegativeBank:
    """Mined negatives regrouped per query: m queries x K slots (-1 = empty slot)."""

    # fmt: off
    rows: np.ndarray             # int64[m, K] gallery rows of negatives
    strategy: np.ndarray         # int16[m, K] index into ``strategies`` (-1 empty)
    strategies: list             # strategy names
    pairs: set                   # {(query_id, neg_id)}: for overlap between rounds
    # fmt: on

    @property
    def k(self) -> int:
        return int(self.rows.shape[1])

    def coverage(self) -> float:
        return float((self.rows >= 0).any(1).mean()) if self.rows.size else 0.0


def group_negatives(table: pa.Table, queries: QuerySet, gallery) -> NegativeBank:
    """Long negatives table (one row per query x negative) -> per-query slots for ``queries``.

    Rows of queries not in ``queries`` (held-out dev queries) are dropped; negative ids are
    resolved within their ``neg_category`` (the query's category for tables without one), then by
    id alone; unknown ids are dropped (logged).
    """
    qpos = {q: i for i, q in enumerate(queries.query_ids.tolist())}
    qids = table.column("query_id").to_pylist()
    nids = table.column("neg_id").to_pylist()
    strat = table.column("strategy").to_pylist()
    ncats = table.column("neg_category").to_pylist() if "neg_category" in table.schema.names else [None] * len(nids)
    names = sorted(set(strat))
    code = {s: i for i, s in enumerate(names)}
    per_query: list[list] = [[] for _ in range(len(queries))]
    cats = queries.categories.tolist()
    at = [qpos.get(q) for q in qids]
    mine = [j for j, i in enumerate(at) if i is not None]
    found = gallery.lookup(
        [nids[j] for j in mine], [cats[at[j]] if ncats[j] is None else ncats[j] for j in mine]
    ).tolist()
    unknown = 0
    pairs = set()
    for j, r in zip(mine, found):
        if r < 0:
            unknown += 1
            continue
        per_query[at[j]].append((r, code[strat[j]]))
        pairs.add((qids[j], nids[j]))
    if unknown:
        log.warning("%d negative ids are not in the gallery; dropped", unknown)
    k = max((len(x) for x in per_query), default=0)
    rows = np.full((len(queries), k), -1, dtype=np.int64)
    codes = np.full((len(queries), k), -1, dtype=np.int16)
    for i, lst in enumerate(per_query):
        if lst:
            arr = np.asarray(lst, dtype=np.int64)
            rows[i, : len(lst)], codes[i, : len(lst)] = arr[:, 0], arr[:, 1]
    return NegativeBank(rows, codes, names, pairs)


def sample_negatives(
    bank: NegativeBank, k: int, rng: np.random.Generator, mix: Optional[dict] = None, share: float = 1.0
) -> np.ndarray:
    """Pick up to ``k`` negatives per query for one epoch -> int64[m, k] gallery rows (-1 = none).

    mix: strategy -> weight (None = every strategy, weight 1); slots of strategies with weight 0
    are never picked; the pick is weighted sampling without replacement (Gumbel top-k).
    share: fraction of queries that get mined negatives this epoch (the others get none).
    """
    m = bank.rows.shape[0]
    if bank.k == 0 or k <= 0:
        return np.full((m, max(k, 0)), -1, dtype=np.int64)
    w = np.ones(len(bank.strategies), dtype=np.float64)
    if mix is not None:
        w = np.asarray([float(mix.get(s, 0.0)) for s in bank.strategies], dtype=np.float64)
    with np.errstate(divide="ignore"):
        logw = np.log(np.append(w, 0.0))  # code -1 -> weight 0
    score = logw[bank.strategy] + rng.gumbel(size=bank.rows.shape)
    score[bank.rows < 0] = -np.inf
    kk = min(k, bank.k)
    top = np.argsort(-score, axis=1, kind="stable")[:, :kk]
    picked = np.take_along_axis(bank.rows, top, axis=1)
    picked[~np.isfinite(np.take_along_axis(score, top, axis=1))] = -1
    if share < 1.0:
        picked[rng.random(m) >= share] = -1
    if kk < k:
        picked = np.concatenate([picked, np.full((m, k - kk), -1, dtype=np.int64)], axis=1)
    return picked


def check_extra_origin(paths: list, ws: "Workspace") -> None:
    """Generated triplets (cir-mine positives) must come from this workspace (their footer's hash)."""
    from cir_mine.data.workspace import check_readable_file, read_metadata

    here = ws.manifest_hash()
    for p in paths:
        check_readable_file(Path(p))
        try:
            meta = read_metadata(p).get("cir_mine_positives")
        except Exception:  # not Parquet: read_triplets names the problem
            continue
        made_from = meta.get("manifest_hash") if isinstance(meta, dict) else None
        if made_from and made_from != here:
            raise DataError(
                f"{p}: generated from another workspace (manifest hash {made_from}, {ws.root} has "
                f"{here}). Generate them from this one: cir-mine positives work {ws.root}.",
                params=("work",),
            )
