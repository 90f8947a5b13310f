"""The exact kernel and the one rule for every cut.

Every score a table holds is :func:`gathered_dot`: FAISS's float32 dot product of one query and one
gallery row, whose bits depend on those two vectors alone, never on which other rows or queries are
scored with them. Candidate kernels (a BLAS GEMM, FAISS's flat or IVF search) compute the same
products in another summation order, so their scores may differ from the exact ones in the last
bits, and by how much depends on the batch's shape, the thread count and the BLAS kernel of the CPU.
:func:`exact_cut` therefore decides every cut on exact scores: it fetches a margin of candidates past
the cut, re-scores them exactly, and accepts a query's top-k only when the bound on the rounding of
any summation order (:func:`rounding_gap`) proves that no row left unfetched can reach it; the few
queries it cannot prove are fetched again, deeper. The result is the exact top-k of each query under
one order (score descending, ties by the lower row), whatever kernel fetched the candidates.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Callable

import numpy as np

from cir_mine.data.workspace import read_block, release_pages
from cir_mine.miner.core.search.faiss_api import FAISS_DEFAULT_BLOCK, load_faiss
from cir_mine.miner.core.search.measure import core_pool, usable_cores
from cir_mine.miner.core.search.topk import merge_topk, topk_desc

try:  # the compiled row windows (miner/core/search/_windows.c); without them a gather is one FAISS call
    from cir_mine.miner.core.search import _windows as WINDOWS
except ImportError:  # pragma: no cover - depends on the install
    WINDOWS = None

# Tuned settings (docs/search.md, "Tuned settings"): an in-memory gallery is scored one window at a
# time, of at least WINDOW_BYTES of rows and WINDOW_PER rows per query on average (a power of two),
# when that window holds at most WINDOW_MAX_BYTES and the windows' blocks at most WINDOW_PAD times the rows
WINDOW_BYTES = 2 << 20
WINDOW_MAX_BYTES = 8 << 20
WINDOW_PER = 8
WINDOW_PAD = 3
WINDOW_QUERIES = 2048  # queries scored window by window at a time, on one thread
WINDOW_MIN_QUERIES = 256  # queries a thread scores window by window at least


def gathered_dot(xb: np.ndarray, rows: np.ndarray, vec: np.ndarray, chunk: int = 256) -> np.ndarray:
    """s(xb[rows[i, j]], vec[i]): float32[b, depth]. ``rows``: int64[b, depth] (entries < 0 give -inf).

    A float32 gallery is scored in place by FAISS's ``fvec_inner_products_by_idx`` (no gathered copy;
    each score is one SIMD dot product whatever the batch, so any split of the rows gives the same
    bits), one window of its rows at a time where the rows are dense enough (:func:`window_shift`);
    a memory-mapped one in steps of at most 4k rows, its pages released after each. Other
    dtypes (float16 galleries) gather at most ``chunk`` queries' rows at a time and score in float32."""
    rows = np.asarray(rows)
    if _windowable(xb, rows) and np.asarray(vec).dtype == np.float32:
        return _dot_by_idx(xb, rows, vec)
    out = np.full(rows.shape, -np.inf, dtype=np.float32)
    safe = np.where(rows < 0, 0, rows)
    mapped = isinstance(xb, np.memmap)
    # <= 64k gathered rows at once; 4k from a memory-mapped gallery, where each gathered row maps
    # its page and the kernel's fault-around neighbours (up to 64 KiB) until the chunk is released
    chunk = max(1, min(chunk, (4_096 if mapped else 65_536) // max(1, rows.shape[1])))
    vec = np.asarray(vec, np.float32)  # float16 galleries are scored in float32
    for s in range(0, rows.shape[0], chunk):
        e = min(rows.shape[0], s + chunk)
        g = xb[safe[s:e]]  # [c, depth, d]
        out[s:e] = np.matmul(g, vec[s:e, :, None])[..., 0]
        if mapped:
            release_pages(xb)  # a memory-mapped gallery's RSS stays one chunk
    out[rows < 0] = -np.inf
    return out


def _windowable(xb: np.ndarray, rows: np.ndarray) -> bool:
    """A float32 gallery scored in place by FAISS (:func:`gathered_dot`)."""
    return xb.dtype == np.float32 and xb.ndim == 2 and xb.flags.c_contiguous and rows.ndim == 2


def _dot_by_idx(xb: np.ndarray, rows: np.ndarray, vec: np.ndarray) -> np.ndarray:
    return _dot_checked(load_faiss(), xb, *_checked(xb, rows, vec))


def _dot_checked(faiss, xb: np.ndarray, rows: np.ndarray, vec: np.ndarray, shift: int | None) -> np.ndarray:
    """gathered_dot of rows and vectors :func:`_checked` returned."""
    b, depth = rows.shape
    out = np.empty((b, depth), np.float32)
    if b == 0 or depth == 0:
        return out
    if shift is not None:
        _in_groups(faiss, b, lambda s, e: _dot_group(faiss, xb, rows[s:e], vec[s:e], shift, out[s:e]))
        return out
    mapped = isinstance(xb, np.memmap)
    step = max(1, 4_096 // depth) if mapped else b
    for s in range(0, b, step):
        e = min(b, s + step)
        _dot_one_call(faiss, xb, rows[s:e], vec[s:e], out[s:e])
        if mapped:
            release_pages(xb)  # a memory-mapped gallery's RSS stays one step
    return out


def _checked(xb: np.ndarray, rows: np.ndarray, vec: np.ndarray) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(rows int64, vec float32, both C-contiguous, window shift or None) for FAISS's gathered dot
    products of a float32 gallery ``xb``; ValueError / IndexError on shapes or rows that do not fit."""
    b, depth = rows.shape
    rows = np.ascontiguousarray(rows, np.int64)
    vec = np.ascontiguousarray(vec, np.float32)
    if vec.shape != (b, xb.shape[1]):
        raise ValueError(f"gathered_dot: {b} row lists need {b} vectors of dimension {xb.shape[1]}, got {vec.shape}.")
    if rows.size and int(rows.max()) >= xb.shape[0]:
        raise IndexError(f"gathered_dot: row {int(rows.max())} is out of range for {xb.shape[0]} gallery rows.")
    windowed = rows.size and WINDOWS is not None and not isinstance(xb, np.memmap)
    return rows, vec, window_shift(*xb.shape, b, np.count_nonzero(rows >= 0)) if windowed else None


def _dot_one_call(faiss, xb: np.ndarray, rows: np.ndarray, vec: np.ndarray, out: np.ndarray) -> None:
    """gathered_dot's scores into ``out`` from one FAISS call."""
    ptr = faiss.swig_ptr
    faiss.fvec_inner_products_by_idx(ptr(out), ptr(vec), ptr(xb), ptr(rows), xb.shape[1], *rows.shape)
    out[rows < 0] = -np.inf


def _in_groups(faiss, b: int, run: Callable[[int, int], None]) -> None:
    """``run(s, e)`` on groups of at most WINDOW_QUERIES of ``b`` queries: on one thread per core,
    each calling FAISS on one OpenMP thread (a window's call is short, and OpenMP's threads would
    wait at its end for the slower one, and spin, on a busy machine), or all on this thread where
    its FAISS calls already run on one (a selection thread)."""
    cores = usable_cores() if faiss.omp_get_max_threads() > 1 else 1
    groups = max(-(-b // WINDOW_QUERIES), min(cores, b // WINDOW_MIN_QUERIES), 1)
    cut = np.linspace(0, b, groups + 1).astype(np.int64).tolist()
    if cores == 1 or groups == 1:
        for s, e in zip(cut[:-1], cut[1:]):
            run(s, e)
        return

    def one_thread(s: int, e: int) -> None:
        faiss.omp_set_num_threads(1)  # this pool thread's own count (OpenMP's is per thread)
        run(s, e)

    list(core_pool("cir-mine-windows").map(one_thread, cut[:-1], cut[1:]))


def _dot_group(faiss, xb: np.ndarray, rows: np.ndarray, vec: np.ndarray, shift: int, out: np.ndarray) -> None:
    """gathered_dot's scores of one group of queries into ``out``: window by window, or in one call."""
    got = _dot_windowed(faiss, xb, rows, vec, shift)
    if got is None:
        _dot_one_call(faiss, xb, rows, vec, out)
    else:
        np.take(got[0], got[1].reshape(rows.shape), out=out)


def _top_group(faiss, xb, rows, vec, shift: int, k: int, D: np.ndarray, I: np.ndarray) -> None:
    """exact_rescore of one group of queries into (D, I): the window by window scores turned into
    topk's sort keys as they are read back, one in-place sort of each line, the first ``k`` keys
    back to (score, row); the same rows and bits as topk_desc of gathered_dot."""
    got = _dot_windowed(faiss, xb, rows, vec, shift)
    if got is None:
        scores = np.empty(rows.shape, np.float32)
        _dot_one_call(faiss, xb, rows, vec, scores)
        D[...], I[...] = topk_desc(scores, rows, k)
        return
    b, depth = rows.shape
    keys = _reused("keys", b * depth, np.uint64).reshape(b, depth)
    WINDOWS.keys(got[0], got[1], rows, b * depth, keys)
    keys.sort(axis=1)
    WINDOWS.unkey(keys, b, depth, k, D, I)


def window_shift(n: int, d: int, b: int, rows: int) -> int | None:
    """log2 of the gallery rows per window when ``rows`` rows (not pads) of ``b`` queries of an
    in-memory gallery of ``n`` x ``d`` are scored window by window (:func:`gathered_dot`), else
    None: without the compiled windows, for one window, or where a window holding WINDOW_PER of a
    query's rows would not stay in the cache."""
    if WINDOWS is None or rows <= 0:
        return None
    size = max(WINDOW_BYTES // (4 * max(1, d)), math.ceil(WINDOW_PER * n * b / rows), 1)  # gallery rows
    shift = int(size - 1).bit_length()  # the smallest power of two at least ``size``
    return shift if (n - 1) >> shift and (4 * d) << shift <= WINDOW_MAX_BYTES else None


def _dot_windowed(faiss, xb: np.ndarray, rows: np.ndarray, vec: np.ndarray, shift: int) -> tuple | None:
    """gathered_dot one window of 2^``shift`` gallery rows at a time: each query's rows of a window go
    to its line of the window's block (-1 pads) and FAISS scores the block against every query, so
    the gathered rows stay in the cache. -> (scores float32[blocks + 1], pos int64[b * depth]): the
    score of rows[i, j] is scores[pos[i * depth + j]] (-inf for a pad), in this thread's buffers.
    The same products, so the same bits. None (nothing scored) when the blocks would hold more
    than WINDOW_PAD times the rows (sparse or skewed rows)."""
    b, depth = rows.shape
    nw = ((xb.shape[0] - 1) >> shift) + 1
    widths = np.empty(nw, np.int64)
    valid = WINDOWS.count(rows, b, depth, shift, nw, widths)
    base = np.zeros(nw + 1, np.int64)
    np.cumsum(widths * b, out=base[1:])
    total = int(base[-1])
    if total > WINDOW_PAD * valid:
        return None
    ids, pos, scores = (
        _reused("ids", total, np.int64),
        _reused("pos", b * depth, np.int64),
        _reused("scores", total + 1, np.float32),
    )
    WINDOWS.place(rows, b, depth, shift, nw, base[:-1], widths, ids, pos)
    scores[total] = -np.inf  # where the pads' position -1 points
    ptr = faiss.swig_ptr
    for w in np.flatnonzero(widths).tolist():
        at = int(base[w])
        faiss.fvec_inner_products_by_idx(
            ptr(scores[at:]), ptr(vec), ptr(xb), ptr(ids[at:]), xb.shape[1], b, int(widths[w])
        )
    return scores, pos


_LOCAL = threading.local()


def _reused(name: str, n: int, dtype) -> np.ndarray:
    """This thread's buffer ``name`` of ``n`` items, kept for the next call: fresh pages cost more
    than the windows save (the scores of WINDOW_QUERIES queries at a time bound it)."""
    buf = getattr(_LOCAL, name, None)
    if buf is None or buf.size < n:
        buf = np.empty(n, dtype)
        setattr(_LOCAL, name, buf)
    return buf[:n]


def exact_rescore(xb: np.ndarray, xq: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact re-ranking: s(q, c) = xq · xb[c] in float32 for every candidate row of ``I`` (int64[b, L],
    -1 pads), sorted as :func:`topk_desc` sorts (descending, ties by the lower row) and cut to ``k``.
    Rows are gathered, so ``xb`` may be memory-mapped. Where gathered_dot scores window by window,
    each group of queries is cut as its scores are read back (:func:`_top_group`)."""
    xq = np.ascontiguousarray(xq, np.float32)
    I = np.asarray(I)
    if not _windowable(xb, I) or xb.shape[0] > 1 << 32:  # topk's keys hold 32 bits of a row
        return topk_desc(gathered_dot(xb, I, xq), I, k)
    faiss = load_faiss()
    rows, xq, shift = _checked(xb, I, xq)
    if shift is None or k > rows.shape[1]:
        return topk_desc(_dot_checked(faiss, xb, rows, xq, shift), rows, k)
    D, out_I = np.empty((len(rows), k), np.float32), np.empty((len(rows), k), np.int64)
    _in_groups(faiss, len(rows), lambda s, e: _top_group(faiss, xb, rows[s:e], xq[s:e], shift, k, D[s:e], out_I[s:e]))
    return D, out_I


UNIT_ROUNDOFF = 2.0**-24  # float32's unit roundoff u
# Tuned settings (docs/search.md, "Tuned settings"): candidates fetched past a cut of k are
# CUT_MARGIN + k // CUT_MARGIN_PER, REFETCH_GROWTH times more each time for the queries the bound cannot settle
CUT_MARGIN = 16
CUT_MARGIN_PER = 64
REFETCH_GROWTH = 4
FAISS_BLOCK_PER_DEPTH = 4  # FAISS's flat-search block: gallery rows per depth asked (at least FAISS's own)


def cut_depth(k: int) -> int:
    """How deep :func:`exact_cut` first fetches for a cut at ``k``: the cut and its margin."""
    return int(k) + CUT_MARGIN + int(k) // CUT_MARGIN_PER


def rounding_gap(d: int) -> float:
    """The largest difference between two float32 dot products of the same unit vectors in
    dimension ``d`` summed in any two orders: 2 γ_d with γ_d = d u / (1 - d u) (each is within
    γ_d ||q|| ||x|| of the real product, for any order, with or without fused multiply-adds)."""
    du = d * UNIT_ROUNDOFF
    return 2.0 * du / (1.0 - du)


def max_row_norm(x: np.ndarray, block_rows: int = 262_144) -> float:
    """An upper bound on the largest L2 norm of a row of ``x``, tight to a few units in the last
    place of float32 (read in blocks; a memory-mapped array's pages released).

    float32 and float16 rows are summed in float32, whose rounding leaves the squared norm within
    γ_(d+1) of the exact one (any order), so the computed maximum / (1 - γ_(d+1)) bounds it; other
    dtypes, and blocks whose float32 squares overflow, are summed in float64. At 1M x 256: 0.1 s
    against 1.4 s all in float64."""
    top_sq = 0.0
    d = x.shape[1] if x.ndim == 2 else 1
    g = (d + 1) * UNIT_ROUNDOFF / (1.0 - (d + 1) * UNIT_ROUNDOFF)
    for s in range(0, x.shape[0], block_rows):
        b = read_block(x, s, s + block_rows)
        if b.size:
            sq = float("inf")
            if b.dtype in (np.float32, np.float16):
                b32 = np.asarray(b, np.float32)
                sq = float(np.einsum("ij,ij->i", b32, b32).max()) / (1.0 - g)
            if not np.isfinite(sq):
                b64 = np.asarray(b, np.float64)
                sq = float(np.einsum("ij,ij->i", b64, b64).max())
            top_sq = max(top_sq, sq)
        release_pages(x)
    return float(np.sqrt(top_sq))


def exact_cut(
    xb: np.ndarray,
    xq: np.ndarray,
    k: int,
    fetch: Callable,
    total,
    row_norm: float = 1.0,
    extra_gap: float = 0.0,
    clock=None,
    margin: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-``k`` rows of each query among its candidates, by :func:`gathered_dot` score
    (descending, ties by the lower row; -1 / -inf pads when a query has fewer than ``k``).

    fetch(q int64[b] query positions, depth) -> (bound float64[b], rows int64[b, L]): for each
      query, candidate rows (-1 pads) holding every candidate whose approximate score exceeds
      ``bound`` (-inf when every candidate is returned); approximate scores are float32 dot
      products in any summation order (``extra_gap``: more, e.g. for float16 storage). Or
      (bound, D, I): those candidates already re-scored by :func:`exact_rescore` to ``k`` (the
      fetch then adds its own seconds to ``clock``), so that a kernel race times both.
    total: int or int64[nq], each query's number of candidates (the gallery, or the rows of its
      probed lists). row_norm: the largest norm of a gallery row. clock: a
      :class:`~cir_mine.miner.core.search.measure.Clock` given the seconds of fetching ("search")
      and of exact scoring ("rerank"). margin: rows fetched past the cut at first (default
      :func:`cut_depth`'s), then REFETCH_GROWTH times more for the queries not yet settled.
    -> (D float32[nq, k], I int64[nq, k])."""
    xq = np.ascontiguousarray(xq, np.float32)
    nq, d = xq.shape
    total = np.broadcast_to(np.asarray(total, np.int64), (nq,))
    D = np.full((nq, k), -np.inf, np.float32)
    I = np.full((nq, k), -1, np.int64)
    if nq == 0 or k == 0:
        return D, I
    qnorm = np.sqrt(np.einsum("ij,ij->i", xq, xq, dtype=np.float64))
    gap = (rounding_gap(d) + extra_gap) * qnorm * float(row_norm) * (1 + 1e-6) + 1e-30
    todo = np.arange(nq, dtype=np.int64)
    extra = cut_depth(k) - k if margin is None else max(1, int(margin))
    while todo.size:
        depth = int(max(1, min(int(total[todo].max()), k + extra)))
        t = time.perf_counter()
        got = fetch(todo, depth)
        t1 = time.perf_counter()
        if len(got) == 3:  # re-scored by the fetch, which timed its stages
            bound, Dq, Iq = got
        else:
            bound, rows = got
            Dq, Iq = exact_rescore(xb, xq[todo], np.asarray(rows, np.int64), k)
            if clock is not None:
                clock.add("search", t1 - t)
                clock.add("rerank", time.perf_counter() - t1)
        w = Dq.shape[1]
        kth = Dq[:, k - 1].astype(np.float64) if w >= k else np.full(todo.size, -np.inf)
        done = (total[todo] <= depth) | (np.asarray(bound, np.float64) == -np.inf) | (kth > bound + gap[todo])
        D[todo[done], :w], I[todo[done], :w] = Dq[done], Iq[done]
        todo = todo[~done]
        extra *= REFETCH_GROWTH
    return D, I


def flat_cut(
    flat, xb: np.ndarray, xq: np.ndarray, k: int, clock=None, margin: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-``k`` of each query among the rows of ``xb`` (:func:`exact_cut`'s order: exact
    score descending, ties by the lower row), candidates fetched by ``flat``, a FAISS flat
    inner-product index holding those rows in that order: a coarse quantizer's centroids, say
    (``margin``: :func:`exact_cut`'s). -> (D float32[nq, k], I int64[nq, k])."""
    xq = np.ascontiguousarray(xq, np.float32)

    def fetch(q, depth):
        D, I = flat.search(xq[q], depth)
        return fetched_bound(D, depth, len(xb)), I

    return exact_cut(xb, xq, k, fetch, len(xb), max_row_norm(xb), clock=clock, margin=margin)


def fetched_bound(D: np.ndarray, depth: int, total, ordered: bool = True) -> np.ndarray:
    """The bound :func:`exact_cut`'s ``fetch`` returns for a kernel's top-``depth`` approximate
    scores ``D`` (float32[b, depth], descending; ``ordered=False``: in any order): the last (the
    least) one, or -inf where every one of the query's ``total`` candidates came back."""
    b = D.shape[0]
    total = np.broadcast_to(np.asarray(total, np.int64), (b,))
    if D.shape[1] < depth or depth <= 0:
        last = np.full(b, -np.inf)
    else:
        last = (D[:, depth - 1] if ordered else D[:, :depth].min(axis=1)).astype(np.float64)
    return np.where(total > depth, np.where(np.isfinite(last), last, np.inf), -np.inf)


GEMM_SCORES = 1 << 24  # scores one exact-search GEMM step holds (64 MB of float32): rows per step = this / queries


def gemm_topk(
    xq: np.ndarray, xb: np.ndarray, k: int, block_rows: int = 262_144, release: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by inner product: one float32 GEMM per step of gallery rows (numpy's BLAS),
    each step's scores pushed into FAISS's per-query heaps (``float_minheap_array_t.addn``, no id
    matrix). Memory: one step's [queries, rows] scores plus one block of ``block_rows`` gallery rows
    (read from a memory-mapped ``xb`` and, with ``release``, its pages dropped after use)."""
    faiss = load_faiss()
    nq, n = len(xq), int(xb.shape[0])
    k = int(min(k, n))
    heap = faiss.ResultHeap(nq, k, keep_max=True)
    step = int(max(1024, min(block_rows, GEMM_SCORES // max(nq, 1))))
    xq = np.ascontiguousarray(xq, np.float32)
    scores = np.empty(
        nq * min(step, n), np.float32
    )  # one buffer for every step: fresh pages cost more than the GEMM writes
    for s in range(0, n, block_rows):
        block = read_block(xb, s, s + block_rows)
        for t in range(0, len(block), step):
            part = block[t : t + step]
            S = scores[: nq * len(part)].reshape(nq, len(part))
            np.matmul(xq, part.T, out=S)
            heap.heaps.addn(S.shape[1], faiss.swig_ptr(S), s + t, 0, nq)
        if release:
            release_pages(xb)
    heap.finalize()
    return heap.D, heap.I


def faiss_topk(
    xq: np.ndarray, xb: np.ndarray, k: int, block_rows: int = 262_144, release: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` by inner product with FAISS's flat search (its BLAS GEMM and per-query heaps, on
    FAISS's threads), block by block of ``block_rows`` gallery rows (a memory-mapped ``xb``'s pages
    released after each with ``release``), blocks merged. Same contract as :func:`gemm_topk`."""
    faiss = load_faiss()
    n = int(xb.shape[0])
    k = int(min(k, n))
    xq = np.ascontiguousarray(xq, np.float32)
    if faiss.cvar.distance_compute_blas_database_bs >= FAISS_DEFAULT_BLOCK:
        faiss.cvar.distance_compute_blas_database_bs = max(FAISS_DEFAULT_BLOCK, FAISS_BLOCK_PER_DEPTH * k)
    out = None
    for s in range(0, n, block_rows):
        block = np.ascontiguousarray(read_block(xb, s, s + block_rows), np.float32)
        D, I = faiss.knn(xq, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        I = np.where(I >= 0, I + s, -1)
        out = (D, I) if out is None else merge_topk([out, (D, I)], k)
        if release:
            release_pages(xb)
    return out
