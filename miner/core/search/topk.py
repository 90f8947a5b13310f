"""Top-k of candidate lists in one order everywhere: score descending, ties by the lower gallery row,
-1 pads (with -inf scores) last. ``(D float32[nq, k], I int64[nq, k])`` is FAISS's convention."""

from __future__ import annotations


import numpy as np

from cir_mine.miner.core.search.measure import core_pool, usable_cores

# Tuned setting (docs/search.md, "Tuned settings"): a top-k of at least this many scores is sorted in
# parts of its queries, one thread per core (numpy releases the GIL while it sorts)
PARALLEL_SCORES = 1 << 20
MIN_PART_ROWS = 256  # rows a part holds at least
# its own threads (core_pool "cir-mine-topk"), not the selection threads' (which run searches, and so
# sorts, themselves)


def _desc_bits(bits: np.ndarray) -> np.ndarray:
    """float32 bits -> uint32 whose ascending order is the floats' descending order (an involution)."""
    return bits ^ (((bits >> np.uint32(31)) ^ np.uint32(1)) * np.uint32(0x7FFFFFFF))


def topk_desc(D: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of (D, I) sorted by descending D (ties: lower row first), cut to ``k``; -1 rows last
    (returned as -1 / -inf).

    One vectorized sort of a 64-bit key per row (the score's bits mapped to a descending uint32,
    then the row), so ties need no second pass; rows of 2**32 and more take a two-key lexsort.
    -0.0 comes back as 0.0. Each row is sorted alone, so a large matrix (``PARALLEL_SCORES``) is
    sorted in parts of its rows, one thread per core."""
    D = np.asarray(D, np.float32)
    I = np.asarray(I, np.int64)
    parts = min(usable_cores(), D.shape[0] // MIN_PART_ROWS) if D.size >= PARALLEL_SCORES else 1
    if parts < 2:
        return _topk_desc(D, I, k)
    cut = np.linspace(0, D.shape[0], parts + 1).astype(np.int64)
    done = list(core_pool("cir-mine-topk").map(lambda a, b: _topk_desc(D[a:b], I[a:b], k), cut[:-1], cut[1:]))
    return np.concatenate([d for d, _ in done]), np.concatenate([i for _, i in done])


def _topk_desc(D: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
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


def merge_topk(results: list, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` of several (D, I) result lists of the same queries (shards, steps), exactly."""
    return topk_desc(np.concatenate([D for D, _ in results], 1), np.concatenate([I for _, I in results], 1), k)
