"""The survivors of the bfloat16 scan (:mod:`cir_mine.miner.accel.bf16`): the scores of each block at
or above each query's threshold, held as (query, key, row), and the selection of each query's rows
within its band from them. Keys are integers in the bfloat16 values' order (:func:`bf16_key`)."""

from __future__ import annotations

import numpy as np

HIST_LEVELS = 4096  # bfloat16 levels a query's histogram holds above its threshold (more: FAISS)


def bf16_key(bits: np.ndarray) -> np.ndarray:
    """int16 bfloat16 bit patterns -> int32 keys in the values' order (-0 and +0 alike)."""
    b = bits.astype(np.int32)
    return np.where(b >= 0, b, -(b & 0x7FFF))


def key_value(key: np.ndarray) -> np.ndarray:
    """bf16_key -> the float64 value."""
    key = np.asarray(key, np.int64)
    bits = np.where(key >= 0, key, 0x8000 | -key).astype(np.uint32) << np.uint32(16)
    return bits.view(np.float32).astype(np.float64)


def key_floor(t: np.ndarray) -> np.ndarray:
    """The key of the largest bfloat16 at most ``t`` (float64, finite): every bfloat16 v >= t has
    bf16_key(v) >= it."""
    t = np.asarray(t, np.float64)
    f = t.astype(np.float32)
    f = np.where(f.astype(np.float64) > t, np.nextafter(f, np.float32(-np.inf)), f)  # f <= t
    bits = f.view(np.uint32)
    hi = (bits >> np.uint32(16)).astype(np.int64)
    neg = (bits >> np.uint32(31)) == 1
    hi = np.where(neg & ((bits & np.uint32(0xFFFF)) != 0), hi + 1, hi)  # negatives round away from 0
    return np.where(hi >= 0x8000, -(hi & 0x7FFF), hi)


class Survivors:
    """The survivors of one part of a chunk's queries (rows a..e): (query, key, row) per block."""

    def __init__(self, a: int, e: int, low: np.ndarray, cap: int):
        self.a, self.e = a, e
        self.low = low
        self.low_key = key_floor(low)
        self.positive = bool((low > 0).all())
        self.low_bits = self.low_key.astype(np.int16)[:, None]
        self.low_f = np.nextafter(low.astype(np.float32), np.float32(-np.inf))[:, None]
        self.cap = cap * (e - a)  # survivors held before the heavy queries are dropped
        self.held = 0
        self.heavy = np.zeros(e - a, bool)
        self.q, self.k, self.r = [], [], []

    def take(self, S, M, start: int) -> None:
        """Keep this part's scores of one block (``S``: int16[b, w], the bfloat16 bits; ``M``: bool
        [b, w], a buffer) at or above the thresholds, the block's first gallery row being ``start``.
        A block's survivors come in query order (and in row order within a query)."""
        w = S.shape[1]
        Si = S[self.a : self.e]
        m = M[self.a : self.e]
        if self.positive:
            np.greater_equal(Si, self.low_bits, out=m)
        else:
            values = (Si.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
            np.greater_equal(values, self.low_f, out=m)
        f = np.flatnonzero(m)
        q = f // w
        bits = Si.reshape(-1)[f]
        self.q.append(q.astype(np.int32))
        # above a positive threshold every survivor is positive, and its bits are its key
        self.k.append(bits.astype(np.int32) if self.positive else bf16_key(bits))
        q *= w
        f -= q
        f += start
        self.r.append(f)
        self.held += len(f)
        if self.held > self.cap:  # some query holds far more than it needs
            self._drop_heavy()

    def _drop_heavy(self) -> None:
        m = self.e - self.a
        held = sum(np.bincount(q, minlength=m) for q in self.q)
        self.heavy |= held > self.cap // max(1, m)
        keep = [~self.heavy[q] for q in self.q]  # block by block, so each block keeps its order
        self.q, self.k, self.r = ([v[k] for v, k in zip(vals, keep)] for vals in (self.q, self.k, self.r))
        self.held = sum(len(q) for q in self.q)
        self.cap = max(self.cap, 2 * self.held)

    def select(self, ranks: tuple, t: np.ndarray, band) -> tuple[np.ndarray, list]:
        """(short bool[m], [(τ float64[m], rows int64[m, w])] per rank of ``ranks``, the first the
        deepest): each query's rows with a value at least τ = v_r - band(v_r), v_r its r-th best,
        in row order; short: fewer than the first rank at or above ``t``, or a heavy query, or one
        whose levels overflow the histogram (left to FAISS)."""
        m = self.e - self.a
        levels, from_top = self._levels()
        firsts = [np.argmax(from_top >= r, axis=1) for r in ranks]  # levels from the top to the r-th value
        vd = key_value(self.low_key + (levels - 1 - firsts[0]))
        short = self.heavy | ~(from_top[:, -1] >= ranks[0]) | (vd < t)
        short |= (np.minimum.reduce(firsts) == 0) & (levels == HIST_LEVELS)
        cuts = []
        for first in firsts:
            vd = np.where(short, 0.0, key_value(self.low_key + (levels - 1 - first)))
            tau = vd - band(vd, np.arange(m))
            floor = np.where(short, np.iinfo(np.int32).max, key_floor(tau)).astype(np.int32)
            cuts.append((tau, self._rows(floor)))
        return short, cuts

    def _levels(self) -> tuple[int, np.ndarray]:
        """(levels, int64[m, levels]): per query, how many survivors lie at or above each bfloat16
        level, counted from the top (levels above its threshold, at most HIST_LEVELS; survivors
        beyond count in the top level)."""
        m = self.e - self.a
        low = self.low_key.astype(np.int32)
        rels = [np.maximum(k - low[q], 0) for q, k in zip(self.q, self.k)]  # survivors are at or above low
        levels = int(min(HIST_LEVELS, max((int(r.max()) + 1 for r in rels if r.size), default=1)))
        hist = np.zeros(m * levels, np.int64)
        wide = m * levels >= 2**31  # bins past int32
        for q, rel in zip(self.q, rels):
            np.minimum(rel, levels - 1, out=rel)
            hist += np.bincount(rel + (q.astype(np.int64) if wide else q) * levels, minlength=m * levels)
        return levels, np.cumsum(hist.reshape(m, levels)[:, ::-1], axis=1)

    def _rows(self, floor: np.ndarray) -> np.ndarray:
        """int64[m, w]: each query's survivors with a key at least ``floor`` (int32[m]), block by
        block and in row order, -1 pads. Each block's survivors come in query order, so a query's
        rows of one block go to the columns after its rows of the blocks before."""
        m = self.e - self.a
        kept, counts = [], []
        for q, k, r in zip(self.q, self.k, self.r):
            keep = k >= floor[q]
            kept.append((q[keep], r[keep]))
            counts.append(np.bincount(kept[-1][0], minlength=m))
        hits = sum(counts) if counts else np.zeros(m, np.int64)
        out = np.full((m, int(hits.max()) if m else 0), -1, np.int64)
        filled = np.zeros(m, np.int64)
        for (q, r), c in zip(kept, counts):
            shift = filled - (np.cumsum(c) - c)  # a query's first column in this block, less its offset
            out[q, np.arange(len(q)) + shift[q]] = r
            filled += c
        return out
