"""The exact kernel: the one float32 dot product every written score comes from (:func:`gathered_dot`),
exact re-ranking with it, and exact top-k over the whole gallery (:func:`gemm_topk`)."""
from __future__ import annotations

import numpy as np

from cir_mine.data.workspace import read_block, release_pages
from cir_mine.miner.core.search.faiss_api import load_faiss
from cir_mine.miner.core.search.topk import topk_desc


def row_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot product: float32[b, d] x float32[b, d] -> float32[b]."""
    return np.einsum("ij,ij->i", a, b).astype(np.float32, copy=False)


def gathered_dot(xb: np.ndarray, rows: np.ndarray, vec: np.ndarray, chunk: int = 256) -> np.ndarray:
    """s(xb[rows[i, j]], vec[i]): float32[b, depth]. ``rows``: int64[b, depth] (entries < 0 give -inf).

    A float32 gallery is scored in place by FAISS's ``fvec_inner_products_by_idx`` (no gathered copy;
    each score is one SIMD dot product whatever the batch, so any split of the rows gives the same
    bits); a memory-mapped one in steps of at most 4k rows, its pages released after each. Other
    dtypes (float16 galleries) gather at most ``chunk`` queries' rows at a time and score in float32."""
    rows = np.asarray(rows)
    if (xb.dtype == np.float32 and xb.ndim == 2 and xb.flags.c_contiguous and rows.ndim == 2
            and np.asarray(vec).dtype == np.float32):
        return _dot_by_idx(xb, rows, vec)
    out = np.full(rows.shape, -np.inf, dtype=np.float32)
    safe = np.where(rows < 0, 0, rows)
    mapped = isinstance(xb, np.memmap)
    # <= 64k gathered rows at once; 4k from a memory-mapped gallery, where each gathered row maps
    # its page and the kernel's fault-around neighbours (up to 64 KiB) until the chunk is released
    chunk = max(1, min(chunk, (4_096 if mapped else 65_536) // max(1, rows.shape[1])))
    vec = np.asarray(vec, np.float32)                       # float16 galleries are scored in float32
    for s in range(0, rows.shape[0], chunk):
        e = min(rows.shape[0], s + chunk)
        g = xb[safe[s:e]]                                   # [c, depth, d]
        out[s:e] = np.matmul(g, vec[s:e, :, None])[..., 0]
        if mapped:
            release_pages(xb)                               # a memory-mapped gallery's RSS stays one chunk
    out[rows < 0] = -np.inf
    return out


def _dot_by_idx(xb: np.ndarray, rows: np.ndarray, vec: np.ndarray) -> np.ndarray:
    faiss = load_faiss()
    b, depth = rows.shape
    rows = np.ascontiguousarray(rows, np.int64)
    vec = np.ascontiguousarray(vec, np.float32)
    if vec.shape != (b, xb.shape[1]):
        raise ValueError(f"gathered_dot: {b} row lists need {b} vectors of dimension {xb.shape[1]}, got {vec.shape}.")
    if rows.size and int(rows.max()) >= xb.shape[0]:
        raise IndexError(f"gathered_dot: row {int(rows.max())} is out of range for {xb.shape[0]} gallery rows.")
    out = np.empty((b, depth), np.float32)
    if b == 0 or depth == 0:
        return out
    mapped = isinstance(xb, np.memmap)
    step = max(1, 4_096 // depth) if mapped else b
    ptr = faiss.swig_ptr
    for s in range(0, b, step):
        e = min(b, s + step)
        faiss.fvec_inner_products_by_idx(ptr(out[s:e]), ptr(vec[s:e]), ptr(xb), ptr(rows[s:e]),
                                         xb.shape[1], e - s, depth)
        if mapped:
            release_pages(xb)                               # a memory-mapped gallery's RSS stays one step
    out[rows < 0] = -np.inf
    return out


def exact_rescore(xb: np.ndarray, xq: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact re-ranking: s(q, c) = xq · xb[c] in float32 for every candidate row of ``I`` (int64[b, L],
    -1 pads), sorted descending and cut to ``k``. Rows are gathered, so ``xb`` may be memory-mapped."""
    D = gathered_dot(xb, I, np.ascontiguousarray(xq, np.float32))
    return topk_desc(D, I, k)


GEMM_SCORES = 1 << 24   # scores one exact-search GEMM step holds (64 MB of float32): rows per step = this / queries


def gemm_topk(xq: np.ndarray, xb: np.ndarray, k: int, block_rows: int = 262_144,
              release: bool = False) -> tuple[np.ndarray, np.ndarray]:
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

