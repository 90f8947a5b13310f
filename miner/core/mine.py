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
from cir_mine.data.checks import check_numbers
from cir_mine.data.io import DirLock, check_output
from cir_mine.data.rows import sorted_codes
from cir_mine.data.workspace import Gallery, Triplets, Workspace, file_digest, library_versions, release_pages

from cir_mine.miner.core import attributes as A
from cir_mine.miner.core.attribute_codes import AttrCodes
from cir_mine.miner.core.guards import GUARDS, GuardConfig, apply_guards, member, pair_keys, shortfall_hints
from cir_mine.miner.core.search.backends import ExactSearch, Reranked, check_backend, search_batched
from cir_mine.miner.core.search.build import build_index, check_device, factory_string, sample_rows
from cir_mine.miner.core.search.params import current_params, default_overfetch, index_kind, parse_search_params
from cir_mine.miner.core.search.persist import check_index, index_meta, load_index, save_backend_index, saved_index_path
from cir_mine.miner.core.search.tuning import Tuning, candidate_recall, tune, tune_deep
from cir_mine.miner.core.curriculum import mix_at, parse_schedule
from cir_mine.miner.core.scores import delta as delta_of, zero_shot_queries
from cir_mine.miner.core.search.exact import gathered_dot, row_dot
from cir_mine.miner.core.search.measure import Clock
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
    device: str = "auto"                  # auto | cpu | cuda, by the one device rule (cir_mine.miner.accel.device)
    fp16: bool = False                    # GPU indexes store float16 vectors (flat and IVF)
    index: str = "flat"                   # search back-end: flat (exact) | workspace (index.{split}.faiss) | ivf | ivfpq | hnsw | FAISS factory
    nprobe: Optional[int] = None          # IVF: inverted lists visited (None: tuned to target_recall)
    ef_search: Optional[int] = None       # HNSW: efSearch (None: tuned to target_recall)
    search_params: Optional[str] = None   # FAISS search parameters 'nprobe=16' instead of nprobe / ef_search
    overfetch: Optional[float] = None     # approximate candidates fetched per kept one before exact re-ranking (None: 1, 4 for PQ/SQ codes)
    target_recall: Optional[float] = 0.98 # approximate indexes: tune nprobe / efSearch to this candidate recall@depth (None: FAISS defaults)
    tune_queries: int = 1000              # sampled queries the tuning measures recall on
    check_recall: int = 0                 # sampled queries for the recall and negative-overlap report against exact mining (0: off)
    prefetch: Optional[bool] = None       # search batch i+1 while batch i is guarded (None: with a GPU index)
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
        check_device(self.device)
        self.guards.validate()
        validate_params(self.params)
        if self.schedule:
            parse_schedule(self.schedule)
        if self.target_recall is not None and not 0 < self.target_recall <= 1:
            raise UsageError(f"target_recall must be in (0, 1] (got {self.target_recall}).", params=("target_recall",))
        if self.check_recall < 0:
            raise UsageError("check_recall must be at least 0.", params=("check_recall",))
        if self.tune_queries < 1:
            raise UsageError("tune_queries must be at least 1.", params=("tune_queries",))
        for name, v in (("nprobe", self.nprobe), ("ef_search", self.ef_search)):
            if v is not None and v < 1:
                raise UsageError(f"{name} must be at least 1 (got {v}).", params=(name,))
        if self.search_params and (self.nprobe or self.ef_search):
            raise UsageError("give either search_params or nprobe / ef_search, not both.",
                             params=("search_params", "nprobe", "ef_search"))
        if self.overfetch is not None and self.overfetch < 1:
            raise UsageError(f"overfetch must be at least 1 (got {self.overfetch}).", params=("overfetch",))
        self.fixed_params()
        return parts

    def fixed_params(self) -> dict:
        """The search parameters given explicitly ({} when they are to be tuned or left at defaults)."""
        out = parse_search_params(self.search_params)
        if self.nprobe is not None:
            out["nprobe"] = int(self.nprobe)
        if self.ef_search is not None:
            out["efSearch"] = int(self.ef_search)
        return out

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
    backend: object = field(default=None, repr=False)  # the search back-end the run used (None: no search)

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
        ids = g.id_array
        product, uniq = sorted_codes(ids)
        cat, cat_names = sorted_codes(g.category_array)
        cat = cat.astype(np.int32)
        order = np.argsort(cat, kind="stable")
        start = np.searchsorted(cat[order], np.arange(len(cat_names) + 1))
        return cls(ids, g.embeddings, product, len(uniq), cat, cat_names, order.astype(np.int64),
                   start.astype(np.int64), AttrCodes.build(g.attributes, requests, ref_rows))


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
    target_score = row_dot(emb, np.asarray(pool.xb[target_rows], np.float32))
    release_pages(pool.xb)                          # a memory-mapped gallery keeps no gathered pages
    return QuerySet(
        pa.array(t.query_ids.tolist(), pa.string()), pa.array(t.ref_ids.tolist(), pa.string()),
        pa.array(t.target_ids.tolist(), pa.string()), emb, ref_rows, target_rows,
        target_score, query_hashes(t.query_ids.tolist(), cfg.seed),
        keys(eq, er), keys(vq, vr), verified_rows)


# ------------------------------------------------------------------------------------------------
# One batch of queries


class BatchContext:
    """What a strategy sees for b queries: the guarded ranked candidates and samplers."""

    def __init__(self, pool: Pool, qs: QuerySet, q: np.ndarray, cfg: MineConfig, index=None, depth: int = 0,
                 clock: Optional[Clock] = None):
        self.pool, self.qs, self.q, self.cfg = pool, qs, q, cfg
        self.clock = clock           # seconds of the guards (see :class:`~cir_mine.miner.core.search.measure.Clock`)
        self.index, self.depth = index, depth
        self.gcfg = cfg.guards
        self.b = len(q)
        self.local = np.arange(self.b, dtype=np.int64)
        self.counts = {g: np.zeros(self.b, np.int64) for g in GUARDS}
        self.taken_keys = np.zeros(0, np.int64)
        self.ranked: Optional[Candidates] = None
        self.prepared: dict = {}     # strategy name -> its prepare() state for this run
        self._cache: dict = {}

    # candidates
    def candidates(self, rows: np.ndarray, scores: Optional[np.ndarray] = None,
                   ranks: Optional[np.ndarray] = None, distinct: bool = False) -> Candidates:
        """Guard a [b, L] matrix of gallery rows (scores s(q, c) computed when not given;
        ``distinct``: no row repeats within a query's list, as in a search's results)."""
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
        t = time.perf_counter()
        valid, counts = apply_guards(rows, product, scores, lambda need: self._near_dup_sims(rows, d, need), ts, pool.product[qs.target_rows[q]],
                                     pool.product[qs.ref_rows[q]], q, qs.extra_keys, qs.verified_keys,
                                     pool.n_products, self.gcfg, distinct and pool.n_products == len(pool.product))
        if self.clock is not None:
            self.clock.add("guards", time.perf_counter() - t)
        for name, c in counts.items():
            self.counts[name] += c
        return Candidates(rows, product, scores.astype(np.float32, copy=False), ranks.astype(np.int32),
                          d, valid)

    def _near_dup_sims(self, rows: np.ndarray, d: np.ndarray, need: np.ndarray) -> np.ndarray:
        """s(c, t) where ``need`` and it can reach dup_threshold, -inf elsewhere. On unit vectors
        |s(q,c) - s(q,t)| <= ||c - t|| = sqrt(2 - 2 s(c,t)), so only |Δ| <= sqrt(2(1 - τ)) can be
        near-duplicates: the rest is skipped exactly (their rows passed as -1, never read)."""
        tau = self.gcfg.dup_threshold
        bound = np.sqrt(max(0.0, 2.0 * (1.0 - tau))) + 1e-5
        check = need & (np.abs(d) <= bound) & (rows >= 0)
        xb = self.pool.xb
        return gathered_dot(xb, np.where(check, rows, -1), np.asarray(xb[self.qs.target_rows[self.q]], np.float32))

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
            self._cache["target_nn"] = self.candidates(I, distinct=True)
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

    def group_as_reference(self, c: Candidates) -> np.ndarray:
        """bool[b, L, G]: the candidate has a value in the group and it is the reference's."""
        a = self.pool.attrs
        gc = a.group_code[a.combo[np.where(c.rows >= 0, c.rows, 0)]]
        rc = a.group_code[a.combo[self.qs.ref_rows[self.q]]][:, None, :]
        return (gc != 0) & (gc == rc)


# ------------------------------------------------------------------------------------------------
# The run


def _requests(t: Triplets, needed: bool) -> list:
    if not needed:
        return [A.Requested() for _ in range(len(t))]
    return [A.extract(" and ".join(c for c in caps if c)) for caps in t.captions]


@dataclass
class Prepared:
    """Step 1 (prepare): everything a run needs before the first search, built once."""

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

    @property
    def m(self) -> int:
        return len(self.t)


@dataclass
class Mined:
    """Rows picked for a set of queries (gallery rows, not yet ids) and what the guards removed."""

    out: dict                  # column -> list of arrays: q, row, part, rank, score
    got: np.ndarray            # int64[m] negatives per query (all queries of the split; 0 if not mined)
    guard_counts: dict         # guard -> int64[m]
    depth: int                 # deepest search depth used
    deepened: int              # queries searched again
    search_s: float            # seconds inside back-end searches
    select_s: float            # seconds guarding and selecting
    deepen_s: float = 0.0      # seconds of the deepening passes (search and selection)


def prepare(ws: Workspace, split: str, cfg: MineConfig, query_emb: Optional[np.ndarray], mining_round: int,
            loaded: Optional[tuple]) -> Prepared:
    parts = cfg.validate(mining_round)
    if cfg.query == "checkpoint" and query_emb is None:
        raise UsageError("--query checkpoint needs query embeddings from a trained model: pass --checkpoint RUN/ckpt.pt.")
    ws.require()
    t0 = time.perf_counter()
    g, t = loaded if loaded is not None else ws.load(split)
    read_s = time.perf_counter() - t0
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
    need_ranked = any(REGISTRY[name].ranked for name, _, _ in mined)
    prep = Prepared(g, t, pool, qs, parts, ks, mined, sum(ki for _, ki, _ in mined), need_ranked,
                    min(cfg.depth(cfg.k), len(g)))
    prep.clock.add("read", read_s)
    return prep


def open_search(prep: Prepared, ws: Workspace, split: str, cfg: MineConfig, index=None) -> tuple:
    """Step 2 (search back-end): -> (back-end, footer record). ``index``: a back-end (``.search(xq, k)``
    with ``describe()``) used as given, a bare FAISS index (re-ranked exactly), or a factory
    ``index(xb, cfg) -> back-end | None`` (``cir_mine.miner.accel.device_search``: the device
    rule's); otherwise (or when the factory returns None) ``cfg.index`` names one. Approximate
    back-ends opened here get ``cfg``'s search parameters, or are tuned to ``cfg.target_recall`` on
    a seeded sample of the composed queries."""
    xb = prep.pool.xb
    n, d = xb.shape
    if index is not None and not hasattr(index, "search"):
        made = index(xb, cfg)            # a factory from above the core (the device rule's back-end)
        if made is not None:
            check_backend(made, n, d, "the device back-end")
            return made, {**made.describe(), "source": "built"}
        index = None
    if index is not None:
        if hasattr(index, "describe"):
            check_backend(index, n, d, "the given back-end")
            return index, {**index.describe(), "source": "given"}
        check_index(index, prep.g, "the given index", ws.gallery_path(split), fix="Pass an index built from this gallery")
        backend = Reranked(index, xb, cfg.overfetch or 1.0, {"index": "given", "factory": type(index).__name__,
                                                                 "params": current_params(index)})
        backend.exact = index_kind(index) == "flat"
        if cfg.fixed_params():
            backend.set_params(cfg.fixed_params())
        return backend, {**backend.describe(), "source": "given"}
    spec = cfg.index
    if spec == "flat" or spec == "Flat":
        backend = ExactSearch(xb, device=cfg.device, fp16=cfg.fp16)
        return backend, {**backend.describe(), "source": "built"}
    if spec == "workspace":
        path = ws.index_path(split)
        meta = index_meta(path)
        raw = load_index(path, "cpu" if "HNSW" in str(meta.get("factory", "")) else cfg.device)
        check_index(raw, prep.g, path, ws.gallery_path(split), meta.get("gallery_hash"),
                    f"Rebuild it with `cir-mine index --work {ws.root} --split {split}`")
        factory = meta.get("factory") or type(raw).__name__
        info = {"index": "workspace", "factory": factory, "file": path.name,
                "fingerprint": file_digest(path)}
    else:
        raw = build_index(xb, spec, cfg.device, cfg.fp16, cfg.seed)
        factory = factory_string(spec, n, d)
        info = {"index": spec, "factory": factory}
    if index_kind(raw) == "flat":
        backend = Reranked(raw, xb, 1.0, {**info, "params": {}})
        backend.exact = True
        return backend, {**backend.describe(), "source": "built"}
    backend = Reranked(raw, xb, cfg.overfetch or default_overfetch(factory), {**info, "params": current_params(raw)})
    rec = {"source": "built" if spec != "workspace" else "workspace"}
    if cfg.fixed_params():
        backend.set_params(cfg.fixed_params())
    elif cfg.target_recall is not None and prep.need_ranked:
        rec["tuning"] = tune_backend(prep, cfg, backend).to_dict()
    return backend, {**backend.describe(), **rec}


def tune_backend(prep: Prepared, cfg: MineConfig, backend) -> "Tuning":
    """Tune an approximate back-end to ``cfg.target_recall`` on a seeded sample of the composed
    queries: at the depth every batch is searched at (the reserve short queries are mined from, so
    the negatives of queries whose target ranks deep are found as reliably), then, when deepening
    can search further and a deeper search costs about the same (full vectors: the later batches
    may be searched that deep at once), at the deepest depth (``max_candidates``) too. Other
    back-ends (compressed codes, HNSW) keep the tuned value-to-depth ratio for deeper searches."""
    depth = reserve_depth(prep, cfg, backend)
    deepest = min(len(prep.g), cfg.max_candidates) if cfg.max_candidates else depth
    sample = sample_rows(prep.m, cfg.tune_queries, cfg.seed, 1)
    xq = prep.qs.emb[sample]
    _, exact_I = ExactSearch(prep.pool.xb, blocked=True).search(xq, max(depth, deepest))
    tuning = tune(backend, exact_I[:, :depth], xq, depth, cfg.target_recall)
    if deepest > depth and getattr(backend, "cheap_depth", False):
        tuning.deep = tune_deep(backend, exact_I, xq, deepest, cfg.target_recall)
    return tuning


def search_batches(backend, xq: np.ndarray, batches, prefetch: bool):
    """Step 3 (search): yield (q, D, I, seconds) per item (q, depth) of ``batches`` (an iterable of
    query indices and search depths, read one item ahead at most). With ``prefetch`` the next batch
    is searched in a worker thread while the caller guards the current one (FAISS releases the GIL;
    on a GPU the device is not left idle)."""
    def run(item):
        q, depth = item
        t = time.perf_counter()
        D, I = backend.search(xq[q], depth)
        return q, D, I, time.perf_counter() - t

    it = iter(batches)
    if not prefetch:
        for item in it:
            yield run(item)
        return
    from concurrent.futures import ThreadPoolExecutor

    first = next(it, None)
    if first is None:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cir-mine-search") as pool:
        fut = pool.submit(run, first)
        for nxt in it:
            res = fut.result()
            fut = pool.submit(run, nxt)
            yield res
        yield fut.result()


def guard(ctx: BatchContext, D: np.ndarray, I: np.ndarray) -> None:
    """Step 4 (guard): the ranked candidates of the batch, exact scores, every guard applied."""
    ranks = np.broadcast_to(np.arange(I.shape[1], dtype=np.int32), I.shape)
    ctx.ranked = ctx.candidates(I, D, ranks, distinct=True)


def select_parts(ctx: BatchContext, prep: Prepared) -> tuple[dict, np.ndarray]:
    """Step 5 (select): each mined part picks its k from what the earlier parts left.
    -> (rows per column, int64[b] negatives per query)."""
    res = {c: [] for c in COLUMNS}
    got = np.zeros(ctx.b, np.int64)
    for i, (name, ki, si) in enumerate(prep.mined):
        p = REGISTRY[name].fn(ctx, ki, si + 1, ctx.cfg.params_of(name))
        if i < len(prep.mined) - 1:         # the later parts pick from what this one left
            ctx.take(p)
        ok = p.rows >= 0
        qi, col = np.nonzero(ok)
        res["q"].append(ctx.q[qi])
        res["row"].append(p.rows[qi, col])
        res["part"].append(np.full(qi.size, si, np.int8))
        res["rank"].append(p.ranks[qi, col])
        res["score"].append(p.scores[qi, col])
        got += ok.sum(1)
    return res, got


COLUMNS = ("q", "row", "part", "rank", "score")


def depth_ladder(prep: Prepared, cfg: MineConfig) -> list:
    """The depths a query is mined at, in order: the first-pass depth, then 4x deeper each time up
    to ``max_candidates`` (the gallery at most). A query short of k at one depth is mined again at
    the next; its rows are those of the first depth that fills it (or of the deepest)."""
    ladder = [prep.depth]
    top = min(len(prep.g), cfg.max_candidates) if cfg.max_candidates else prep.depth
    while ladder[-1] < top:
        ladder.append(min(top, ladder[-1] * 4))
    return ladder


def reserve_depth(prep: Prepared, cfg: MineConfig, backend) -> int:
    """Depth the first batch is searched at: the ladder's second depth when a deeper search costs
    about the same (``backend.cheap_depth``), so short queries are mined again from it with no
    second search; else the mining depth."""
    ladder = depth_ladder(prep, cfg)
    return ladder[min(1, len(ladder) - 1)] if getattr(backend, "cheap_depth", False) else ladder[0]


PROBE_FRACTION = 4   # the first batch, whose short share picks the later batches' depth, is this much smaller


def mine_queries(prep: Prepared, cfg: MineConfig, backend, queries: np.ndarray, prefetch: bool = False,
                 progress: Optional[Callable[[int], None]] = None) -> Mined:
    """Steps 3-5 for the query indices ``queries``: search in batches, guard, select at each depth
    of the ladder a query still needs (see ``depth_ladder``), from the rows its batch was searched
    to; then search the queries still short again, deeper (see ``deepen``). Rows depend on the
    inputs, config and seed only, never on the batch size, on how deep a batch was searched, or on
    which other queries are mined."""
    m = prep.m
    got = np.zeros(m, np.int64)
    level = np.zeros(m, np.int64)                 # ladder index each query was last mined at
    counts = {name: np.zeros(m, np.int64) for name in GUARDS}
    timing = {"search": 0.0, "select": 0.0}
    ladder = depth_ladder(prep, cfg)
    state = {"reserved": 0, "reserve": ladder.index(reserve_depth(prep, cfg, backend))}
    share = getattr(backend, "deep_share", None)

    def mine_levels(q: np.ndarray, D, I, start: int) -> dict:
        """Mine ``q`` at ladder index ``start``, then its short queries at each deeper index the
        searched rows (D.shape[1]) reach."""
        res = mine_batch(q, D, I, ladder[start] if D is not None else 0)
        level[q] = start
        if D is None:
            return res
        for j in range(start + 1, len(ladder)):
            if ladder[j] > D.shape[1]:
                break
            short = got[q] < prep.k_mined
            if not short.any():
                break
            sq = q[short]
            keep = {c: [v[~np.isin(qq, sq)] for v, qq in zip(vals, res["q"])] for c, vals in res.items()}
            again = mine_batch(sq, D[short], I[short], ladder[j])
            res = {c: keep[c] + again[c] for c in COLUMNS}
            level[sq] = j
            state["reserved"] += int(sq.size)
        return res

    def run(items, first_pass: bool, start: int) -> list:
        """Search each (queries, depth) item, then mine its queries from ladder index ``start``."""
        done = []
        if prep.need_ranked:
            stream = search_batches(backend, prep.qs.emb, items, prefetch)
        else:
            stream = ((q, None, None, 0.0) for q, _ in items)
        for q, D, I, secs in stream:
            t = time.perf_counter()
            res = mine_levels(q, D, I, start)
            done.append(res)
            release_pages(prep.pool.xb)
            timing["search"] += secs
            timing["select"] += time.perf_counter() - t
            if first_pass and D is not None and share is not None and state["reserve"] < len(ladder) - 1:
                # most of this batch must be searched again: the later batches go to the deepest
                # depth at once (``backend.deep_share``; rows are the same either way)
                if np.mean(got[q] < prep.k_mined) > share:
                    state["reserve"] = len(ladder) - 1
            if first_pass and progress:
                progress(len(q))
        return done

    def mine_batch(q: np.ndarray, D, I, depth: int) -> dict:
        ctx = BatchContext(prep.pool, prep.qs, q, cfg, backend, depth, prep.clock)
        ctx.prepared = prep.prepared
        if D is not None:
            guard(ctx, D[:, :depth], I[:, :depth])
        res, got[q] = select_parts(ctx, prep)
        for name, c in ctx.counts.items():
            counts[name][q] = c
        return res

    def first_items():
        """First-pass batches, each searched at the current reserve, with the query count that
        keeps a batch's [queries, depth] matrices as large as at the ladder's second depth."""
        second, s = ladder[min(1, len(ladder) - 1)], 0
        probe = share is not None and state["reserve"] < len(ladder) - 1
        while s < queries.size:
            depth = ladder[state["reserve"]]
            step = max(1, cfg.query_batch * second // max(depth, second))
            if probe and s == 0:
                step = max(1, step // PROBE_FRACTION)   # a smaller first batch decides where the rest goes
            yield queries[s:s + step], depth
            s += step

    batches = run(first_items(), True, 0)
    t = time.perf_counter()
    batches, deepened = deepen(prep, cfg, backend, batches, got, level, queries, ladder, run)
    depth = ladder[int(level[queries].max())] if queries.size else prep.depth   # the deepest depth mined
    return Mined({c: [v for b in batches for v in b[c]] for c in COLUMNS}, got, counts, depth,
                 deepened + state["reserved"], timing["search"], timing["select"], time.perf_counter() - t)


def deepen(prep: Prepared, cfg: MineConfig, backend, batches: list, got: np.ndarray, level: np.ndarray,
           queries: np.ndarray, ladder: list, run) -> tuple:
    """Adaptive depth: queries still short after the rows their batch was searched to (typically
    those whose target ranks deep, so that the positive-aware cap removes every candidate above
    it) are searched again and mined at the next depths of the ladder. Their earlier rows are
    replaced; other queries are untouched. A back-end whose deeper searches cost about the same
    (``cheap_depth``) is searched at the deepest depth once, and the depths in between are mined
    from it; others are searched one depth at a time. -> (batches, queries searched again)."""
    deepened = 0
    mine = np.zeros(prep.m, bool)
    mine[queries] = True
    cheap = getattr(backend, "cheap_depth", False)
    while prep.need_ranked:
        short = np.flatnonzero(mine & (got < prep.k_mined) & (level < len(ladder) - 1))
        if short.size == 0:
            break
        nxt = int(level[short].min()) + 1             # the shallowest level still to mine
        short = short[level[short] == nxt - 1]
        depth = ladder[-1] if cheap else ladder[nxt]
        redo = np.zeros(prep.m, bool)
        redo[short] = True
        batches = [{c: [v[~redo[b["q"][i]]] for i, v in enumerate(vals)] for c, vals in b.items()} for b in batches]
        step = max(1, cfg.query_batch * ladder[0] // depth)   # same memory per batch as the first pass
        items = [(short[s:s + step], depth) for s in range(0, short.size, step)]
        batches += run(items, False, nxt)
        deepened += int(short.size)
    return batches, deepened


def check_recall(prep: Prepared, cfg: MineConfig, backend, mined: Mined) -> dict:
    """The recall report: on ``cfg.check_recall`` sampled queries, candidate recall@depth of the
    back-end against exact search, and the share of each query's mined negatives that exact
    mining (same config, seed and queries) also picks."""
    t0 = time.perf_counter()
    sample = sample_rows(prep.m, cfg.check_recall, cfg.seed, 2)
    exact = ExactSearch(prep.pool.xb, blocked=True)
    xq = prep.qs.emb[sample]
    rec = {"queries": int(sample.size), "depth": prep.depth}
    if prep.need_ranked:
        _, Ie = exact.search(xq, prep.depth)
        _, Ia = backend.search(xq, prep.depth)
        rec["candidate_recall"] = round(candidate_recall(Ia, Ie), 4)
    ref = mine_queries(prep, cfg, exact, sample)
    n = len(prep.g)
    keys = lambda md: np.unique(np.concatenate(md.out["q"]) * n + np.concatenate(md.out["row"])) \
        if md.out["q"] else np.zeros(0, np.int64)
    ka, ke = keys(mined), keys(ref)
    ka = ka[np.isin(ka // n, sample)]
    per_q_e = np.bincount(ke // n, minlength=prep.m)[sample]
    common = np.bincount(np.intersect1d(ka, ke, assume_unique=True) // n, minlength=prep.m)[sample]
    rec["negative_overlap"] = round(float(common.sum() / max(per_q_e.sum(), 1)), 4)
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def mine_negatives(ws: Workspace, split: str, cfg: MineConfig, query_emb: Optional[np.ndarray] = None,
                   mining_round: int = 0, index=None, progress: Optional[Callable[[int], None]] = None,
                   loaded: Optional[tuple] = None) -> MineResult:
    """Mine negatives for every query of ``split``: prepare, open the search back-end, then per batch
    search (approximate back-ends re-ranked exactly), guard and select; deepen short queries;
    assemble the table and its footer.

    query_emb: float32[m, d] normalized query embeddings (a trained model's, from cir-train's
    refresh); None with ``cfg.query == 'zero-shot'`` uses normalize(ref + w * text).
    index: a search back-end (see cir_mine.miner.core.search.backends) or a FAISS inner-product index over the
    gallery rows, or a factory of one (``cir_mine.miner.accel.device_search``: exact search on the
    GPU the device rule picks); default: the one ``cfg.index`` names (exact flat unless told).
    progress: called with the number of queries finished in each batch.
    loaded: ``ws.load(split)`` already in memory (cir-train's refresh mines the same split every
    round), so the gallery and triplets are not read again."""
    t0 = time.perf_counter()
    prep = prepare(ws, split, cfg, query_emb, mining_round, loaded)
    backend, search_meta = (open_search(prep, ws, split, cfg, index) if prep.need_ranked
                            else (None, {"index": "none"}))
    prep.prepared = {name: REGISTRY[name].prepare(prep.pool, prep.qs, backend, cfg, ki)
                     for name, ki, _ in prep.mined if REGISTRY[name].prepare is not None}
    t_prep = time.perf_counter() - t0
    prefetch = cfg.prefetch if cfg.prefetch is not None else bool(search_meta.get("gpu"))
    before = _measured(backend)
    t1 = time.perf_counter()
    mined = mine_queries(prep, cfg, backend, np.arange(prep.m, dtype=np.int64), prefetch, progress)
    t_mine = time.perf_counter() - t1
    after = _measured(backend)
    if cfg.check_recall and backend is not None:
        search_meta["check"] = check_recall(prep, cfg, backend, mined)
    search_meta["prefetch"] = bool(prefetch)
    t2 = time.perf_counter()
    table = _assemble(prep.pool, prep.qs, prep.parts, mined.out, mining_round, cfg.seed)
    timing = stage_seconds(prep, mined, before.get("seconds", {}), after.get("seconds", {}), t_prep, t_mine,
                           time.perf_counter() - t2)
    timing["total_s"] = _seconds(time.perf_counter() - t0)
    if after.get("kernels"):
        timing["kernels"] = after["kernels"]      # the kernel race: microseconds per query of each kernel
    meta = footer(ws, split, cfg, prep, mined, table, mining_round, query_emb is None, search_meta, timing)
    log.info("mined %d rows for %d queries (shortfall %d)", table.num_rows, prep.m, meta["shortfall"]["count"])
    return MineResult(table, meta, mined.guard_counts, backend)


def _measured(backend) -> dict:
    """A back-end's kernel race and seconds per stage so far ({} for one that does not measure)."""
    return backend.measured() if hasattr(backend, "measured") else {}


def stage_seconds(prep: Prepared, mined: Mined, before: dict, after: dict, t_prep: float, t_mine: float,
                  t_table: float) -> dict:
    """Seconds per stage of a run (the footer's ``timing``; ``cir-mine negatives -v`` prints them):
    read (the workspace), prepare (queries, pools, the back-end), search (candidate kernels), rerank
    (exact scores and cuts), guards, select (the strategies and the rest of the mining loop), table
    (assembling the rows); deepen is the part of search to table spent on queries searched again.
    With prefetch the search overlaps the other stages, so they add up to more than the wall time."""
    spent = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in ("search", "rerank")}
    search = spent["search"] if after else mined.search_s
    guards = prep.clock.snapshot().get("guards", 0.0)
    read = prep.clock.snapshot().get("read", 0.0)
    select = max(0.0, t_mine - search - spent["rerank"] - guards)
    return {"read_s": _seconds(read), "prepare_s": _seconds(t_prep - read), "search_s": _seconds(search),
            "rerank_s": _seconds(spent["rerank"]), "guards_s": _seconds(guards), "select_s": _seconds(select),
            "deepen_s": _seconds(mined.deepen_s), "table_s": _seconds(t_table)}


def footer(ws: Workspace, split: str, cfg: MineConfig, prep: Prepared, mined: Mined, table: pa.Table,
           mining_round: int, zero_shot: bool, search_meta: dict, timing: dict) -> dict:
    """Step 6 (assemble): the table's footer metadata."""
    parts, ks, k_mined = prep.parts, prep.ks, prep.k_mined
    part_rows = np.bincount(np.concatenate(mined.out["part"]).astype(np.int64) if mined.out["part"]
                            else np.zeros(0, np.int64), minlength=len(parts))
    short = np.flatnonzero(mined.got < k_mined)
    missing = int((k_mined - mined.got[short]).sum())
    bank = "in-batch" if k_mined == 0 else ("mined+in-batch" if any(n == "in-batch" for n, _ in parts) else "mined")
    return {
        "config": cfg.to_dict(), "manifest_hash": ws.manifest_hash(), "workspace": str(ws.root), "split": split,
        "data_hash": ws.split_hash(split),
        "round": int(mining_round), "bank": bank, "query_source": "zero-shot" if zero_shot else "provided",
        "parts": [{"strategy": n, "share": w, "k": ki, "rows": int(part_rows[si])}
                  for si, ((n, w), ki) in enumerate(zip(parts, ks))],
        "schedule": parse_schedule(cfg.schedule) if cfg.schedule else None,
        "prepared": prep.prepared,
        "k": cfg.k, "k_mined": k_mined, "depth": mined.depth if prep.need_ranked else 0,
        "deepened_queries": mined.deepened, "n_queries": prep.m, "n_gallery": len(prep.g), "n_rows": table.num_rows,
        "shortfall": {"count": int(short.size),
                      "query_ids": [str(x) for x in prep.qs.ids.take(pa.array(short)).to_pylist()],
                      "missing": missing,
                      "hints": shortfall_hints({g: int(c[short].sum()) for g, c in mined.guard_counts.items()},
                                               missing, cfg.guards,
                                               [f"{n}: {REGISTRY[n].hint}" for n, _, _ in prep.mined if REGISTRY[n].hint])},
        "guards_per_query": {str(prep.qs.ids[int(i)]): {g: int(c[i]) for g, c in mined.guard_counts.items()}
                             for i in short[:MAX_GUARDS_PER_QUERY]},
        "guards": {name: {"removed": int(c.sum()), "queries": int((c > 0).sum()), "max_per_query": int(c.max(initial=0))}
                   for name, c in mined.guard_counts.items()},
        "search": search_meta,
        "timing": timing,
        "versions": library_versions(),
    }


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
    ``reads`` (other inputs, e.g. a checkpoint), and an existing file only with ``overwrite``. An
    approximate index built for this run is saved beside the table (``{out}.faiss``, its
    fingerprint in the footer), so cir-train's refresh searches exactly the same index."""
    out = check_output(out, reads, overwrite)
    with DirLock(out.parent, f"cir-mine negatives -> {out.name}"):
        res = mine_negatives(ws, split, cfg, **kw)
        search = res.meta["search"]
        if search.get("source") == "built" and not search.get("exact", True):
            side = saved_index_path(out)
            save_backend_index(res.backend, side)
            search["file"], search["fingerprint"] = side.name, file_digest(side)
        t = time.perf_counter()
        write_negatives(res.table, out, res.meta)
        res.meta["timing"]["write_s"] = _seconds(time.perf_counter() - t)   # not in the file: it is being written
    return res
