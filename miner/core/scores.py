"""Pure score functions: zero-shot queries, the Δ-score, windows and the sign-safe positive-aware cap.

Conventions: ``scores`` are cosine similarities s(q, c), float32[b, depth], higher is better;
``target_score`` is s(q, t), float32[b]. Δ(c) = s(q, t) − s(q, c): Δ > 0 means the candidate ranks
below the target (an easier negative), Δ < 0 above it (a hard negative or a false negative).
"""
from __future__ import annotations

import numpy as np

from cir_mine.data.workspace import l2_normalize
from cir_mine.miner.core.search import release_pages


def zero_shot_queries(ref_emb: np.ndarray, text_emb: np.ndarray, text_weight: float = 1.0) -> np.ndarray:
    """normalize(ref + w * text): float32[m, d] unit rows from two float32[m, d] unit-row arrays."""
    return l2_normalize(np.asarray(ref_emb, np.float32) + np.float32(text_weight) * np.asarray(text_emb, np.float32))


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
    from cir_mine.miner.core.search import _faiss

    faiss = _faiss()
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


def delta(target_score: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Δ = s(q, t) − s(q, c): float32[b] and float32[b, depth] -> float32[b, depth]."""
    return (target_score[:, None] - scores).astype(np.float32, copy=False)


def window_mask(values: np.ndarray, lo: float | None, hi: float | None,
                lo_inclusive: bool = True, hi_inclusive: bool = True) -> np.ndarray:
    """bool mask of ``lo <= values <= hi`` (bounds optional; inclusivity configurable)."""
    m = np.ones(values.shape, dtype=bool)
    if lo is not None:
        m &= values >= lo if lo_inclusive else values > lo
    if hi is not None:
        m &= values <= hi if hi_inclusive else values < hi
    return m


def rank_window_mask(ranks: np.ndarray, range_min: int, range_max: int | None) -> np.ndarray:
    """bool mask of ``range_min <= rank < range_max`` on int ranks (0-based)."""
    m = ranks >= range_min
    if range_max is not None:
        m &= ranks < range_max
    return m


def cap_threshold(target_score: np.ndarray, rho: float) -> np.ndarray:
    """The positive-aware cap, sign-safe: s(q, t) − (1 − ρ)·|s(q, t)|, float32[b].

    Equals ρ·s(q, t) when s(q, t) >= 0 (NV-Retriever's TopK-PercPos). When s(q, t) < 0, ρ·s(q, t)
    would lie *above* the positive and let through candidates scoring higher than the target;
    this form keeps the margin below the positive whatever the sign.
    """
    t = np.asarray(target_score, dtype=np.float32)
    return (t - np.float32(1.0 - rho) * np.abs(t)).astype(np.float32)


def cap_mask(scores: np.ndarray, target_score: np.ndarray, rho: float) -> np.ndarray:
    """True where s(q, c) > cap_threshold (candidates the ρ cap drops): bool[b, depth]."""
    return scores > cap_threshold(target_score, rho)[:, None]
