"""Search back-ends behind one interface, exact re-ranking, and measured recall.

The mining core asks one question of a back-end: *given query vectors and a depth, which gallery
rows are the candidates and what are their exact scores?* A back-end is any object with

  ``search(xq float32[b, d], k) -> (D float32[b, k], I int64[b, k])``  rows by descending score,
                                                                     -1 / -inf pads
  ``ntotal``, ``d``                                                   gallery rows, dimension
  ``exact``                                                           True when I is the exact top-k
  ``describe() -> dict``                                              what the table's footer records

Three live here: :class:`ExactSearch` (a flat inner-product index, or gallery blocks with merged
top-k when the embeddings are memory-mapped), :class:`Reranked` (any ``.search`` source, such as an
IVF, IVF-PQ or HNSW index or a sharded engine, over-fetched and re-scored with exact float32 dot
products against the gallery), and anything a caller passes that keeps the same contract. Tuning
(:func:`tune`) picks the cheapest search parameters that reach a candidate recall measured against
exact search on a sample of the composed queries.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from cir_mine.data.errors import DataError, UsageError
from cir_mine.miner.core.scores import gathered_dot
from cir_mine.miner.core.search import _faiss, build_index, factory_string, read_block, release_pages, use_gpu

log = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "workspace", "ivf", "ivfpq", "hnsw")
PARAM_NAMES = ("nprobe", "efSearch")
SEARCH_PARAM = {"ivf": "nprobe", "hnsw": "efSearch"}   # index kind -> the search parameter tuning sets


def _desc_bits(bits: np.ndarray) -> np.ndarray:
    """float32 bits -> uint32 whose ascending order is the floats' descending order (an involution)."""
    return bits ^ (((bits >> np.uint32(31)) ^ np.uint32(1)) * np.uint32(0x7FFFFFFF))


def topk_desc(D: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of (D, I) sorted by descending D (ties: lower row first), cut to ``k``; -1 rows last
    (returned as -1 / -inf).

    One vectorized sort of a 64-bit key per row (the score's bits mapped to a descending uint32,
    then the row), so ties need no second pass; rows of 2**32 and more take a two-key lexsort.
    -0.0 comes back as 0.0."""
    D = np.asarray(D, np.float32)
    I = np.asarray(I, np.int64)
    k = int(min(k, D.shape[1]))
    if I.size and int(I.max()) >= 1 << 32:
        key = np.where(I >= 0, -D, np.inf)
        order = np.lexsort((np.where(I >= 0, I, np.iinfo(np.int64).max), key), axis=1)[:, :k]
        Do, Io = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)
        return np.where(Io >= 0, Do, -np.inf).astype(np.float32), Io
    pad = np.iinfo(np.uint64).max
    key = _desc_bits((D + np.float32(0)).view(np.uint32)).astype(np.uint64)
    key <<= np.uint64(32)
    key |= I.astype(np.uint64) & np.uint64(0xFFFFFFFF)
    key[I < 0] = pad
    key = np.sort(key, axis=1)[:, :k]
    out_I = (key & np.uint64(0xFFFFFFFF)).astype(np.int64)
    out_D = _desc_bits((key >> np.uint64(32)).astype(np.uint32)).view(np.float32)
    gone = key == pad
    out_I[gone] = -1
    out_D[gone] = -np.inf
    return out_D, out_I


def merge_topk(D1, I1, D2, I2, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merged top-``k`` of two (D, I) result lists of the same queries."""
    return topk_desc(np.concatenate([D1, D2], 1), np.concatenate([I1, I2], 1), k)


def exact_rescore(xb: np.ndarray, xq: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact re-ranking: s(q, c) = xq · xb[c] in float32 for every candidate row of ``I`` (int64[b, L],
    -1 pads), sorted descending and cut to ``k``. Rows are gathered, so ``xb`` may be memory-mapped."""
    D = gathered_dot(xb, I, np.ascontiguousarray(xq, np.float32))
    return topk_desc(D, I, k)


def _fingerprint_index(index) -> str:
    faiss = _faiss()
    from cir_mine.miner.core.search import to_cpu

    return hashlib.sha256(faiss.serialize_index(to_cpu(index)).tobytes()).hexdigest()[:16]


GEMM_SCORES = 1 << 24   # scores one exact-search GEMM step holds (64 MB of float32): rows per step = this / queries


def gemm_topk(xq: np.ndarray, xb: np.ndarray, k: int, block_rows: int = 262_144,
              release: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by inner product: one float32 GEMM per step of gallery rows (numpy's BLAS),
    each step's scores pushed into FAISS's per-query heaps (``float_minheap_array_t.addn``, no id
    matrix). Memory: one step's [queries, rows] scores plus one block of ``block_rows`` gallery rows
    (read from a memory-mapped ``xb`` and, with ``release``, its pages dropped after use)."""
    faiss = _faiss()
    nq, n = len(xq), int(xb.shape[0])
    k = int(min(k, n))
    heap = faiss.ResultHeap(nq, k, keep_max=True)
    step = int(max(1024, min(block_rows, GEMM_SCORES // max(nq, 1))))
    xq = np.ascontiguousarray(xq, np.float32)
    scores = np.empty(nq * min(step, n), np.float32)   # one buffer for every step: fresh pages cost more than the GEMM writes
    for s in range(0, n, block_rows):
        block = read_block(xb, s, s + block_rows)
        for t in range(0, len(block), step):
            part = block[t:t + step]
            S = scores[:nq * len(part)].reshape(nq, len(part))
            np.matmul(xq, part.T, out=S)
            heap.heaps.addn(S.shape[1], faiss.swig_ptr(S), s + t, 0, nq)
        if release:
            release_pages(xb)
    heap.finalize()
    return heap.D, heap.I


def ivf_flat_lists(index):
    """The bare CPU ``IndexIVFFlat`` (inner product, array inverted lists) inside ``index``, whose
    lists :func:`list_major_search` can read as float32 blocks in place; None for any other index
    (PQ or SQ codes, a pre-transform, a GPU index, L2, on-disk lists)."""
    faiss = _faiss()
    if hasattr(index, "getDevice"):
        return None
    ivf = faiss.downcast_index(index)
    if type(ivf) is not faiss.IndexIVFFlat or ivf.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None
    if type(faiss.downcast_InvertedLists(ivf.invlists)) is not faiss.ArrayInvertedLists:
        return None
    return ivf


LIST_MAJOR_MIN_QUERIES_PER_LIST = 1.0   # list-major search pays once each probed list serves this many queries on average
LIST_MAJOR_SCORES = 1 << 25             # candidate scores one list-major pass holds (128 MB of float32)


@dataclass
class ListLayout:
    """Where an IVF-Flat index's vectors sit: list sizes, and every list's ids back to back."""

    sizes: np.ndarray          # int64[nlist] vectors per list
    starts: np.ndarray         # int64[nlist] offset of each list in ``ids``
    ids: np.ndarray            # int64[ntotal] gallery row of every vector, list by list
    scratch: dict = field(default_factory=dict)   # worker -> its reused score buffer (pages touched once)

    def buffer(self, n: int, worker: int = 0) -> np.ndarray:
        """A float32 buffer of ``n`` scores for ``worker``, reused from call to call (first-touching
        fresh pages costs more than the scatter into them)."""
        if self.scratch.get(worker, np.empty(0, np.float32)).size < n:
            self.scratch[worker] = np.empty(n, np.float32)
        return self.scratch[worker][:n]

    @classmethod
    def of(cls, ivf) -> "ListLayout":
        faiss = _faiss()
        invl = faiss.downcast_InvertedLists(ivf.invlists)
        sizes = np.array([invl.list_size(i) for i in range(ivf.nlist)], np.int64)
        starts = np.cumsum(sizes) - sizes
        ids = np.empty(int(sizes.sum()), np.int64)
        for i in np.flatnonzero(sizes).tolist():
            ids[starts[i]:starts[i] + sizes[i]] = faiss.rev_swig_ptr(invl.get_ids(i), int(sizes[i])).view(np.int64)
        return cls(sizes, starts, ids)


def _segment_top(buf: np.ndarray, base: np.ndarray, tot: np.ndarray, k: int, key_of) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest values of each segment ``buf[base[r]:base[r] + tot[r]]`` (a flat float32
    buffer of ragged rows), by descending value, ties broken by the smaller key (``key_of(rows
    int64[n], cols int64[n, c]) -> int64[n, c]``, the gallery row, -1 past the row's end), so the
    choice depends on the row's values alone, never on the other rows.
    -> (values float32[r, k], their keys int64[r, k]) by descending value; -inf / -1 past a row's end."""
    r = base.size
    part = np.full((r, k), -1, np.int64)
    kth = np.full(r, np.inf, np.float32)
    ties = []
    for i in np.flatnonzero(tot).tolist():
        n = int(tot[i])
        seg = buf[base[i]:base[i] + n]
        kk = min(k, n)
        p = np.argpartition(seg, n - kk)[n - kk:] if kk < n else np.arange(n)
        part[i, :kk] = p
        kth[i] = seg[p].min()
        if kk < n and np.count_nonzero(seg >= kth[i]) > kk:
            ties.append(i)
    # rows whose values equal to the k-th cross the cut: choose among those ties by key
    for i in ties:
        seg = buf[base[i]:base[i] + int(tot[i])]
        above = np.flatnonzero(seg > kth[i])
        at = np.flatnonzero(seg == kth[i])
        at_keys = key_of(np.array([i]), at[None, :])[0]
        part[i, :min(k, seg.size)] = np.r_[above, at[np.argsort(at_keys, kind="stable")][:k - above.size]]
    valid = part >= 0
    vals = np.where(valid, buf[np.where(valid, base[:, None] + part, 0)] if buf.size else -np.inf, -np.inf)
    keys = np.where(valid, key_of(np.arange(r), np.maximum(part, 0)), -1)
    return topk_desc(vals.astype(np.float32), keys, k)


def list_major_search(ivf, xq: np.ndarray, k: int, nprobe: int, layout: Optional[ListLayout] = None,
                      budget: int = LIST_MAJOR_SCORES) -> tuple[np.ndarray, np.ndarray]:
    """IVF-Flat search of a batch of queries list by list (the shape of FAISS contrib's big-batch
    search): the coarse quantizer picks each query's ``nprobe`` lists, the queries are bucketed by
    list, and each list's vectors (read in place) meet all the queries that probe it in one float32
    GEMM. Each query's scores are collected and its top ``k`` selected by partition. The candidates
    are exactly those a FAISS search with the same ``nprobe`` scans, but every list is read once
    per pass instead of once per query and no heap is kept, so a batch runs at BLAS speed instead of
    memory speed. Queries go in passes of at most ``budget`` collected scores. The scores are BLAS
    sums, equal to the float32 dot products up to rounding whose last bits can depend on the batch,
    so a caller that needs batch-independent rows re-ranks a few rows past its cut exactly.
    -> (D float32[nq, k], I int64[nq, k]) by descending score (ties: lower row first), -1 pads."""
    faiss = _faiss()
    xq = np.ascontiguousarray(xq, np.float32)
    nq, d = xq.shape
    nprobe = int(max(1, min(nprobe, ivf.nlist)))
    k = int(min(k, ivf.ntotal))
    layout = layout or ListLayout.of(ivf)
    D = np.full((nq, k), -np.inf, np.float32)
    I = np.full((nq, k), -1, np.int64)
    if nq == 0 or k == 0:
        return D, I
    _, assign = ivf.quantizer.search(xq, nprobe)
    cand = np.where(assign >= 0, layout.sizes[np.maximum(assign, 0)], 0)
    tot = cand.sum(1)
    ends = np.cumsum(tot)
    passes, q0 = [], 0
    while q0 < nq:                  # queries q0..q1-1, at least one, their scores within the budget
        q1 = max(q0 + 1, int(np.searchsorted(ends, (ends[q0 - 1] if q0 else 0) + budget, side="right")))
        passes.append((q0, q1))
        q0 = q1
    workers = max(1, min(len(passes), faiss.omp_get_max_threads()))
    invl = faiss.downcast_InvertedLists(ivf.invlists)

    def run(job):
        w, (q0, q1) = job
        A, C, T = assign[q0:q1], cand[q0:q1], tot[q0:q1]
        off = np.cumsum(C, 1) - C
        base = np.cumsum(T) - T
        buf = layout.buffer(int(T.sum()), w)
        flat = A.ravel()
        order = np.argsort(flat, kind="stable")
        lists = flat[order]
        bounds = np.flatnonzero(np.r_[True, lists[1:] != lists[:-1], True])
        dst = (base[:, None] + off).ravel()[order]     # each (query, probe) segment's start, list by list
        qsel = order // nprobe                          # its pass-local query
        xp = xq[q0:q1]
        within = np.arange(int(layout.sizes.max()))[:, None]   # row offsets inside a list
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            li = int(lists[a])
            size = int(layout.sizes[li]) if li >= 0 else 0
            if size == 0:
                continue
            X = faiss.rev_swig_ptr(invl.get_codes(li), size * d * 4).view(np.float32).reshape(size, d)
            # [size, m] = the list's rows against its queries: OpenBLAS packs the small query side
            # with less work in this orientation; column j goes to query j's segment
            buf[dst[a:b] + within[:size]] = X @ xp[qsel[a:b]].T

        ids, lstart = layout.ids, layout.starts

        def key_of(rows, cols):
            """Gallery row of collected position ``cols`` (int64[n, c]) of pass-local query ``rows``:
            its probe slot found among that query's own segment offsets (an empty slot shares the
            next one's offset, and ``side="right"`` passes it)."""
            out = np.empty(cols.shape, np.int64)
            for n, r in enumerate(rows.tolist()):
                c = cols[n]
                j = np.searchsorted(off[r], c, side="right") - 1
                out[n] = ids[lstart[np.maximum(A[r, j], 0)] + c - off[r, j]]
            return out

        D[q0:q1], I[q0:q1] = _segment_top(buf, base, T, k, key_of)

    # one BLAS thread per pass (its GEMMs are small; threads of BLAS would spin), passes on FAISS's
    # thread count of workers, each with its own score buffer
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        jobs = [(i % workers, p) for i, p in enumerate(passes)]
        if workers == 1:
            for job in jobs:
                run(job)
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cir-mine-lists") as pool:
                futures = [pool.submit(lambda lane=lane: [run(j) for j in jobs if j[0] == lane]) for lane in range(workers)]
                for f in futures:
                    f.result()
    return D, I


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
            faiss = _faiss()
            if not isinstance(faiss.downcast_index(self.source), faiss.IndexIVF):
                return None                           # a wrapped IVF (pre-transform, ...) keeps its nprobe
            value = min(value, faiss_nlist(self.source))
        return value

    def deep_params(self, fetch: int):
        """FAISS search parameters for :meth:`beam_for`'s value, or None."""
        value = self.beam_for(fetch)
        if value is None:
            return None
        faiss = _faiss()
        return faiss.SearchParametersHNSW(efSearch=value) if self.kind == "hnsw" else faiss.SearchParametersIVF(nprobe=value)

    def set_params(self, params: dict) -> None:
        set_search_params(self.source, params)
        self.info["params"] = dict(params)

    def describe(self) -> dict:
        return {"params": {}, **self.info, "exact": bool(self.exact), "overfetch": self.overfetch}


# ------------------------------------------------------------------------------------------------
# Search parameters


def parse_search_params(spec: Optional[str]) -> dict:
    """'nprobe=16,efSearch=64' -> {'nprobe': 16, 'efSearch': 64} (integers)."""
    out: dict = {}
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, eq, value = part.partition("=")
        try:
            out[name.strip()] = int(value)
        except ValueError:
            raise UsageError(f"search_params {spec!r}: use name=integer pairs separated by commas, "
                             f"e.g. nprobe=16 or efSearch=128.", params=("search_params",)) from None
        if not eq:
            raise UsageError(f"search_params {spec!r}: use name=integer pairs, e.g. nprobe=16.",
                             params=("search_params",))
    return out


def index_kind(index) -> str:
    """'ivf' | 'hnsw' | 'flat' | 'other' for a FAISS index (CPU or GPU)."""
    faiss = _faiss()
    if faiss.try_extract_index_ivf(index) is not None if hasattr(faiss, "try_extract_index_ivf") else False:
        return "ivf"
    name = type(faiss.downcast_index(index)).__name__ if hasattr(faiss, "downcast_index") else ""
    if "HNSW" in name:
        return "hnsw"
    if "Flat" in name:
        return "flat"
    return "other"


def set_search_params(index, params: dict) -> None:
    """Apply {'nprobe': n, 'efSearch': e} to a FAISS index (CPU or GPU); UsageError for names it lacks."""
    if not params:
        return
    faiss = _faiss()
    ps = faiss.GpuParameterSpace() if hasattr(index, "getDevice") and hasattr(faiss, "GpuParameterSpace") \
        else faiss.ParameterSpace()
    for name, value in params.items():
        try:
            ps.set_index_parameter(index, name, int(value))
        except RuntimeError:
            raise UsageError(f"search parameter {name}={value}: the index ({type(index).__name__}) has no "
                             f"parameter {name!r}; IVF indexes take nprobe, HNSW takes efSearch.") from None


def current_params(index) -> dict:
    """The tunable search parameter of ``index`` with its current value ({} for flat)."""
    faiss = _faiss()
    kind = index_kind(index)
    if kind == "ivf":
        return {"nprobe": int(faiss.extract_index_ivf(index).nprobe)}
    if kind == "hnsw":
        return {"efSearch": int(faiss.downcast_index(index).hnsw.efSearch)}
    return {}


def tunable(index) -> tuple[str, list]:
    """(parameter name, increasing values to try) for ``index``; ('', []) when nothing is tunable."""
    kind = index_kind(index)
    if kind == "ivf":
        nlist = faiss_nlist(index)
        top = min(nlist, 2048) if hasattr(index, "getDevice") else nlist     # GPU IVF: nprobe <= 2048
        vals = sorted({min(top, 2 ** i) for i in range(0, 31) if 2 ** (i - 1) < top})
        return "nprobe", vals
    if kind == "hnsw":
        return "efSearch", [2 ** i for i in range(4, 14)]
    return "", []


# ------------------------------------------------------------------------------------------------
# Recall


def candidate_recall(I_approx: np.ndarray, I_exact: np.ndarray) -> float:
    """Mean over queries of |approx ∩ exact| / |exact| for two int64[b, k] row lists (-1 ignored)."""
    hits, total = 0, 0
    for a, e in zip(I_approx, I_exact):
        e = e[e >= 0]
        hits += np.intersect1d(a[a >= 0], e, assume_unique=True).size
        total += e.size
    return float(hits / total) if total else 1.0


def sample_rows(m: int, n: int, seed: int, salt: int) -> np.ndarray:
    """A seeded sorted sample of ``min(n, m)`` of ``range(m)`` (a stream per ``salt``)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(salt)])
    return np.sort(rng.choice(m, size=min(int(n), m), replace=False)).astype(np.int64)


@dataclass
class Tuning:
    param: str                     # tuned parameter ('' when nothing was tunable)
    value: Optional[int]           # chosen value
    recall: float                  # candidate recall@depth at the chosen value
    target: float                  # the asked recall
    reached: bool                  # recall >= target
    depth: int                     # depth the recall was measured at
    queries: int                   # sampled queries
    tried: list = field(default_factory=list)   # [(value, recall, seconds)]
    seconds: float = 0.0
    overfetch: float = 1.0         # over-fetch the recall was reached with
    deep: Optional[dict] = None    # the deepest depth's tuning: {"depth", "value", "recall", "reached", "tried"}
    method: str = "search"         # how recall was measured: "search" (a search per value) or "lists" (probe_positions)

    def to_dict(self) -> dict:
        out = {"param": self.param, "value": self.value, "recall": round(self.recall, 4), "target": self.target,
               "reached": self.reached, "depth": self.depth, "queries": self.queries,
               "tried": [[v, round(r, 4), round(s, 3)] for v, r, s in self.tried], "seconds": round(self.seconds, 3),
               "overfetch": self.overfetch, "method": self.method}
        if self.deep is not None:
            out["deep"] = self.deep
        return out


# Recall gained by doubling nprobe / efSearch below which the search is limited by something else:
# for compressed codes, by how many candidates are re-ranked, so the over-fetch doubles instead.
PLATEAU = 0.005


def probe_positions(ivf, layout: ListLayout, xq: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each gallery row of ``rows`` (int64[b, L], -1 pads), the position of the list that holds
    it in query ``b``'s probe order (0: the list the coarse quantizer ranks first): a search probing
    ``nprobe`` lists scans that row iff its position is below ``nprobe``. -> int32[b, L], -1 for pads."""
    nlist = int(ivf.nlist)
    list_of = np.empty(int(ivf.ntotal), np.int32)
    list_of[layout.ids] = np.repeat(np.arange(nlist, dtype=np.int32), layout.sizes)
    out = np.full(rows.shape, -1, np.int32)
    xq = np.ascontiguousarray(xq, np.float32)
    for s in range(0, len(xq), 256):
        _, order = ivf.quantizer.search(xq[s:s + 256], nlist)       # every list, in probe order
        pos = np.full((len(order), nlist), nlist, np.int32)
        np.put_along_axis(pos, np.where(order >= 0, order, 0), np.arange(nlist, dtype=np.int32), 1)
        r = rows[s:s + 256]
        ok = r >= 0
        out[s:s + 256] = np.where(ok, np.take_along_axis(pos, list_of[np.where(ok, r, 0)].astype(np.int64), 1), -1)
    return out


def recall_by_nprobe(pos: np.ndarray, nlist: int) -> np.ndarray:
    """float64[nlist + 1]: candidate recall (pooled, as :func:`candidate_recall`) at every nprobe
    0..nlist, from :func:`probe_positions` of the exact rows."""
    p = pos[pos >= 0]
    if p.size == 0:
        return np.ones(nlist + 1)
    return np.r_[0.0, np.cumsum(np.bincount(p, minlength=nlist)[:nlist]) / p.size]


def cheapest_nprobe(curve: np.ndarray, target: float, low: int = 1) -> int:
    """The smallest nprobe >= ``low`` whose recall on ``curve`` reaches ``target`` (every list when none does)."""
    hit = np.flatnonzero(curve[low:] >= target)
    return int(low + hit[0]) if hit.size else len(curve) - 1


def by_lists(backend: "Reranked") -> bool:
    """Recall can be read off the lists (no search per value): a CPU IVF-Flat whose candidates are all
    re-ranked exactly, so a search returns every exact row its probed lists hold."""
    return backend.lists is not None and backend.overfetch == 1


def _lists_curve(backend: "Reranked", xq: np.ndarray, exact_I: np.ndarray) -> np.ndarray:
    """Recall at every nprobe of ``backend`` (see :func:`by_lists`) for queries ``xq`` whose exact rows are ``exact_I``."""
    return recall_by_nprobe(probe_positions(backend.lists, backend.layout_of(), xq, exact_I), backend.lists.nlist)


def _lists_tried(curve: np.ndarray, value: int) -> list:
    """The curve at the powers of two below ``value`` and at ``value``: [(nprobe, recall, 0.0)]."""
    points = [v for v in (2 ** i for i in range(31)) if v < value] + [value]
    return [(int(v), float(curve[v]), 0.0) for v in points]


DEEP_STEPS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)   # deep tuning: multiples of the tuned value tried


def tune_deep(backend: Reranked, exact_I: np.ndarray, xq: np.ndarray, depth: int, target: float) -> Optional[dict]:
    """After :func:`tune`: the cheapest multiple (DEEP_STEPS) of the tuned value whose candidate
    recall@``depth`` (the deepest depth deepening searches; ``exact_I`` that deep) reaches
    ``target``, recorded in ``backend.info["deep"]`` for :meth:`Reranked.beam_for`. Recall falls
    more slowly with depth than the value-to-depth ratio assumes, so this probes fewer lists than
    scaling would. A :func:`by_lists` back-end reads it off its lists instead: the smallest nprobe at
    or above the tuned one that reaches ``target``. None (nothing recorded) when the back-end has no
    tuned value."""
    name = SEARCH_PARAM.get(backend.kind)
    tuned = (backend.info.get("params") or {}).get(name)
    if not name or not tuned or hasattr(backend.source, "getDevice"):
        return None
    t0, tried = time.perf_counter(), []
    if name == "nprobe" and by_lists(backend):
        curve = _lists_curve(backend, xq, exact_I[:, :depth])
        v = cheapest_nprobe(curve, target, low=int(tuned))
        r, method = float(curve[v]), "lists"
        tried = [[a, round(c, 4), t] for a, c, t in _lists_tried(curve, v) if a >= tuned]
        backend.info["deep"] = {"depth": int(depth), "params": {name: int(v)}}
    else:
        top = faiss_nlist(backend.source) if name == "nprobe" else 1 << 14
        method = "search"
        for v in sorted({min(top, int(math.ceil(tuned * f))) for f in DEEP_STEPS}):
            ts = time.perf_counter()
            backend.info["deep"] = {"depth": int(depth), "params": {name: int(v)}}   # searched as mining will
            _, I = backend.search(xq, depth)
            r = candidate_recall(I, exact_I[:, :depth])
            tried.append([v, round(r, 4), round(time.perf_counter() - ts, 3)])
            if r >= target:
                break
    return {"depth": int(depth), "value": int(v), "recall": round(r, 4), "reached": bool(r >= target),
            "tried": tried, "seconds": round(time.perf_counter() - t0, 3), "method": method}


def faiss_nlist(index) -> int:
    """Inverted lists of the IVF index inside ``index`` (a wrapped or GPU one included)."""
    return int(_faiss().extract_index_ivf(index).nlist)


def tune(backend: Reranked, exact_I: np.ndarray, xq: np.ndarray, depth: int, target: float,
         max_overfetch: float = 32.0) -> Tuning:
    """Set the cheapest value of the index's search parameter whose candidate recall@``depth`` on the
    sample ``xq`` (exact rows ``exact_I``) reaches ``target``. For an index that stores compressed
    codes (over-fetch > 1), recall that stops rising with the parameter (less than PLATEAU per
    doubling), or falls short at its largest value, is limited by the code's ranking: the over-fetch
    doubles (up to ``max_overfetch``) at the same value before the parameter grows further. The
    largest tried when none reaches it. A CPU IVF-Flat re-ranked exactly (:func:`by_lists`) reads
    the recall at every nprobe off its lists instead of searching, and takes the smallest that
    reaches the target."""
    t0 = time.perf_counter()
    name, values = tunable(backend.source)
    if not name:
        _, I = backend.search(xq, depth)
        r = candidate_recall(I, exact_I)
        return Tuning("", None, r, target, r >= target, depth, len(xq), [], time.perf_counter() - t0)
    if name == "nprobe" and by_lists(backend):
        curve = _lists_curve(backend, xq, exact_I)
        v = cheapest_nprobe(curve, target)
        r, tried, method = float(curve[v]), _lists_tried(curve, v), "lists"
    else:
        v, r, tried = _tune_by_search(backend, name, values, exact_I, xq, depth, target, max_overfetch)
        method = "search"
    backend.set_params({name: v})
    backend.info["depth"] = int(depth)              # the depth this recall holds at (see Reranked.beam_for)
    if r < target:
        log.warning("search tuning: %s=%d reaches candidate recall %.3f < %.3f", name, v, r, target)
    return Tuning(name, v, r, target, r >= target, depth, len(xq), tried, time.perf_counter() - t0,
                  backend.overfetch, method=method)


def _tune_by_search(backend: Reranked, name: str, values: list, exact_I: np.ndarray, xq: np.ndarray, depth: int,
                    target: float, max_overfetch: float) -> tuple:
    """:func:`tune`'s search per value (doubling the over-fetch of compressed codes where recall
    stalls). -> (value, its recall, [(value, recall, seconds)] tried)."""
    tried = []
    i, prev = 0, None
    while True:
        v = values[i]
        set_search_params(backend.source, {name: v})
        ts = time.perf_counter()
        _, I = backend.search(xq, depth)
        r = candidate_recall(I, exact_I)
        tried.append((v, r, time.perf_counter() - ts))
        if r >= target:
            return v, r, tried
        last = i == len(values) - 1
        stalled = prev is not None and r - prev < PLATEAU
        if backend.overfetch > 1 and (stalled or last) and backend.overfetch * 2 <= max_overfetch:
            backend.overfetch *= 2                    # compressed codes: fetch more, re-rank exactly
            prev = None
            continue
        if last:
            return v, r, tried
        prev, i = r, i + 1


# ------------------------------------------------------------------------------------------------
# Opening a back-end by name


# Training of an IVF index's coarse quantizer: sampled points per list, k-means iterations.
TRAIN_PER_LIST = 64
KMEANS_ITERS = 10


def approximate_index(xb: np.ndarray, spec: str, device: str = "auto", fp16: bool = False, seed: int = 0):
    """Build an approximate index ('ivf' | 'ivfpq' | 'hnsw' | FAISS factory) over ``xb``: trained on a
    seeded sample of at most TRAIN_PER_LIST points per list (at least 65,536), rows added in blocks (``xb`` may be memory-mapped).
    HNSW stays on the CPU (FAISS has no GPU HNSW); flat and IVF follow the one GPU rule."""
    faiss = _faiss()
    n, d = xb.shape
    fs = factory_string(spec, n, d)
    try:
        index = faiss.index_factory(d, fs, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise UsageError(f"--index {spec!r}: FAISS cannot build {fs!r} ({str(e).splitlines()[0]}).") from None
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and hasattr(faiss.downcast_index(ivf), "do_polysemous_training"):
        faiss.downcast_index(ivf).do_polysemous_training = False
    if not index.is_trained:
        nlist = int(ivf.nlist) if ivf is not None else 1
        if ivf is not None:
            # k-means of the coarse quantizer on TRAIN_PER_LIST points per list (FAISS's default of
            # 256 costs about half an hour of CPU at 1M x 256 with 4000 lists; the lists only route
            # the search, whose recall is tuned and measured, and re-ranking is exact)
            ivf.cp.niter = KMEANS_ITERS
            ivf.cp.max_points_per_centroid = TRAIN_PER_LIST
        ntrain = min(n, max(TRAIN_PER_LIST * nlist, 65_536))
        rows = np.arange(n) if ntrain >= n else sample_rows(n, ntrain, seed, 7)
        try:
            index.train(np.ascontiguousarray(xb[rows], np.float32))
        except RuntimeError as e:
            raise UsageError(f"--index {spec!r}: FAISS cannot train {fs!r} on {n} vectors "
                             f"({str(e).splitlines()[0][:160]}). Use --index flat or a smaller factory string.") from None
        release_pages(xb)
    gpu = ivf is not None and "HNSW" not in fs and use_gpu(device)
    if gpu:
        co = faiss.GpuClonerOptions()
        co.useFloat16 = bool(fp16)
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index, co)
    step = 65_536
    for s in range(0, n, step):
        index.add(read_block(xb, s, s + step))
        release_pages(xb)
    log.info("FAISS index %s on %s (n=%d, d=%d)", fs, "GPU" if gpu else "CPU", n, d)
    return index, fs


def default_overfetch(factory: str) -> float:
    """Over-fetch for exact re-ranking: 1 when the index stores full vectors (its ranking is exact
    within the lists it visits), 4 for compressed codes (PQ, SQ), whose ranking is approximate."""
    return 4.0 if any(t in factory for t in ("PQ", "SQ", "LSH", "RaBitQ")) else 1.0


def check_backend(backend, n: int, d: int, what: str) -> None:
    if int(backend.ntotal) != n or int(backend.d) != d:
        raise DataError(f"{what}: the search back-end has d={backend.d} and {backend.ntotal} rows but the gallery "
                        f"has d={d} and {n} rows. Pass a back-end built over this gallery.")


# ------------------------------------------------------------------------------------------------
# The same back-end again (cir-train's refresh: every round searches like round 0)


def file_fingerprint(path) -> str:
    """First 16 hex digits of the SHA-256 of a file (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def saved_index_path(table_path) -> Path:
    p = Path(table_path)
    return p.with_name(p.name + ".faiss")


def save_backend_index(backend: Reranked, path) -> None:
    """Write the FAISS index behind ``backend`` to ``path`` atomically (CPU form)."""
    from cir_mine.data.io import atomic_path
    from cir_mine.miner.core.search import to_cpu

    with atomic_path(path) as tmp:
        _faiss().write_index(to_cpu(backend.source), str(tmp))


def reopen(search: dict, xb: np.ndarray, workspace_index, table_path, device: str = "auto", fp16: bool = False):
    """The back-end a negatives table was mined with, from its footer's ``search`` record: the exact
    search, or the very same index file (the workspace's ``index.{split}.faiss`` or the one saved
    beside the table), checked by fingerprint, with the recorded parameters and over-fetch. Nothing
    is re-tuned. ``workspace_index``: the workspace's index path; ``table_path``: the table's."""
    from pathlib import Path

    from cir_mine.miner.core.search import load_index

    if not search or search.get("exact", True) or search.get("index") in (None, "none", "flat"):
        return ExactSearch(xb, device=device, fp16=fp16)
    if search.get("index") == "workspace":
        path = Path(workspace_index)
        fix = "Re-mine round 0 with `cir-mine negatives`, or restore the index it was mined with"
    elif search.get("file"):
        path = Path(table_path).with_name(search["file"])
        fix = "Re-mine round 0 with `cir-mine negatives` (it saves the index beside the table)"
    else:
        raise DataError(f"{table_path}: mined through a {search.get('index')!r} index that was not saved, so later "
                        f"rounds cannot search the same one. Re-mine round 0 with `cir-mine negatives --out`.")
    if not path.exists():
        raise DataError(f"{path}: the index {table_path} was mined with is missing. {fix}.")
    now = file_fingerprint(path)
    if search.get("fingerprint") and now != search["fingerprint"]:
        raise DataError(f"{path}: changed since {table_path} was mined (fingerprint {search['fingerprint']}, "
                        f"now {now}). {fix}.")
    raw = load_index(path, device if index_kind_of_file(search) != "hnsw" else "cpu")
    backend = Reranked(raw, xb, float(search.get("overfetch", 1.0)),
                       {k: search[k] for k in ("index", "factory", "file", "fingerprint", "depth", "deep") if k in search})
    backend.set_params(dict(search.get("params") or {}))
    return backend


def index_kind_of_file(search: dict) -> str:
    return "hnsw" if "HNSW" in str(search.get("factory", "")) else "other"
