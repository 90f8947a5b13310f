"""Mining: queries -> exact search -> guards -> strategies -> one long-format negatives table.

``mine_negatives(ws, split, cfg)`` returns a :class:`MineResult` (an Arrow table in the negatives
schema and the footer metadata); ``mine_to_file`` adds the lock and the atomic write. Queries go
through in bounded batches (``query_batch``): per batch, one FAISS search of depth
``candidates``, guard masks and strategy selections on [batch, depth] matrices, no per-query
Python loop. Rows depend on (inputs, config, seed) only, never on the batch size.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow as pa

from cir_mine.data.errors import UsageError
from cir_mine.data.checks import check_numbers, check_range
from cir_mine.data.io import DirLock, check_output
from cir_mine.data.workspace import Gallery, Triplets, Workspace, library_versions

from cir_mine.miner.core import attributes as A
from cir_mine.miner.core.attribute_codes import AttrCodes
from cir_mine.miner.core.guards import GUARDS, GuardConfig, apply_guards, member, pair_keys, shortfall_hints
from cir_mine.miner.core.search import build_index, check_index, search_batched
from cir_mine.miner.core.curriculum import mix_at, parse_schedule
from cir_mine.miner.core.scores import delta as delta_of, gathered_dot, row_dot, zero_shot_queries
from cir_mine.miner.core.strategies import (REGISTRY, Candidates, Picks, default_params, hash_keys, param_owner,
                                            parse_mix, split_k, validate_params)
from cir_mine.miner.core.tables import NEGATIVES_SCHEMA, write_negatives

log = logging.getLogger(__name__)

QUERY_SOURCES = ("zero-shot", "checkpoint")
MAX_GUARDS_PER_QUERY = 1000    # short queries whose guard counts the footer keeps (guards_per_query)
SAMPLE_ORDERS = ("top", "random")


@dataclass
class MineConfig:
    strategy: Optional[str] = None        # one strategy name (or use mix / schedule)
    mix: Optional[str] = None             # 'midzone:0.6,category:0.3,random:0.1'
    schedule: Optional[str] = None        # curriculum '0:random,2:midzone,4:hardest' (mines the mix of the mining round)
    k: int = 10                           # negatives per query
    seed: int = 0                         # sampling seed (per query: hash of seed and query_id)
    query: str = "zero-shot"              # query embeddings: zero-shot or checkpoint (passed in)
    text_weight: float = 1.0              # zero-shot: normalize(ref + text_weight * text)
    candidates: Optional[int] = None      # search depth per query (None: max(4k, range_max, 128))
    max_candidates: Optional[int] = 2048  # short queries are searched again up to this depth (None: off)
    query_batch: int = 4096               # queries per search batch (bounds memory)
    sample: Optional[str] = None          # override the selection order of ranked strategies: top | random
    random_draws: int = 32                # extra uniform draws per query beyond 2k (random, category)
    device: str = "auto"                  # FAISS device: auto | cpu | cuda
    guards: GuardConfig = field(default_factory=GuardConfig)  # the false-negative guards
    params: dict = field(default_factory=default_params)      # strategy name -> its parameter dataclass

    # -- flat options: one namespace over this config, its guards and every strategy's parameters
    @classmethod
    def option_owners(cls) -> dict:
        """Option name -> where it lives: 'config', 'guards' or a strategy name."""
        owners = {f.name: "config" for f in dataclasses.fields(cls) if f.name not in ("guards", "params")}
        owners.update({f.name: "guards" for f in dataclasses.fields(GuardConfig)})
        owners.update(param_owner())
        return owners

    @classmethod
    def of(cls, **options) -> "MineConfig":
        """A config from flat options, each named as its field is: this config's, GuardConfig's or a
        strategy's parameter, e.g. ``MineConfig.of(strategy="midzone", delta_lo=0.05, rho=None)``."""
        return cls().replace(**options)

    def replace(self, **options) -> "MineConfig":
        """A copy with flat options changed (see :meth:`of`)."""
        owners = self.option_owners()
        unknown = sorted(set(options) - set(owners))
        if unknown:
            raise UsageError(f"unknown mining option(s) {', '.join(unknown)}.", params=tuple(unknown))
        top, guards, params = {}, {}, {}
        for name, value in options.items():
            owner = owners[name]
            if owner == "config":
                top[name] = value
            elif owner == "guards":
                guards[name] = value
            else:
                params.setdefault(owner, {})[name] = _typed(REGISTRY[owner].params, name, value)
        new_params = dict(self.params)
        for owner, values in params.items():
            new_params[owner] = dataclasses.replace(self.params_of(owner), **values)
        return dataclasses.replace(self, **top, guards=dataclasses.replace(self.guards, **guards), params=new_params)

    def options(self) -> dict:
        """Every flat option with its value (the inverse of :meth:`of`)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("guards", "params")}
        out.update(dataclasses.asdict(self.guards))
        for name in REGISTRY:
            out.update(dataclasses.asdict(self.params_of(name)))
        return out

    def params_of(self, strategy: str):
        """The parameter dataclass of ``strategy`` (its defaults where this config sets none)."""
        p = self.params.get(strategy)
        return p if p is not None else REGISTRY[strategy].params()

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("guards", "params")}
        d["guards"] = dataclasses.asdict(self.guards)
        d["params"] = {name: {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(p).items()}
                       for name, p in self.params.items() if dataclasses.fields(p)}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MineConfig":
        """Inverse of :meth:`to_dict`; flat option names (tables mined by earlier versions) are read too."""
        d = dict(d)
        guards, params = d.pop("guards", None) or {}, d.pop("params", None) or {}
        flat = {**guards, **{k: v for p in params.values() for k, v in p.items()}, **d}
        try:
            return cls.of(**flat)
        except UsageError as e:
            raise UsageError(str(e).replace("option(s)", "config key(s)"), params=e.params) from None

    def parts(self, mining_round: int = 0) -> list[tuple[str, float]]:
        """The (strategy, share) mix this config mines at ``mining_round``."""
        given = [x for x in (self.strategy, self.mix) if x]
        if len(given) > 1:
            raise UsageError("give either strategy or mix, not both.", params=("strategy", "mix"))
        if given:
            return parse_mix(given[0])
        if self.schedule:
            return mix_at(parse_schedule(self.schedule), mining_round)
        raise UsageError("nothing to mine: pass strategy NAME, mix SPEC or schedule SPEC.",
                         params=("strategy", "mix", "schedule"))

    def validate(self, mining_round: int = 0) -> list[tuple[str, float]]:
        """Check every option (errors name the option); returns the mix of ``mining_round``."""
        check_numbers(self)
        parts = self.parts(mining_round)
        if self.k < 1:
            raise UsageError(f"k must be at least 1 (got {self.k}).", params=("k",))
        if self.query not in QUERY_SOURCES:
            raise UsageError(f"query {self.query!r}: use zero-shot or checkpoint.", params=("query",))
        if self.sample is not None and self.sample not in SAMPLE_ORDERS:
            raise UsageError(f"sample {self.sample!r}: use top or random.", params=("sample",))
        if self.max_candidates is not None and self.max_candidates < 1:
            raise UsageError("max_candidates must be at least 1 (use max_candidates=None to switch deepening off).",
                             params=("max_candidates", "max_candidates=None"))
        if self.candidates is not None and self.candidates < 1:
            raise UsageError("candidates must be at least 1.", params=("candidates",))
        if self.query_batch < 1:
            raise UsageError("query_batch must be at least 1.", params=("query_batch",))
        self.guards.validate()
        validate_params(self.params)
        if self.schedule:
            parse_schedule(self.schedule)
        return parts

    def depth(self, k: int) -> int:
        if self.candidates is not None:
            return self.candidates
        return max(4 * k, self.params_of("hardest").range_max or 0, 128)


def _typed(params_cls: type, name: str, value):
    """JSON lists back to tuples for tuple-valued parameters (category_shares)."""
    default = {f.name: f.default for f in dataclasses.fields(params_cls)}[name]
    return tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value


@dataclass
class MineResult:
    table: pa.Table                         # negatives schema, one row per (query, negative)
    meta: dict                              # footer metadata (config, shortfall, guard counts, ...)
    guard_counts: dict = field(default_factory=dict)  # guard -> int64[m] candidates removed per query

    @property
    def shortfall(self) -> list:
        return self.meta["shortfall"]["query_ids"]

    def grouped(self, ws: Optional[Workspace] = None):
        """The table per query, as :meth:`cir_mine.miner.core.tables.NegativesTable.grouped`."""
        from cir_mine.miner.core.tables import NegativesTable

        return NegativesTable(None, self.table, self.meta).grouped(ws)


# ------------------------------------------------------------------------------------------------
# Prepared inputs (gallery side and query side), built once per run


@dataclass
class Pool:
    """Gallery arrays the miner works on (integer rows stay inside miner/)."""

    ids: pa.Array              # string[n] image ids
    xb: np.ndarray             # float32[n, d] unit rows
    product: np.ndarray        # int64[n] product code (one per image id)
    n_products: int
    cat: np.ndarray            # int32[n] category code
    cat_names: list
    cat_order: np.ndarray      # int64[n] rows sorted by category
    cat_start: np.ndarray      # int64[n_cat + 1] block starts in cat_order
    attrs: AttrCodes

    @classmethod
    def build(cls, g: Gallery, requests: list, ref_rows: Optional[np.ndarray] = None) -> "Pool":
        uniq, product = np.unique(g.image_ids.astype(str), return_inverse=True)
        cat_names, cat = np.unique(g.categories.astype(str), return_inverse=True)
        cat = cat.astype(np.int32)
        order = np.argsort(cat, kind="stable")
        start = np.searchsorted(cat[order], np.arange(len(cat_names) + 1))
        return cls(pa.array(g.image_ids.tolist(), pa.string()), g.embeddings, product.astype(np.int64),
                   len(uniq), cat, cat_names.tolist(), order.astype(np.int64), start.astype(np.int64),
                   AttrCodes.build(g.attributes, requests, ref_rows))


@dataclass
class QuerySet:
    ids: pa.Array              # string[m] query ids
    ref_ids: pa.Array
    target_ids: pa.Array
    emb: np.ndarray            # float32[m, d] query embeddings
    ref_rows: np.ndarray       # int64[m]
    target_rows: np.ndarray    # int64[m]
    target_score: np.ndarray   # float32[m] s(q, t)
    qhash: np.ndarray          # uint64[m] hash of (seed, query_id)
    extra_keys: np.ndarray     # sorted int64 pair keys of extra positives
    verified_keys: np.ndarray  # sorted int64 pair keys of verified negatives
    verified_rows: np.ndarray  # int64[m, V] verified negatives' rows (-1 pad)


def query_hashes(query_ids, seed: int) -> np.ndarray:
    """uint64[m]: 64-bit BLAKE2b of (seed, query_id): the per-query random stream."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{seed}\x00{q}".encode(), digest_size=8).digest(), "little")
                     for q in query_ids], dtype=np.uint64)


def _id_rows(g: Gallery, lists: list) -> tuple[np.ndarray, np.ndarray]:
    """Per-query id lists -> (query index int64[e], row int64[e]) for the ids found in the gallery."""
    row = g.row_of
    qi, rows = [], []
    for j, ids in enumerate(lists):
        for i in ids:
            r = row.get(i)
            if r is not None:
                qi.append(j)
                rows.append(r)
    return np.asarray(qi, np.int64), np.asarray(rows, np.int64)


def build_queries(g: Gallery, t: Triplets, pool: Pool, query_emb: Optional[np.ndarray], cfg: MineConfig) -> QuerySet:
    ref_rows = g.rows(t.ref_ids.tolist(), t.categories.tolist(), "reference")
    target_rows = g.rows(t.target_ids.tolist(), t.categories.tolist(), "target")
    if query_emb is None:
        emb = zero_shot_queries(pool.xb[ref_rows], t.text_embeddings, cfg.text_weight)
    else:
        emb = np.ascontiguousarray(query_emb, dtype=np.float32)
        if emb.shape != (len(t), pool.xb.shape[1]):
            raise UsageError(f"query embeddings have shape {emb.shape}, expected ({len(t)}, {pool.xb.shape[1]}): "
                             f"one row per query of the split, in the gallery's dimension.")
    keys = lambda q, r: np.unique(pair_keys(q[:, None], pool.product[r][:, None], pool.n_products).ravel())
    eq, er = _id_rows(g, t.extra_positive_ids)
    vq, vr = _id_rows(g, t.verified_negative_ids)
    vmax = int(np.bincount(vq, minlength=len(t)).max()) if vq.size else 0
    verified_rows = np.full((len(t), vmax), -1, np.int64)
    if vq.size:
        pos = np.arange(vq.size) - np.searchsorted(vq, vq)          # position within each query's list
        verified_rows[vq, pos] = vr
    return QuerySet(
        pa.array(t.query_ids.tolist(), pa.string()), pa.array(t.ref_ids.tolist(), pa.string()),
        pa.array(t.target_ids.tolist(), pa.string()), emb, ref_rows, target_rows,
        row_dot(emb, pool.xb[target_rows]), query_hashes(t.query_ids.tolist(), cfg.seed),
        keys(eq, er), keys(vq, vr), verified_rows)


# ------------------------------------------------------------------------------------------------
# One batch of queries


class BatchContext:
    """What a strategy sees for b queries: the guarded ranked candidates and samplers."""

    def __init__(self, pool: Pool, qs: QuerySet, q: np.ndarray, cfg: MineConfig, index=None, depth: int = 0):
        self.pool, self.qs, self.q, self.cfg = pool, qs, q, cfg
        self.index, self.depth = index, depth
        self.gcfg = cfg.guards
        self.b = len(q)
        self.local = np.arange(self.b, dtype=np.int64)
        self.counts = {g: np.zeros(self.b, np.int64) for g in GUARDS}
        self.taken_keys = np.zeros(0, np.int64)
        self.ranked: Optional[Candidates] = None
        self._cache: dict = {}

    # candidates
    def candidates(self, rows: np.ndarray, scores: Optional[np.ndarray] = None,
                   ranks: Optional[np.ndarray] = None) -> Candidates:
        """Guard a [b, L] matrix of gallery rows (scores s(q, c) computed when not given)."""
        pool, qs, q = self.pool, self.qs, self.q
        rows = np.asarray(rows, np.int64)
        present = rows >= 0
        safe = np.where(present, rows, 0)
        if scores is None:
            scores = gathered_dot(pool.xb, rows, qs.emb[q])
        if ranks is None:
            ranks = np.full(rows.shape, -1, np.int32)
        ts = qs.target_score[q]
        d = delta_of(ts, scores)
        product = np.where(present, pool.product[safe], -1)
        valid, counts = apply_guards(rows, product, scores, lambda need: self._near_dup_sims(rows, d, need), ts, pool.product[qs.target_rows[q]],
                                     pool.product[qs.ref_rows[q]], q, qs.extra_keys, qs.verified_keys,
                                     pool.n_products, self.gcfg)
        for name, c in counts.items():
            self.counts[name] += c
        return Candidates(rows, product, scores.astype(np.float32, copy=False), ranks.astype(np.int32),
                          d, valid)

    def _near_dup_sims(self, rows: np.ndarray, d: np.ndarray, need: np.ndarray) -> np.ndarray:
        """s(c, t) where ``need`` and it can reach dup_threshold, -inf elsewhere. On unit vectors
        |s(q,c) - s(q,t)| <= ||c - t|| = sqrt(2 - 2 s(c,t)), so only |Δ| <= sqrt(2(1 - τ)) can be
        near-duplicates: the rest is skipped exactly, without gathering their embeddings."""
        out = np.full(rows.shape, -np.inf, np.float32)
        tau = self.gcfg.dup_threshold
        bound = np.sqrt(max(0.0, 2.0 * (1.0 - tau))) + 1e-5
        i, j = np.nonzero(need & (np.abs(d) <= bound) & (rows >= 0))
        xb, trow = self.pool.xb, self.qs.target_rows[self.q]
        step = 8192
        for s in range(0, i.size, step):
            ii, jj = i[s:s + step], j[s:s + step]
            out[ii, jj] = np.einsum("ij,ij->i", xb[rows[ii, jj]], xb[trow[ii]])
        return out

    def sim_target_full(self, c: Candidates) -> np.ndarray:
        """s(c, t) for every candidate: float32[b, L] (-inf for empty slots)."""
        key = ("sim_t", id(c))
        if key not in self._cache:
            self._cache[key] = gathered_dot(self.pool.xb, c.rows, self.pool.xb[self.qs.target_rows[self.q]])
        return self._cache[key]

    def random_candidates(self, kind: str, k: int, stream: int) -> Candidates:
        """Uniform draws from the gallery ('all'), the target's category ('same-cat') or the other
        categories ('other-cat'), in random order, guarded. Pools no larger than the number of draws
        are enumerated in a random permutation (exact); larger ones are drawn with replacement
        (repeats removed by the duplicate-product guard)."""
        pool, q = self.pool, self.q
        n = len(pool.product)
        L = 2 * k + self.cfg.random_draws
        tcat = pool.cat[self.qs.target_rows[q]]
        if kind == "all":
            start, size = np.zeros(self.b, np.int64), np.full(self.b, n, np.int64)
        else:
            cs, ce = pool.cat_start[tcat], pool.cat_start[tcat + 1]
            start, size = (cs, ce - cs) if kind == "same-cat" else (np.zeros(self.b, np.int64), n - (ce - cs))
        L = int(min(L, max(1, size.max(initial=1))))
        j = np.broadcast_to(np.arange(L, dtype=np.int64), (self.b, L))
        h = hash_keys(self.qs.qhash[q], j, stream)
        exact = (size <= L)[:, None]
        idx = np.where(exact, j, (h % np.maximum(size, 1).astype(np.uint64)[:, None]).astype(np.int64))
        ok = idx < size[:, None]
        if kind == "other-cat":
            cs, ce = pool.cat_start[tcat], pool.cat_start[tcat + 1]
            idx = np.where(idx >= cs[:, None], idx + (ce - cs)[:, None], idx)
        pos = np.where(ok, start[:, None] + idx, 0)
        rows = pool.cat_order[pos] if kind != "all" else pos
        rows = np.where(ok, rows, -1)
        # exact pools: order by a hash of the row (a random permutation); others: draw order
        order_key = np.where(exact, hash_keys(self.qs.qhash[q], rows, stream), j.astype(np.uint64))
        order_key = np.where(ok, order_key, np.iinfo(np.uint64).max)
        order = np.argsort(order_key, axis=1, kind="stable")
        return self.candidates(np.take_along_axis(rows, order, 1))

    def target_neighbors(self) -> Candidates:
        """The target's own nearest gallery images (depth ``self.depth``), guarded; ``rank`` is -1
        (not the query's ranking) and ``scores`` are s(q, c)."""
        if "target_nn" not in self._cache:
            _, I = search_batched(self.index, self.pool.xb[self.qs.target_rows[self.q]], self.depth,
                                  batch_size=max(1, self.b))
            self._cache["target_nn"] = self.candidates(I)
        return self._cache["target_nn"]

    def verified_candidates(self) -> Candidates:
        return self.candidates(self.qs.verified_rows[self.q])

    # selection helpers
    def random_keys(self, c: Candidates, stream: int) -> np.ndarray:
        return hash_keys(self.qs.qhash[self.q], c.rows, stream)

    def available(self, c: Candidates) -> np.ndarray:
        """Not picked by an earlier part of the mix (compared by product)."""
        if self.taken_keys.size == 0:
            return np.ones(c.shape, bool)
        return ~member(pair_keys(self.local, c.product, self.pool.n_products), self.taken_keys)

    def take(self, p: Picks) -> None:
        ok = p.rows >= 0
        prod = self.pool.product[np.where(ok, p.rows, 0)]
        keys = pair_keys(self.local, prod, self.pool.n_products)[ok]
        self.taken_keys = np.union1d(self.taken_keys, keys)

    # attributes
    def status(self, c: Candidates) -> np.ndarray:
        return self.pool.attrs.status(self.q, np.where(c.rows >= 0, c.rows, 0))

    def overlap(self, c: Candidates) -> np.ndarray:
        return self.pool.attrs.overlap(np.where(c.rows >= 0, c.rows, 0), self.qs.target_rows[self.q][:, None])

    def group_diff(self, c: Candidates) -> np.ndarray:
        return self.pool.attrs.group_diff(np.where(c.rows >= 0, c.rows, 0), self.qs.target_rows[self.q])

    def group_present(self, c: Candidates) -> np.ndarray:
        a = self.pool.attrs
        gc = a.group_code[a.combo[np.where(c.rows >= 0, c.rows, 0)]]
        tc = a.group_code[a.combo[self.qs.target_rows[self.q]]][:, None, :]
        return (gc != 0) | (tc != 0)

    def group_asked(self) -> np.ndarray:
        return self.pool.attrs.q_group_asked[self.q]


# ------------------------------------------------------------------------------------------------
# The run


def _requests(t: Triplets, needed: bool) -> list:
    if not needed:
        return [A.Requested() for _ in range(len(t))]
    return [A.extract(" and ".join(c for c in caps if c)) for caps in t.captions]


def mine_negatives(ws: Workspace, split: str, cfg: MineConfig, query_emb: Optional[np.ndarray] = None,
                   mining_round: int = 0, index=None, progress: Optional[Callable[[int], None]] = None,
                   loaded: Optional[tuple] = None) -> MineResult:
    """Mine negatives for every query of ``split``.

    query_emb: float32[m, d] normalized query embeddings (a trained model's, from cir-train's
    refresh); None with ``cfg.query == 'zero-shot'`` uses normalize(ref + w * text).
    index: a FAISS inner-product index over the gallery rows (default: exact flat, built here).
    progress: called with the number of queries finished in each batch.
    loaded: ``ws.load(split)`` already in memory (cir-train's refresh mines the same split every
    round), so the gallery and triplets are not read again."""
    t0 = time.perf_counter()
    parts = cfg.validate(mining_round)
    if cfg.query == "checkpoint" and query_emb is None:
        raise UsageError("--query checkpoint needs query embeddings from a trained model: pass --checkpoint RUN/ckpt.pt.")
    ws.require()
    g, t = loaded if loaded is not None else ws.load(split)
    if cfg.k > len(g) - 2:
        raise UsageError(f"k ({cfg.k}) is larger than the gallery allows: {ws.gallery_path(split)} has {len(g)} "
                         f"images, so a query has at most {max(len(g) - 2, 0)} negatives besides its reference "
                         f"and target. Lower k.", params=("k",))
    strategies = [REGISTRY[n] for n, _ in parts]
    pool = Pool.build(g, _requests(t, any(s.attributes for s in strategies)),
                      g.rows(t.ref_ids.tolist(), t.categories.tolist(), "reference"))
    qs = build_queries(g, t, pool, query_emb, cfg)
    ks = split_k(cfg.k, [w for _, w in parts])
    mined = [(name, ki, si) for si, ((name, _), ki) in enumerate(zip(parts, ks)) if name != "in-batch" and ki > 0]
    k_mined = sum(ki for _, ki, _ in mined)
    n, m = len(g), len(t)
    need_ranked = any(REGISTRY[name].ranked for name, _, _ in mined)
    depth = min(cfg.depth(cfg.k), n)
    if need_ranked and index is None:
        index = build_index(pool.xb, "flat", device=cfg.device)
    elif index is not None:
        check_index(index, g, "the given index", ws.gallery_path(split), fix="Pass an index built from this gallery")
    t_prep = time.perf_counter() - t0

    got = np.zeros(m, np.int64)
    guard_counts = {name: np.zeros(m, np.int64) for name in GUARDS}
    timing = {"search": 0.0}

    def mine_batch(q: np.ndarray, depth: int) -> dict:
        """Mine queries ``q`` at search depth ``depth``; fills got/guard_counts, returns the rows."""
        res = {c: [] for c in ("q", "row", "part", "rank", "score")}
        ctx = BatchContext(pool, qs, q, cfg, index, depth)
        if need_ranked:
            ts = time.perf_counter()
            D, I = search_batched(index, qs.emb[q], depth, batch_size=len(q))
            timing["search"] += time.perf_counter() - ts
            ranks = np.broadcast_to(np.arange(I.shape[1], dtype=np.int32), I.shape)
            ctx.ranked = ctx.candidates(I, D, ranks)
        got[q] = 0
        for name, ki, si in mined:
            p = REGISTRY[name].fn(ctx, ki, si + 1, cfg.params_of(name))
            ctx.take(p)
            ok = p.rows >= 0
            qi, col = np.nonzero(ok)
            res["q"].append(q[qi])
            res["row"].append(p.rows[qi, col])
            res["part"].append(np.full(qi.size, si, np.int8))
            res["rank"].append(p.ranks[qi, col])
            res["score"].append(p.scores[qi, col])
            got[q] += ok.sum(1)
        for name, c in ctx.counts.items():
            guard_counts[name][q] = c
        return res

    batches = []
    for s in range(0, m, cfg.query_batch):
        q = np.arange(s, min(m, s + cfg.query_batch), dtype=np.int64)
        batches.append(mine_batch(q, depth))
        if progress:
            progress(len(q))
    # Adaptive depth: queries still short (typically those whose target ranks deep, so that the
    # positive-aware cap removes every candidate above it) are searched again, 4x deeper each
    # time, up to max_candidates. Their earlier rows are replaced; other queries are untouched.
    depth0 = depth
    max_depth = min(n, cfg.max_candidates) if cfg.max_candidates else depth
    deepened = 0
    while need_ranked and depth < max_depth:
        short = np.flatnonzero(got < k_mined)
        if short.size == 0:
            break
        depth = min(max_depth, depth * 4)
        redo = np.zeros(m, bool)
        redo[short] = True
        batches = [{c: [v[~redo[b["q"][i]]] for i, v in enumerate(vals)] for c, vals in b.items()} for b in batches]
        step = max(1, cfg.query_batch * depth0 // depth)  # same memory per batch as the first pass
        for s in range(0, short.size, step):
            batches.append(mine_batch(short[s:s + step], depth))
        deepened += int(short.size)
    out = {c: [v for b in batches for v in b[c]] for c in ("q", "row", "part", "rank", "score")}
    t_search = timing["search"]

    part_rows = np.bincount(np.concatenate(out["part"]).astype(np.int64) if out["part"] else np.zeros(0, np.int64),
                            minlength=len(parts))
    table = _assemble(pool, qs, parts, out, mining_round, cfg.seed)
    short = np.flatnonzero(got < k_mined)
    bank = "in-batch" if k_mined == 0 else ("mined+in-batch" if any(n == "in-batch" for n, _ in parts) else "mined")
    meta = {
        "config": cfg.to_dict(), "manifest_hash": ws.manifest_hash(), "workspace": str(ws.root), "split": split,
        "data_hash": ws.split_hash(split),
        "round": int(mining_round), "bank": bank, "query_source": "zero-shot" if query_emb is None else "provided",
        "parts": [{"strategy": n, "share": w, "k": ki, "rows": int(part_rows[si])}
                  for si, ((n, w), ki) in enumerate(zip(parts, ks))],
        "schedule": parse_schedule(cfg.schedule) if cfg.schedule else None,
        "k": cfg.k, "k_mined": k_mined, "depth": depth if need_ranked else 0, "deepened_queries": deepened,
        "n_queries": m, "n_gallery": n, "n_rows": table.num_rows,
        "shortfall": {"count": int(short.size), "query_ids": [str(x) for x in qs.ids.take(pa.array(short)).to_pylist()],
                      "missing": int((k_mined - got[short]).sum()),
                      "hints": shortfall_hints({g: int(c[short].sum()) for g, c in guard_counts.items()},
                                               int((k_mined - got[short]).sum()), cfg.guards,
                                               [f"{n}: {REGISTRY[n].hint}" for n, _, _ in mined if REGISTRY[n].hint])},
        "guards_per_query": {str(qs.ids[int(i)]): {g: int(c[i]) for g, c in guard_counts.items()}
                             for i in short[:MAX_GUARDS_PER_QUERY]},
        "guards": {name: {"removed": int(c.sum()), "queries": int((c > 0).sum()), "max_per_query": int(c.max(initial=0))}
                   for name, c in guard_counts.items()},
        "timing": {"prepare_s": _seconds(t_prep), "search_s": _seconds(t_search),
                   "total_s": _seconds(time.perf_counter() - t0)},
        "versions": library_versions(),
    }
    log.info("mined %d rows for %d queries (shortfall %d)", table.num_rows, m, short.size)
    return MineResult(table, meta, guard_counts)


def _seconds(x: float) -> float:
    return float(f"{x:.3f}")


def _assemble(pool: Pool, qs: QuerySet, parts, out: dict, mining_round: int, seed: int) -> pa.Table:
    cat = lambda k, dt: np.concatenate(out[k]) if out[k] else np.zeros(0, dt)
    q, row, part = cat("q", np.int64), cat("row", np.int64), cat("part", np.int8)
    # rows come out batch by batch and part by part: order them by query, then part, then pick order
    order = np.lexsort((np.arange(q.size), part, q))
    q, row, part = q[order], row[order], part[order]
    rank, score = cat("rank", np.int32)[order], cat("score", np.float32)[order]
    target_rows = qs.target_rows[q]
    ts = qs.target_score[q]
    names = pa.array([n for n, _ in parts], pa.string())
    qa, ra = pa.array(q), pa.array(row)
    neg_category = pa.array(pool.cat_names, pa.string()).take(pa.array(pool.cat[row].astype(np.int64)))
    return pa.Table.from_arrays([
        qs.ids.take(qa), qs.ref_ids.take(qa), qs.target_ids.take(qa), pool.ids.take(ra), neg_category,
        names.take(pa.array(part.astype(np.int64))), pa.array(rank, pa.int32()),
        pa.array(score, pa.float32()), pa.array(ts, pa.float32()), pa.array(ts - score, pa.float32()),
        pa.array(np.full(q.size, mining_round, np.int32)), pa.array(pool.cat[row] == pool.cat[target_rows]),
        pa.array(pool.attrs.overlap(row, target_rows), pa.float32()), pa.array(np.full(q.size, seed, np.int64)),
    ], schema=NEGATIVES_SCHEMA)


def mine_to_file(ws: Workspace, split: str, cfg: MineConfig, out: str | Path, overwrite: bool = True,
                 reads: Sequence = (), **kw) -> MineResult:
    """Mine and write ``out`` atomically, holding the lock of its directory.

    ``out`` is checked first (:func:`cir_mine.data.io.check_output`): never a workspace file or one of
    ``reads`` (other inputs, e.g. a checkpoint), and an existing file only with ``overwrite``.
    """
    out = check_output(out, reads, overwrite)
    with DirLock(out.parent, f"cir-mine negatives -> {out.name}"):
        res = mine_negatives(ws, split, cfg, **kw)
        write_negatives(res.table, out, res.meta)
    return res
