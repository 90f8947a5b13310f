"""Search back-ends behind one interface.

A back-end is any object with

  ``search(xq float32[b, d], k) -> (D float32[b, k], I int64[b, k])``  rows by descending score,
                                                                     -1 / -inf pads
  ``ntotal``, ``d``                                                   gallery rows, dimension
  ``exact``                                                           True when I is the exact top-k
  ``describe() -> dict``                                              what the table's footer records

:class:`ExactSearch` (exact top-k over the gallery, in memory or memory-mapped) and :class:`Reranked`
(any ``.search`` source, such as an IVF, IVF-PQ or HNSW index or a sharded engine, over-fetched and
re-scored exactly) live here; anything a caller passes that keeps the contract works the same.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

from cir_mine.data.errors import DataError, UsageError
from cir_mine.data.workspace import release_pages
from cir_mine.miner.core.search.build import build_index, use_gpu
from cir_mine.miner.core.search.exact import exact_rescore, gemm_topk
from cir_mine.miner.core.search.faiss_api import load_faiss
from cir_mine.miner.core.search.lists import LIST_MAJOR_MIN_QUERIES_PER_LIST, ListLayout, ivf_flat_lists, list_major_search
from cir_mine.miner.core.search.params import SEARCH_PARAM, faiss_nlist, index_kind, set_search_params


class ExactSearch:
    """Exact top-k by inner product (``cheap_depth``: a search costs about the same at any depth, so
    the miner searches deeper than it mines and keeps the rest for short queries). On the CPU, a
    GEMM over blocks of gallery rows with FAISS's heaps (:func:`gemm_topk`), in memory or over a
    memory-mapped gallery (``blocked``: its pages released block by block, so memory is one block
    plus the results). On a GPU (the one GPU rule; fp16 storage optional), one flat FAISS index."""

    exact = True
    cheap_depth = True
    # a first-pass batch with more than this share of its queries short at the reserve depth sends
    # the later batches to the deepest depth at once: a GEMM costs the same at any depth and the
    # deeper heaps about 1.2x (1M x 256, depth 2048 against 800), so a second search of a quarter
    # of the queries costs more
    deep_share = 0.25

    def __init__(self, xb: np.ndarray, device: str = "auto", fp16: bool = False, block_rows: int = 262_144,
                 blocked: Optional[bool] = None):
        self.xb = xb
        self.ntotal, self.d = int(xb.shape[0]), int(xb.shape[1])
        self.block_rows = int(block_rows)
        self.blocked = isinstance(xb, np.memmap) if blocked is None else bool(blocked)
        self.gpu = not self.blocked and use_gpu(device)
        self.index = build_index(xb, "flat", device=device, fp16=fp16) if self.gpu else None

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k``; scores recomputed by :func:`exact_rescore`, the one float32 dot product
        every back-end writes, so exact and re-ranked approximate search agree to the bit."""
        xq = np.ascontiguousarray(xq, np.float32)
        k = int(min(k, self.ntotal))
        _, I = self._search(xq, k)
        return exact_rescore(self.xb, xq, I, k)

    def _search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.index is not None:
            return self.index.search(xq, k)
        return gemm_topk(xq, self.xb, k, self.block_rows, release=self.blocked)

    def describe(self) -> dict:
        return {"index": "flat", "factory": "Flat", "exact": True, "params": {}, "overfetch": 1.0,
                "gpu": bool(self.gpu), "blocked": bool(self.blocked)}


class Reranked:
    """Candidates from ``source`` (``.search(xq, k) -> (D, I)``, approximate), over-fetched to
    ``ceil(k * overfetch)`` and re-scored exactly against ``xb``: every returned score is the float32
    dot product, only which rows come back is approximate."""

    exact = False

    def __init__(self, source, xb: np.ndarray, overfetch: float = 1.0, info: Optional[dict] = None):
        if overfetch < 1:
            raise UsageError(f"overfetch must be at least 1 (got {overfetch}).", params=("overfetch",))
        self.source, self.xb, self.overfetch = source, xb, float(overfetch)
        self.ntotal, self.d = int(source.ntotal), int(source.d)
        self.info = dict(info or {})
        self.kind = index_kind(source) if hasattr(source, "is_trained") else "other"
        self.lists = ivf_flat_lists(source) if self.kind == "ivf" else None  # list-major search when it pays
        self.layout = None                                                 # its ListLayout, built on first use

    @property
    def cheap_depth(self) -> bool:
        """Deeper searches cost about the same (IVF lists with full vectors, flat): an HNSW search
        widens its beam with k and a PQ re-rank gathers k x over-fetch rows, so those are not."""
        return self.overfetch == 1 and self.kind in ("ivf", "flat")

    @property
    def deep_share(self) -> Optional[float]:
        """See ExactSearch.deep_share: list-major IVF searches the deepest depth (2048, its tuned
        nprobe) at about 1.5x the cost of the reserve's (800) at 1M x 256, so past a third of a
        batch searched again the deepest search at once is cheaper; None for other sources."""
        return 0.35 if self.lists is not None and self.cheap_depth else None

    def layout_of(self) -> "ListLayout":
        if self.layout is None:
            self.layout = ListLayout.of(self.lists)
        return self.layout

    def fetch_depth(self, k: int) -> int:
        return int(min(self.ntotal, math.ceil(k * self.overfetch)))

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        xq = np.ascontiguousarray(xq, np.float32)
        k = int(min(k, self.ntotal))
        kf = self.fetch_depth(k)
        deeper = self.deep_params(kf)
        probe = deeper.nprobe if deeper is not None and self.kind == "ivf" else (self.lists.nprobe if self.lists else 0)
        if self.lists is not None and len(xq) * probe >= LIST_MAJOR_MIN_QUERIES_PER_LIST * self.lists.nlist:
            # a few rows past the cut, so re-ranking decides it: list-major scores are BLAS sums whose
            # last bits depend on the batch, the exact ones do not
            _, I = list_major_search(self.lists, xq, min(self.ntotal, kf + 16 + kf // 64), probe, self.layout_of())
        elif deeper:
            _, I = self.source.search(xq, kf, params=deeper)
        else:
            _, I = self.source.search(xq, kf)
        D, I = exact_rescore(self.xb, xq, np.asarray(I, np.int64), k)
        release_pages(self.xb)
        if D.shape[1] < k:                                # the source returned fewer than k rows
            pad = k - D.shape[1]
            D = np.pad(D, ((0, 0), (0, pad)), constant_values=-np.inf)
            I = np.pad(I, ((0, 0), (0, pad)), constant_values=-1)
        return D, I

    def beam_for(self, fetch: int) -> Optional[int]:
        """The search parameter (efSearch or nprobe) for a search ``fetch`` rows deep, or None for
        the index's own setting.

        Recall was tuned at one depth (``info["depth"]``); deepening searches further. An HNSW beam
        of max(efSearch, k) would fall to k there, and an IVF search probing as few lists finds a
        smaller share of the deeper neighbours. When the tuning also measured the deepest depth
        (``info["deep"]``), the value follows the line through both tuned points; otherwise the
        tuned parameter-to-depth ratio is kept (IVF: at most every list). CPU indexes only: a GPU
        index keeps its setting."""
        tuned = self.info.get("depth")
        params = self.info.get("params") or {}
        name = SEARCH_PARAM.get(self.kind)
        if not tuned or not name or not params.get(name) or hasattr(self.source, "getDevice"):
            return None
        base = self.fetch_depth(int(tuned))
        if fetch <= base:
            return None
        deep = self.info.get("deep") or {}
        deep_value = (deep.get("params") or {}).get(name)
        deep_fetch = self.fetch_depth(int(deep.get("depth") or 0))
        if deep_value and deep_fetch > base:
            # tuned at two depths: between them, the line through both; past the deeper, its ratio
            if fetch <= deep_fetch:
                value = int(math.ceil(params[name] + (deep_value - params[name]) * (fetch - base) / (deep_fetch - base)))
            else:
                value = int(math.ceil(deep_value * fetch / deep_fetch))
        else:
            value = int(math.ceil(params[name] * fetch / base))
        if name == "nprobe":
            faiss = load_faiss()
            if not isinstance(faiss.downcast_index(self.source), faiss.IndexIVF):
                return None                           # a wrapped IVF (pre-transform, ...) keeps its nprobe
            value = min(value, faiss_nlist(self.source))
        return value

    def deep_params(self, fetch: int):
        """FAISS search parameters for :meth:`beam_for`'s value, or None."""
        value = self.beam_for(fetch)
        if value is None:
            return None
        faiss = load_faiss()
        return faiss.SearchParametersHNSW(efSearch=value) if self.kind == "hnsw" else faiss.SearchParametersIVF(nprobe=value)

    def set_params(self, params: dict) -> None:
        set_search_params(self.source, params)
        self.info["params"] = dict(params)

    def describe(self) -> dict:
        return {"params": {}, **self.info, "exact": bool(self.exact), "overfetch": self.overfetch}


def search_batched(index, xq: np.ndarray, k: int, batch_size: int = 4096,
                   progress: Optional[Callable[[int], None]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Search ``xq`` (float32[nq, d]) in batches: returns (D float32[nq, k], I int64[nq, k]).

    Memory beyond the outputs is one batch of distances; results equal one big search.
    """
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    nq = xq.shape[0]
    k = int(min(k, index.ntotal))
    D = np.empty((nq, k), dtype=np.float32)
    I = np.empty((nq, k), dtype=np.int64)
    for s in range(0, nq, batch_size):
        e = min(nq, s + batch_size)
        D[s:e], I[s:e] = index.search(xq[s:e], k)
        if progress:
            progress(e - s)
    return D, I


def check_backend(backend, n: int, d: int, what: str) -> None:
    if int(backend.ntotal) != n or int(backend.d) != d:
        raise DataError(f"{what}: the search back-end has d={backend.d} and {backend.ntotal} rows but the gallery "
                        f"has d={d} and {n} rows. Pass a back-end built over this gallery.")

