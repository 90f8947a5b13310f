"""Step 1 of a mining run (prepare): the gallery side (:class:`Pool`) and the query side
(:class:`QuerySet`) as arrays, built once per run; :func:`prepare` checks the config against the
data and returns what every later step needs (:class:`Prepared`)."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa

from cir_mine.data.errors import UsageError
from cir_mine.data.rows import sorted_codes
from cir_mine.data.validate import QUERY_FIX, check_matrix
from cir_mine.data.workspace import Gallery, Triplets, Workspace, release_pages
from cir_mine.miner.core import attributes as A
from cir_mine.miner.core.attribute_codes import AttrCodes
from cir_mine.miner.core.config import MineConfig
from cir_mine.miner.core.guards import PairSet
from cir_mine.miner.core.scores import zero_shot_queries
from cir_mine.miner.core.search.exact import gathered_dot
from cir_mine.miner.core.search.measure import Clock
from cir_mine.miner.core.strategies import REGISTRY, split_k

# ------------------------------------------------------------------------------------------------
# Prepared inputs (gallery side and query side), built once per run


@dataclass
class Pool:
    """Gallery arrays the miner works on (integer rows stay inside miner/)."""

    # fmt: off
    ids: pa.Array              # string[n] image ids
    xb: np.ndarray             # float32[n, d] unit rows
    product: np.ndarray        # int64[n] product code (one per image id)
    n_products: int
    cat: np.ndarray            # int32[n] category code
    cat_names: list
    cat_order: np.ndarray      # int64[n] rows sorted by category
    cat_start: np.ndarray      # int64[n_cat + 1] block starts in cat_order
    attrs: AttrCodes
    # fmt: on

    @classmethod
    def build(cls, g: Gallery, requests: list, ref_rows: Optional[np.ndarray] = None) -> "Pool":
        ids = g.id_array
        product, uniq = sorted_codes(ids)
        cat, cat_names = sorted_codes(g.category_array)
        cat = cat.astype(np.int32)
        order = np.argsort(cat, kind="stable")
        start = np.searchsorted(cat[order], np.arange(len(cat_names) + 1))
        return cls(
            ids,
            g.embeddings,
            product,
            len(uniq),
            cat,
            cat_names,
            order.astype(np.int64),
            start.astype(np.int64),
            AttrCodes.build(g.attributes, requests, ref_rows),
        )


@dataclass
class QuerySet:
    # fmt: off
    ids: pa.Array              # string[m] query ids
    ref_ids: pa.Array
    target_ids: pa.Array
    emb: np.ndarray            # float32[m, d] query embeddings
    ref_rows: np.ndarray       # int64[m]
    target_rows: np.ndarray    # int64[m]
    target_score: np.ndarray   # float32[m] s(q, t)
    qhash: np.ndarray          # uint64[m] hash of (seed, query_id)
    extra: PairSet             # (query, product) pairs of extra positives
    verified: PairSet          # (query, product) pairs of verified negatives
    verified_rows: np.ndarray  # int64[m, V] verified negatives' rows (-1 pad)
    # fmt: on


def query_hashes(query_ids, seed: int) -> np.ndarray:
    """uint64[m]: 64-bit BLAKE2b of (seed, query_id): the per-query random stream."""
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(f"{seed}\x00{q}".encode(), digest_size=8).digest(), "little")
            for q in query_ids
        ],
        dtype=np.uint64,
    )


def _id_rows(g: Gallery, lists: list) -> tuple[np.ndarray, np.ndarray]:
    """Per-query id lists -> (query index int64[e], row int64[e]) for the ids found in the gallery."""
    qi = np.repeat(np.arange(len(lists), dtype=np.int64), [len(ids) for ids in lists])
    flat = [i for ids in lists for i in ids]
    rows = g.lookup(flat) if flat else np.zeros(0, np.int64)
    found = rows >= 0
    return qi[found], rows[found]


def build_queries(g: Gallery, t: Triplets, pool: Pool, query_emb: Optional[np.ndarray], cfg: MineConfig) -> QuerySet:
    ref_rows = g.rows(t.ref_ids.tolist(), t.categories.tolist(), "reference")
    target_rows = g.rows(t.target_ids.tolist(), t.categories.tolist(), "target")
    if query_emb is None:
        emb = zero_shot_queries(pool.xb[ref_rows], t.text_embeddings, cfg.text_weight)
    else:  # from outside (a model, a file): checked and normalized as every outside array is
        emb = check_matrix(
            query_emb, "query_emb", rows=len(t), dim=pool.xb.shape[1], ids=t.query_ids, what="query", fix=QUERY_FIX
        )
    pairs = lambda q, r: PairSet(q, pool.product[r], len(t), pool.n_products)
    eq, er = _id_rows(g, t.extra_positive_ids)
    vq, vr = _id_rows(g, t.verified_negative_ids)
    vmax = int(np.bincount(vq, minlength=len(t)).max()) if vq.size else 0
    verified_rows = np.full((len(t), vmax), -1, np.int64)
    if vq.size:
        pos = np.arange(vq.size) - np.searchsorted(vq, vq)  # position within each query's list
        verified_rows[vq, pos] = vr
    target_score = gathered_dot(pool.xb, target_rows[:, None], emb)[:, 0]  # the exact kernel, as every s(q, c)
    release_pages(pool.xb)  # a memory-mapped gallery keeps no gathered pages
    return QuerySet(
        pa.array(t.query_ids.tolist(), pa.string()),
        pa.array(t.ref_ids.tolist(), pa.string()),
        pa.array(t.target_ids.tolist(), pa.string()),
        emb,
        ref_rows,
        target_rows,
        target_score,
        query_hashes(t.query_ids.tolist(), cfg.seed),
        pairs(eq, er),
        pairs(vq, vr),
        verified_rows,
    )


def _requests(t: Triplets, needed: bool) -> list:
    if not needed:
        return [A.Requested() for _ in range(len(t))]
    return [A.extract(" and ".join(c for c in caps if c)) for caps in t.captions]


@dataclass
class Prepared:
    """Step 1 (prepare): everything a run needs before the first search, built once."""

    # fmt: off
    g: Gallery
    t: Triplets
    pool: Pool
    qs: QuerySet
    parts: list                # [(strategy, share)] mined at this round
    ks: list                   # k per part
    mined: list                # [(strategy, k, part index)] the parts the miner fills
    k_mined: int               # negatives the miner owes each query
    need_ranked: bool          # some part needs the query's ranking (a search)
    depth: int                 # first-pass search depth
    prepared: dict = field(default_factory=dict)  # strategy -> its prepare() state (once per run, after the search opens)
    clock: Clock = field(default_factory=Clock)   # seconds per stage: read, guards (the search's own are the back-end's)
    # fmt: on

    @property
    def m(self) -> int:
        return len(self.t)


def prepare(
    ws: Workspace,
    split: str,
    cfg: MineConfig,
    query_emb: Optional[np.ndarray],
    mining_round: int,
    loaded: Optional[tuple],
) -> Prepared:
    parts = cfg.validate(mining_round)
    if cfg.query == "checkpoint" and query_emb is None:
        raise UsageError(
            "`query` checkpoint needs query embeddings from a trained model: pass `checkpoint` RUN/ckpt.pt.",
            params=("query", "checkpoint"),
        )
    ws.require()
    t0 = time.perf_counter()
    g, t = loaded if loaded is not None else ws.load(split)
    read_s = time.perf_counter() - t0
    if cfg.k > len(g) - 2:
        raise UsageError(
            f"k ({cfg.k}) is larger than the gallery allows: {ws.gallery_path(split)} has {len(g)} "
            f"images, so a query has at most {max(len(g) - 2, 0)} negatives besides its reference "
            f"and target. Lower k.",
            params=("k",),
        )
    strategies = [REGISTRY[n] for n, _ in parts]
    pool = Pool.build(
        g,
        _requests(t, any(s.attributes for s in strategies)),
        g.rows(t.ref_ids.tolist(), t.categories.tolist(), "reference"),
    )
    qs = build_queries(g, t, pool, query_emb, cfg)
    ks = split_k(cfg.k, [w for _, w in parts])
    mined = [(name, ki, si) for si, ((name, _), ki) in enumerate(zip(parts, ks)) if name != "in-batch" and ki > 0]
    need_ranked = any(REGISTRY[name].ranked for name, _, _ in mined)
    prep = Prepared(
        g, t, pool, qs, parts, ks, mined, sum(ki for _, ki, _ in mined), need_ranked, min(cfg.depth(cfg.k), len(g))
    )
    prep.clock.add("read", read_s)
    return prep
