"""A bfloat16 candidate scan for exact search on the CPU, with a proven bound.

:class:`Bf16Scan` scores queries against a bfloat16 copy of the gallery with torch's GEMM (AMX or
AVX-512 BF16 where the CPU has them) and returns, for each query, every row whose bfloat16 score lies
within a proven band of its ``depth``-th best one, with the bound
:func:`~cir_mine.miner.core.search.exact.exact_cut` needs (no row left out has a real dot product
above it). The cut is decided on exact scores afterwards, so the rows are every other kernel's; the
scan changes the time only, and whether it runs is measured
(:class:`~cir_mine.miner.core.search.measure.KernelRace`).

The error bound. With q̂, x̂ the bfloat16 roundings of a query and a row (e_q = q - q̂, e_x = x - x̂):
the rounded inputs move the product by |q·x - q̂·x̂| <= ‖q̂‖‖e_x‖ + ‖e_q‖‖x̂‖ + ‖e_q‖‖e_x‖
(Cauchy-Schwarz); float32 sums of the (exact) bfloat16 products add at most γ_(d+2) ‖q̂‖‖x̂‖; the
bfloat16 result v of a float32 sum s differs from it by at most u'|v| (u' = u / (1 - u), u = 2^-8);
flushed subnormals add at most 2^-126 per product. So the real product r of every row satisfies
|r - v| <= E(v) = u'|v| + c, where c holds the query's terms with the gallery's largest ‖e_x‖ and
‖x̂‖ (both measured once). The GEMM's part of it (float32 sums, one rounding to bfloat16) is what
torch's kernel on this CPU must keep: ``prepare`` checks it on a sample of the gallery scored
against itself (a float64 reference), and where it fails the scan hands every query to FAISS's flat
search.

The selection, without a top-k over every score. The scan is asked for ``depth`` rows to cut at
rank k (at most depth). Each query's threshold t is the rank-r score among every ``SAMPLE_STRIDE``-th
row (r x stride about ``SAMPLE_OVER`` x k; every row when that sample holds fewer than
``SAMPLE_SPARE`` x r), lowered to t - band(t) (v - band(v) grows with v); each
block of scores is compared with it (as int16 bit patterns where it is positive, which order positive
bfloat16 values as their values) on one thread per core, and the survivors kept. A query with k
survivors at or above t has its k-th best score v_k among them (a histogram of its bfloat16 levels);
it gets every row with v >= τ = v_k - band(v_k), band(v) = (2u'|v| + 2c + 3γ_d ‖q‖ R)(1 + 1e-3) /
(1 - u') (R: the gallery's largest norm), and the bound τ + E(τ), so that exact_cut settles it in one
round: its k best rows by v each score at least v_k - E(v_k), and a row left out at most τ + E(τ).
A query short of k survivors at or above t is scanned once more with ``RETRY_OVER`` times the rank;
one still short, or holding more than ``SURVIVOR_CAP`` x k survivors, is fetched ``depth`` deep by
FAISS's flat search instead.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Optional

import numpy as np
import torch

from cir_mine.data.workspace import read_block, release_pages
from cir_mine.miner.core.search.exact import UNIT_ROUNDOFF, cut_depth, faiss_topk, fetched_bound, max_row_norm
from cir_mine.miner.accel.search import host_tensor
from cir_mine.miner.accel import survivors
from cir_mine.miner.accel.survivors import Survivors, key_value
from cir_mine.miner.core.search.measure import core_pool, stack_rows, usable_cores

log = logging.getLogger(__name__)

BF16_ROUNDOFF = 2.0**-8  # bfloat16's unit roundoff
# Tuned settings (docs/search.md, "Tuned settings")
QUERY_CHUNK = 2048  # queries per GEMM
BLOCK_SCORES = 1 << 24  # scores per block compared with the thresholds (one reused buffer): rows = this / queries
MIN_BLOCK_COLS = 4096  # gallery rows per block at least
SAMPLE_STRIDE = 16  # the thresholds come from every SAMPLE_STRIDE-th gallery row
SAMPLE_SPARE = 4  # the strided sample is used when it holds this many times the rank it is cut at (else every row)
SAMPLE_OVER = 1.5  # the sample's rank is chosen so that about SAMPLE_OVER x depth rows pass its threshold
RETRY_OVER = 4.0  # a query short of depth rows above it is scanned again with this times the rank
SURVIVOR_CAP = 16  # a query with more survivors than this x depth (+ a block's rows) goes to FAISS instead
CHECK_ROWS, CHECK_COLS = 64, 2048  # the prepare's check of torch's GEMM against the bound
COPY_BYTES = 1 << 30  # a gallery whose bfloat16 copy is larger is converted block by block at each scan
PREPARE_ROWS = 32_768  # rows converted at a time when the copy and the error terms are made


class Bf16Scan:
    """``scan(xq float32[b, d], depth, k) -> (bound float64[b], rows int64[b, w])``: every row of a
    query within its proven band of the k-th best bfloat16 score (-1 pads), and a bound that no row
    left out exceeds in real value (-inf when every row came back); :func:`exact_cut`'s ``fetch``
    contract for a cut at k. ``xb``: the gallery (float32[n, d], in memory or memory-mapped; kept as
    a bfloat16 copy up to ``COPY_BYTES``, else converted block by block at each scan)."""

    def __init__(self, xb: np.ndarray, block_rows: int = 262_144):
        self.xb = xb
        self.n, self.d = int(xb.shape[0]), int(xb.shape[1])
        self.block_rows = int(block_rows)
        self.mapped = isinstance(xb, np.memmap)
        self._row_norm: Optional[float] = None
        self._copy = None  # the bfloat16 gallery (when it fits COPY_BYTES)
        self._err = None  # (largest ‖x̂‖, largest ‖x - x̂‖)
        self._lock = threading.Lock()
        self.sound = True  # torch's GEMM met the bound on the prepare's check (else FAISS fetches)
        self._local = threading.local()  # per-thread score buffers

    # -- the gallery in bfloat16 ------------------------------------------------------------------
    def prepare(self, row_norm: Optional[float] = None) -> None:
        """The bfloat16 copy, the gallery's error terms, and one warm-up GEMM and pass of the
        threads (first calls compile torch's kernels and fault in the buffers: a kernel race
        would count them against this scan). ``row_norm``: the gallery's largest row norm, when
        the caller has it (:func:`~cir_mine.miner.core.search.exact.max_row_norm`)."""
        with self._lock:
            if self._err is not None:
                return
            self._row_norm = row_norm
            keep = not self.mapped and self.n * self.d * 2 <= COPY_BYTES
            copy = torch.empty((self.n, self.d), dtype=torch.bfloat16) if keep else None
            top_hat, top_res = 0.0, 0.0
            step = min(self.block_rows, PREPARE_ROWS)  # float32 temporaries of this many rows
            for s in range(0, self.n, step):
                block = np.ascontiguousarray(read_block(self.xb, s, s + step), np.float32)
                hat = host_tensor(block).to(torch.bfloat16)
                back = hat.float().numpy()
                top_hat = max(top_hat, max_row_norm(back))
                top_res = max(top_res, max_row_norm(block - back))  # exact in float32
                if copy is not None:
                    copy[s : s + len(block)] = hat
                release_pages(self.xb)
            if self._row_norm is None:
                self._row_norm = max_row_norm(self.xb, self.block_rows)
            self._copy = copy
            self._err = (top_hat, top_res)
        self._warm()

    def _warm(self) -> None:
        """One GEMM of the scan's shape, checked against the bound, and one pass of the threads."""
        b = min(WARM_QUERIES, self.n)
        step = int(min(self.n, max(MIN_BLOCK_COLS, BLOCK_SCORES // b)))
        _, block = next(self._blocks())
        q, cols = block[:b], block[:step]
        with torch.inference_mode():
            buf, _ = self._buffers(b * step)
            S = buf[: b * len(cols)].view(b, len(cols))
            torch.matmul(q, cols.T, out=S)
            self.sound = gemm_within_bound(q[:CHECK_ROWS], cols[:CHECK_COLS], S[:CHECK_ROWS, :CHECK_COLS], self.d)
        if not self.sound:
            log.warning(
                "torch's bfloat16 GEMM on this CPU exceeds the rounding bound the scan relies on; "
                "its candidates come from FAISS's flat search instead"
            )
        _run([0] * usable_cores(), lambda _: None)

    def _blocks(self):
        """(start, bfloat16 block of at most block_rows gallery rows)."""
        for s in range(0, self.n, self.block_rows):
            if self._copy is not None:
                yield s, self._copy[s : s + self.block_rows]
            else:
                block = np.ascontiguousarray(read_block(self.xb, s, s + self.block_rows), np.float32)
                yield s, host_tensor(block).to(torch.bfloat16)
                release_pages(self.xb)

    def _buffers(self, size: int):
        """This thread's (scores bfloat16[size], mask bool[size]): reused, since fresh pages cost
        more than the GEMM's writes."""
        have = getattr(self._local, "bufs", None)
        if have is None or have[0].numel() < size:
            have = (torch.empty(size, dtype=torch.bfloat16), torch.empty(size, dtype=torch.bool))
            self._local.bufs = have
        return have

    # -- the bound --------------------------------------------------------------------------------
    def constants(self, xq: np.ndarray, q_hat=None) -> tuple[np.ndarray, float]:
        """(c float64[b], u'): |real - v| <= u'|v| + c for every row's bfloat16 score v (``q_hat``:
        the queries already rounded to bfloat16, when the caller has them)."""
        self.prepare()
        xq = np.ascontiguousarray(xq, np.float32)
        qh = (q_hat if q_hat is not None else host_tensor(xq).to(torch.bfloat16)).float().numpy()
        q_hat = np.sqrt(np.einsum("ij,ij->i", qh, qh, dtype=np.float64))
        res = xq.astype(np.float64) - qh
        e_q = np.sqrt(np.einsum("ij,ij->i", res, res))
        x_hat, e_x = self._err
        gamma = (self.d + 2) * UNIT_ROUNDOFF / (1.0 - (self.d + 2) * UNIT_ROUNDOFF)
        tiny = self.d * 2.0**-120 * (1.0 + q_hat + x_hat)
        c = (q_hat * e_x + e_q * x_hat + e_q * e_x + gamma * q_hat * x_hat) * (1 + 1e-6) + tiny
        return c, BF16_ROUNDOFF / (1.0 - BF16_ROUNDOFF)

    def band(self, v: np.ndarray, c: np.ndarray, u: float, qnorm: np.ndarray) -> np.ndarray:
        """The band below a depth-th score ``v`` that lets exact_cut settle the query (module doc)."""
        d = self.d
        g = d * UNIT_ROUNDOFF / (1.0 - d * UNIT_ROUNDOFF)
        return (2 * u * np.abs(v) + 2 * c + 3 * g * qnorm * self._row_norm) * (1 + 1e-3) / (1 - u) + 1e-29

    # -- the scan ---------------------------------------------------------------------------------
    def __call__(self, xq: np.ndarray, depth: int, k: Optional[int] = None, near: Optional[int] = None) -> tuple:
        """``k``: the rank the caller cuts at (at most ``depth``): the band is taken below the k-th
        best score instead of the depth-th, which settles the cut at k as well (module doc) with
        fewer rows. ``near``: a second cut, at most k, from the same scan: then (bound, rows,
        near_bound, near_rows), the near rows those a cut at ``near`` needs."""
        xq = np.ascontiguousarray(xq, np.float32)
        b = len(xq)
        depth = int(depth)
        rank = int(min(depth, k)) if k is not None else depth
        ranks = (rank,) if near is None else (rank, int(min(rank, near)))
        if b == 0 or depth >= self.n:
            rows = np.broadcast_to(np.arange(self.n, dtype=np.int64), (b, self.n)).copy()
            return (np.full(b, -np.inf), rows) * len(ranks)
        if not self.sound:
            cuts = self._faiss(xq, depth, ranks)
        else:
            parts = [self._scan(xq[s : s + QUERY_CHUNK], depth, ranks) for s in range(0, b, QUERY_CHUNK)]
            cuts = [_stack([p[i] for p in parts]) for i in range(len(ranks))]
        return tuple(a for cut in cuts for a in cut)

    def _scan(self, xq: np.ndarray, depth: int, ranks: tuple, over: float = SAMPLE_OVER) -> list:
        """One chunk of queries: [(bound, rows)] per rank of ``ranks`` (the first the deepest). The
        GEMM on torch's threads, block by block; each block's scores compared and the survivors
        selected in parts of the queries, one thread per core. Queries short of ``depth``
        survivors are scanned once more with RETRY_OVER times the sample's rank; what is still
        short, and heavy queries, go to FAISS's flat search."""
        rank = ranks[0]
        q_hat = host_tensor(xq).to(torch.bfloat16)
        c, u = self.constants(xq, q_hat)
        b = len(xq)
        qnorm = np.sqrt(np.einsum("ij,ij->i", xq, xq, dtype=np.float64))
        step = int(min(self.n, max(MIN_BLOCK_COLS, BLOCK_SCORES // b)))  # gallery rows per block
        with torch.inference_mode():
            t = self._sample_threshold(q_hat, rank, over, step)
            low = t - self.band(t, c, u, qnorm)  # v - band(v) grows with v: v_d >= t keeps its rows above
            parts = [Survivors(a, e, low[a:e], SURVIVOR_CAP * rank + step) for a, e in _query_parts(b)]
            buf, mbuf = self._buffers(b * step)  # the sample's scores were there
            for s0, block in self._blocks():
                for s in range(0, len(block), step):
                    cols = block[s : s + step]
                    w = len(cols)
                    S = buf[: b * w].view(b, w)
                    torch.matmul(q_hat, cols.T, out=S)
                    Si, M = S.view(torch.int16).numpy(), mbuf[: b * w].view(b, w).numpy()
                    _run(parts, lambda p: p.take(Si, M, s0 + s))
        picked = _run(
            parts, lambda p: p.select(ranks, t[p.a : p.e], lambda v, q: self.band(v, c[p.a + q], u, qnorm[p.a + q]))
        )
        short = np.concatenate([p[0] for p in picked])
        cuts = []
        for i in range(len(ranks)):
            tau, rows = _stack([p[1][i] for p in picked])
            cuts.append((tau + u * np.abs(tau) + c, rows))  # τ + E(τ)
        heavy = np.concatenate([p.heavy for p in parts])
        again = short & ~heavy & (over < SAMPLE_OVER * RETRY_OVER)
        if again.any():
            cuts = _put(cuts, again, self._scan(xq[again], depth, ranks, over * RETRY_OVER))
        short &= ~again
        if short.any():
            cuts = _put(cuts, short, self._faiss(xq[short], depth, ranks))
        return cuts

    def _faiss(self, xq: np.ndarray, depth: int, ranks: tuple) -> list:
        """[(bound, rows)] per rank of FAISS's flat search ``depth`` deep (the queries the scan
        leaves): every row for the first rank, the first the cut needs (:func:`cut_depth`) for
        the others."""
        D, I = faiss_topk(xq, self.xb, depth, self.block_rows, release=self.mapped)
        widths = [depth] + [min(depth, cut_depth(r)) for r in ranks[1:]]
        return [(fetched_bound(D, w, self.n), I[:, :w]) for w in widths]

    def _sample_threshold(self, q_hat, depth: int, over: float, step: int = 0) -> np.ndarray:
        """Each query's rank-r bfloat16 score among every SAMPLE_STRIDE-th row (float64[b]); the
        sample's scores go to this thread's buffer, kept at least ``step`` rows wide (the scan's
        blocks)."""
        sampled = -(-self.n // SAMPLE_STRIDE)
        stride = SAMPLE_STRIDE if sampled >= SAMPLE_SPARE * math.ceil(over * depth / SAMPLE_STRIDE) else 1
        r = int(min(math.ceil(over * depth / stride), -(-self.n // stride)))
        if self._copy is not None:
            sample = self._copy[::stride]
        else:
            rows = np.arange(0, self.n, stride)
            sample = host_tensor(np.ascontiguousarray(self.xb[rows], np.float32)).to(torch.bfloat16)
            release_pages(self.xb)
        b = len(q_hat)
        scores = self._buffers(b * max(step, len(sample)))[0][: b * len(sample)].view(b, len(sample))
        torch.matmul(q_hat, sample.T, out=scores)  # into this thread's buffer: fresh pages cost more
        if survivors.KERNELS is None:
            return torch.topk(scores, r, dim=1, sorted=False).values.amin(1).float().numpy().astype(np.float64)
        bits = scores.view(torch.int16).numpy()  # the same values, by a radix select on the keys
        keys = np.empty(b, np.int32)
        w = bits.shape[1]
        _run(_query_parts(b), lambda p: survivors.KERNELS.kth(bits, w, p[0], p[1], w, r, keys[p[0] : p[1]]))
        return key_value(keys)


WARM_QUERIES = 256  # queries of the warm-up GEMM (a kernel race's share of a batch of 4096)
MIN_PART_QUERIES = 64  # a part of the queries holds at least this many


def gemm_within_bound(q, x, S, d: int) -> bool:
    """Whether bfloat16 GEMM scores ``S`` of bfloat16 rows ``q`` against ``x`` lie within the part
    of the bound the GEMM itself must keep: float32 sums of the exact products (γ_(d+2) ‖q‖‖x‖) and
    one rounding of the result to bfloat16 (u'|v|), against the products summed in float64."""
    q64, x64 = q.double().numpy(), x.double().numpy()
    v = S.float().numpy().astype(np.float64)
    real = q64 @ x64.T
    gamma = (d + 2) * UNIT_ROUNDOFF / (1.0 - (d + 2) * UNIT_ROUNDOFF)
    u = BF16_ROUNDOFF / (1.0 - BF16_ROUNDOFF)
    norms = np.sqrt(np.einsum("ij,ij->i", q64, q64))[:, None] * np.sqrt(np.einsum("ij,ij->i", x64, x64))[None, :]
    return bool(np.all(np.abs(real - v) <= u * np.abs(v) + gamma * norms * (1 + 1e-6) + d * 2.0**-120 * (1 + norms)))


def _query_parts(b: int) -> list:
    """[(a, e)]: ``b`` queries in consecutive parts, one per core, each of MIN_PART_QUERIES at least."""
    cut = np.linspace(0, b, min(usable_cores(), max(1, b // MIN_PART_QUERIES)) + 1).astype(np.int64)
    return [(int(a), int(e)) for a, e in zip(cut[:-1], cut[1:])]


def _run(parts: list, fn) -> list:
    """fn(part) for every part, on this module's threads when there are several (numpy and torch
    release the GIL)."""
    if len(parts) == 1:
        return [fn(parts[0])]
    return list(core_pool("cir-mine-bf16").map(fn, parts))


def _put(cuts: list, which: np.ndarray, subs: list) -> list:
    """[(bound, rows)] with the queries ``which`` replaced by those of ``subs`` (bound in place;
    rows widened)."""
    out = []
    for (bound, rows), (b2, r2) in zip(cuts, subs):
        width = max(rows.shape[1], r2.shape[1])
        rows = np.pad(rows, ((0, 0), (0, width - rows.shape[1])), constant_values=-1)
        rows[which] = -1
        rows[which, : r2.shape[1]] = r2
        bound[which] = b2
        out.append((bound, rows))
    return out


def _stack(parts: list) -> tuple[np.ndarray, np.ndarray]:
    """(bound, rows) parts of consecutive queries stacked, rows padded with -1 to one width."""
    return np.concatenate([p[0] for p in parts]), stack_rows([p[1] for p in parts])
