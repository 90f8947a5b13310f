"""Sharded search: one search back-end per gallery shard, exact scores per shard, exact top-k merge.

A gallery of n rows is cut into S contiguous row ranges (:func:`shard_bounds`). Each shard holds
its own rows and searches them. An exact shard uses the core's exact search
(:class:`~cir_mine.miner.core.search.backends.ExactSearch`, no index copy of the rows). An
approximate shard holds an IVF / IVF-PQ index whose coarse quantizer (and codebooks) were trained
once, on a seeded sample of the whole gallery, and copied to every shard before each shard adds its
own rows (FAISS's train-once, add-per-shard recipe); it is searched through
:class:`~cir_mine.miner.core.search.backends.Reranked`, which over-fetches candidates from at least
``nprobe`` lists (more for deeper searches) and re-scores them with exact float32 dot products
against the shard's embeddings. Every score a shard returns is exact.

:func:`~cir_mine.miner.core.search.topk.merge_topk` merges per-shard lists exactly, in the search
layer's one order (score descending, ties by the lower gallery row first), so that S exact shards
give the single-process (D, I). Everything here is numpy + faiss;
:mod:`cir_mine.miner.distributed.ray_shards` runs the same :class:`ShardSearcher` in actors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np

from cir_mine.data.crash import crash_point
from cir_mine.data.errors import UsageError
from cir_mine.miner.core.search.build import add_rows, build_index, factory_string
from cir_mine.miner.core.search.backends import ExactSearch, Reranked
from cir_mine.miner.core.search.faiss_api import load_faiss
from cir_mine.miner.core.search.topk import merge_topk

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardConfig:
    # fmt: off
    shards: int = 1                 # gallery shards, one index each, searched in parallel and merged exactly
    index: str = "flat"             # index per shard: flat (exact), ivf, ivfpq or a FAISS IVF factory string
                                    # (trained once, copied to every shard)
    nprobe: int = 32                # IVF shards: lists visited per query at least (more when the depth needs them)
    overfetch: int = 4              # IVF shards fetch overfetch * k candidates, then re-rank them exactly
    list_cover: float = 4.0         # IVF: the lists visited hold >= list_cover x the candidates asked (nprobe grows with depth)
    train_sample: int = 100_000     # rows sampled (seeded) from the whole gallery to train IVF / PQ once
    seed: int = 0                   # seed of the training sample
    # fmt: on

    def validate(self, n: int) -> "ShardConfig":
        if self.shards < 1:
            raise UsageError(f"shards must be at least 1 (got {self.shards}).", params=("shards",))
        if self.shards > n:
            raise UsageError(
                f"shards {self.shards} is more than the gallery's {n} rows; use at most {n}.", params=("shards",)
            )
        if self.nprobe < 1 or self.overfetch < 1 or self.train_sample < 1 or self.list_cover <= 0:
            raise UsageError(
                "shard_nprobe, the over-fetch factor and the training sample must be at least 1, "
                "the list cover above 0.",
                params=("shard_nprobe",),
            )
        return self

    @property
    def exact(self) -> bool:
        return self.index == "flat"

    def describe(self, n: int, d: int) -> dict:
        return {
            "shards": self.shards,
            "index": self.index,
            "factory": factory_string(self.index, n, d),
            "nprobe": None if self.exact else self.nprobe,
            "overfetch": None if self.exact else self.overfetch,
            "list_cover": None if self.exact else self.list_cover,
            "train_sample": None if self.exact else min(self.train_sample, n),
            "seed": self.seed,
        }


def shard_bounds(n: int, shards: int) -> np.ndarray:
    """int64[S + 1] row offsets of S contiguous shards of n rows (sizes differ by at most one)."""
    return (np.arange(shards + 1, dtype=np.int64) * n) // shards


def train_shard_index(xb: np.ndarray, cfg: ShardConfig) -> Optional[np.ndarray]:
    """The trained, empty IVF index that every shard copies, serialized (uint8[bytes]); None for flat.

    Trained on a seeded sample of at most ``cfg.train_sample`` rows of the whole gallery ``xb``
    (float32[n, d]), so every shard shares one set of centroids and codebooks."""
    if cfg.exact:
        return None
    faiss = load_faiss()
    n, d = xb.shape
    fs = factory_string(cfg.index, n, d)
    if faiss.try_extract_index_ivf(faiss.index_factory(d, fs, faiss.METRIC_INNER_PRODUCT)) is None:
        raise UsageError(
            f"shard_index {cfg.index!r}: sharded search needs flat or an IVF index (got {fs!r}).",
            params=("shard_index",),
        )
    index = build_index(xb, cfg.index, device="cpu", seed=cfg.seed, train_sample=cfg.train_sample, add=False)
    log.info("trained %s once on %d of %d rows for %d shards", fs, min(n, cfg.train_sample), n, cfg.shards)
    return faiss.serialize_index(index)


class ShardSearcher:
    """One shard: rows [offset, offset + n_s) of the gallery and a search back-end over them (the
    exact :class:`ExactSearch`, or the IVF index re-ranked exactly, :class:`Reranked`).

    xb: float32[n_s, d] unit rows. trained: :func:`train_shard_index`'s bytes (None: exact flat).
    shard: the shard's number; each search passes the crash point ``shard-search-{shard}``
    (cir_mine.data.crash)."""

    def __init__(
        self,
        xb: np.ndarray,
        offset: int,
        trained: Optional[np.ndarray] = None,
        nprobe: int = 32,
        overfetch: int = 4,
        list_cover: float = 4.0,
        shard: int = 0,
    ):
        faiss = load_faiss()
        self.xb = np.ascontiguousarray(xb, dtype=np.float32)
        self.offset, self.shard = int(offset), int(shard)
        self.nprobe, self.list_cover = int(nprobe), float(list_cover)
        self.exact = trained is None
        if self.exact:
            self.backend = ExactSearch(self.xb, device="cpu")
        else:
            index = faiss.deserialize_index(np.asarray(trained, dtype=np.uint8))
            add_rows(index, self.xb)
            self.ivf = faiss.extract_index_ivf(index)
            self.overfetch = int(overfetch)
            self.backend = Reranked(index, self.xb, float(overfetch), {"index": "shard"})

    def probes(self, fetch: int) -> int:
        """nprobe for ``fetch`` candidates: at least ``nprobe``, and enough lists (of the shard's
        average list size) to hold ``list_cover`` x ``fetch`` rows; at most every list."""
        nlist = int(self.ivf.nlist)
        per_list = max(1.0, self.ntotal / nlist)
        return int(min(nlist, max(self.nprobe, np.ceil(self.list_cover * fetch / per_list))))

    @property
    def ntotal(self) -> int:
        return int(self.xb.shape[0])

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(D float32[nq, k_s], I int64[nq, k_s] global rows, -1 pads), k_s = min(k, n_s), in merge order."""
        crash_point(f"shard-search-{self.shard}")
        k = int(min(k, self.ntotal))
        if self.exact:
            D, I = self.backend.search(xq, k)
        else:
            D, I = self.backend.search(xq, k, nprobe=self.probes(self.backend.fetch_depth(k)))
        return D, np.where(I >= 0, I + self.offset, -1)


class ShardedIndex:
    """S shard searchers in this process behind FAISS's interface (``d``, ``ntotal``, ``search(xq, k)``)
    plus ``describe()``: the local engine (``engine="local"`` with more than one shard or an IVF shard
    index). :class:`cir_mine.miner.distributed.ray_shards.RayShardedIndex` runs the same searchers as
    Ray actors."""

    def __init__(self, xb: np.ndarray, cfg: ShardConfig = ShardConfig()):
        n, self.d = xb.shape
        self.cfg = cfg.validate(n)
        self.bounds = shard_bounds(n, cfg.shards)
        trained = train_shard_index(xb, cfg)
        self.searchers = [
            ShardSearcher(xb[a:b], a, trained, cfg.nprobe, cfg.overfetch, cfg.list_cover, shard=s)
            for s, (a, b) in enumerate(zip(self.bounds[:-1], self.bounds[1:]))
        ]
        self.ntotal = int(n)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return merge_topk([s.search(xq, k) for s in self.searchers], k)

    def describe(self) -> dict:
        return {"engine": "local", **self.cfg.describe(self.ntotal, self.d)}
