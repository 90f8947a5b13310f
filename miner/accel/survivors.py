"""The survivors of the bfloat16 scan (:mod:`cir_mine.miner.accel.bf16`): the scores of each block at
or above each query's threshold, held as (query, key, row), and the selection of each query's rows
within its band from them. Keys are integers in the bfloat16 values' order (:func:`bf16_key`); a score
survives when its key is at least its query's threshold key.

Each step has two implementations that return the same arrays: the compiled kernels of
``_survivors.c`` (AVX-512BW, AVX2 or plain C, picked for the CPU at each call), and the numpy code
here, used where the extension was not built and as the reference the tests hold the kernels to."""

from __future__ import annotations

import numpy as np

try:  # the compiled kernels (miner/accel/_survivors.c); an install without a C compiler has the numpy code
    from cir_mine.miner.accel import _survivors as KERNELS
except ImportError:  # pragma: no cover - depends on the install
    KERNELS = None

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
    """The survivors of one part of a chunk's queries (rows a..e): (query, key, row) per block.
    ``kernels``: "compiled" (the compiled kernels where built, else the numpy code) or None (the
    numpy code); ``isa``: the instruction set the compiled ``take`` runs with (0: the best this
    CPU has; 1 plain C, 2 AVX2, 3 AVX-512BW)."""

    def __init__(self, a: int, e: int, low: np.ndarray, cap: int, kernels: str | None = "compiled", isa: int = 0):
        self.a, self.e = a, e
        self.low_key = key_floor(low)
        self.low_key32 = np.ascontiguousarray(self.low_key, np.int32)
        self.positive = bool((self.low_key > 0).all())  # then a key is at least low_key iff its bits are
        self.low_bits = self.low_key.astype(np.int16)[:, None]
        self.cap = cap * (e - a)  # survivors held before the heavy queries are dropped
        self.held = 0
        self.heavy = np.zeros(e - a, bool)
        self.q, self.k, self.r = [], [], []
        self.kernels, self.isa = (KERNELS if kernels == "compiled" else None), isa
        self._guess = 0  # the output size the compiled take starts a block with

    def take(self, S, M, start: int) -> None:
        """Keep this part's scores of one block (``S``: int16[b, w], C-contiguous, the bfloat16 bits;
        ``M``: bool[b, w], a buffer) at or above the thresholds, the block's first gallery row being
        ``start``. A block's survivors come in query order (and in row order within a query)."""
        q, k, r = self._take_compiled(S, start) if self.kernels is not None else self._take_numpy(S, M, start)
        self.q.append(q)
        self.k.append(k)
        self.r.append(r)
        self.held += len(r)
        if self.held > self.cap:  # some query holds far more than it needs
            self._drop_heavy()

    def _take_numpy(self, S, M, start: int) -> tuple:
        w = S.shape[1]
        Si = S[self.a : self.e]
        m = M[self.a : self.e]
        if self.positive:
            np.greater_equal(Si, self.low_bits, out=m)
        else:
            np.greater_equal(bf16_key(Si), self.low_key32[:, None], out=m)
        f = np.flatnonzero(m)
        q = f // w
        bits = Si.reshape(-1)[f]
        # above a positive threshold every survivor is positive, and its bits are its key
        k = bits.astype(np.int32) if self.positive else bf16_key(bits)
        qi = q.astype(np.int32)
        q *= w
        f -= q
        f += start
        return qi, k, f

    def _take_compiled(self, S, start: int) -> tuple:
        w = S.shape[1]
        if not self._guess:
            self._guess = max(1024, (self.e - self.a) * w // 32)
        while True:
            q, k, r = np.empty(self._guess, np.int32), np.empty(self._guess, np.int32), np.empty(self._guess, np.int64)
            n = self.kernels.take(S, w, self.a, self.e, w, self.low_key32, start, q, k, r, self.isa)
            fits = n <= self._guess
            self._guess = max(1024, n + n // 4)  # the next block holds about as many
            if fits:
                return q[:n], k[:n], r[:n]

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
        levels, totals, firsts = (self._levels_compiled if self.kernels is not None else self._levels_numpy)(ranks)
        vd = key_value(self.low_key + (levels - 1 - firsts[0]))
        short = self.heavy | ~(totals >= ranks[0]) | (vd < t)
        short |= (np.minimum.reduce(firsts) == 0) & (levels == HIST_LEVELS)
        cuts = []
        for first in firsts:
            vd = np.where(short, 0.0, key_value(self.low_key + (levels - 1 - first)))
            tau = vd - band(vd, np.arange(m))
            floor = np.where(short, np.iinfo(np.int32).max, key_floor(tau)).astype(np.int32)
            cuts.append((tau, self._rows_compiled(floor) if self.kernels is not None else self._rows_numpy(floor)))
        return short, cuts

    def _levels_numpy(self, ranks: tuple) -> tuple[int, np.ndarray, list]:
        """(levels, totals int64[m], [int64[m]] per rank): the histogram's levels above the
        thresholds (at most HIST_LEVELS; survivors beyond count in the top level), each query's
        survivors, and the level, counted from the top, where each rank is reached (0 if never)."""
        m = self.e - self.a
        low = self.low_key32
        rels = [np.maximum(k - low[q], 0) for q, k in zip(self.q, self.k)]  # survivors are at or above low
        levels = int(min(HIST_LEVELS, max((int(r.max()) + 1 for r in rels if r.size), default=1)))
        hist = np.zeros(m * levels, np.int64)
        wide = m * levels >= 2**31  # bins past int32
        for q, rel in zip(self.q, rels):
            np.minimum(rel, levels - 1, out=rel)
            hist += np.bincount(rel + (q.astype(np.int64) if wide else q) * levels, minlength=m * levels)
        from_top = np.cumsum(hist.reshape(m, levels)[:, ::-1], axis=1)
        return levels, from_top[:, -1], [np.argmax(from_top >= r, axis=1) for r in ranks]

    def _levels_compiled(self, ranks: tuple) -> tuple[int, np.ndarray, list]:
        m = self.e - self.a
        q, k, _ = self._held()
        firsts, totals = np.empty((m, len(ranks)), np.int64), np.empty(m, np.int64)
        levels = self.kernels.levels(q, k, self.low_key32, HIST_LEVELS, np.asarray(ranks, np.int64), firsts, totals)
        return int(levels), totals, [firsts[:, i] for i in range(len(ranks))]

    def _rows_numpy(self, floor: np.ndarray) -> np.ndarray:
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

    def _rows_compiled(self, floor: np.ndarray) -> np.ndarray:
        m = self.e - self.a
        q, k, r = self._held()
        floor = np.ascontiguousarray(floor, np.int32)
        counts = np.empty(m, np.int64)
        self.kernels.rows(q, k, r, floor, counts, np.empty(0, np.int64), 0)  # count
        out = np.full((m, int(counts.max()) if m else 0), -1, np.int64)
        self.kernels.rows(q, k, r, floor, counts, out, out.shape[1])  # place
        return out

    def _held(self) -> tuple:
        """The survivors of every block, one array each (query order within a block, blocks in order)."""
        if len(self.q) != 1:
            self.q, self.k, self.r = (
                [np.concatenate(v) if v else np.empty(0, dt)]
                for v, dt in zip((self.q, self.k, self.r), (np.int32, np.int32, np.int64))
            )
        return self.q[0], self.k[0], self.r[0]
