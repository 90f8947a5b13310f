"""Exact search with torch: candidates from a GEMM and top-k on a torch device (a GPU, or the CPU),
every cut decided on exact scores on the host.

:class:`TorchSearch` keeps the search layer's contract (docs/search.md): each query's top k by
:func:`~cir_mine.miner.core.search.exact.gathered_dot` score, descending, ties by the lower row,
-1 / -inf pads. The device scores the (unit-scaled) queries against the gallery in ``fp32``,
``fp16`` or ``bf16`` and keeps each query's best ``L`` rows; the host re-scores the candidates
exactly and :func:`~cir_mine.miner.core.search.exact.exact_cut` accepts a query's top k only when
the rounding bound of the device's scores (:func:`score_roundoff`) proves that no row left out can
reach it. Which rows come back is cut on the device by the same bound (every row whose device score
lies within twice the bound of the k-th one), so a query needs one round in nearly every case and
the host re-ranks no more rows than the bound requires. The table is therefore the CPU path's, bit
for bit, in any precision; the precision changes the time only.

Selecting the best ``L`` of each [queries, rows] block of scores is done by one of two kernels:
``topk``, torch's top-k on the device over grouped maxima (:func:`block_topk`), or, on the CPU
device, ``heap``: FAISS's per-query heaps over the same scores (one pass, no copy), whichever this
machine runs faster (:class:`~cir_mine.miner.core.search.measure.KernelRace`, as for exact search on
the CPU). Both return the same best ``L`` values, so the choice changes the time, never the rows.

Memory: the gallery's device copy (``precision``'s dtype; a float32 gallery on the CPU device is
shared with numpy, not copied) stays on the device when it takes at most half of ``memory`` bytes,
else it is streamed from the host in blocks of ``block_rows`` for every search. The rest of the
budget bounds one chunk of queries: its [queries, block_rows] scores and its candidate lists. On a
GPU the device works on the next chunk while the host re-ranks the current one (CUDA kernels are
queued, the device-to-host copies go to pinned memory), and ``mine_negatives`` searches the next
query batch in a worker thread while the current one is guarded (``prefetch``, on by default with a
GPU back-end), so the device is fed from two sides.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import warnings
from typing import Optional, Sequence

import numpy as np
import torch

from cir_mine.data.errors import UsageError
from cir_mine.data.workspace import read_block, release_pages
from cir_mine.miner.core.search.backends import FLAT_DEEP_SHARE
from cir_mine.miner.core.search.exact import (
    UNIT_ROUNDOFF,
    cut_depth,
    exact_cut,
    max_row_norm,
    rounding_gap,
)
from cir_mine.miner.core.search.faiss_api import load_faiss
from cir_mine.miner.core.search.measure import Clock, KernelRace

log = logging.getLogger(__name__)

# precision -> (torch dtype, unit roundoff of a value rounded to it)
PRECISIONS = {
    "fp32": (torch.float32, UNIT_ROUNDOFF),
    "fp16": (torch.float16, 2.0**-11),
    "bf16": (torch.bfloat16, 2.0**-8),
}
FP16_LIMIT = 1e4  # float16 galleries and scores need |values| far below float16's 65504
# device bytes the back-end may hold (gallery copy + one chunk's working set), by device type
DEFAULT_MEMORY = {"cuda": 8 << 30, "cpu": 1 << 30}
# gallery rows scored per GEMM, by device type (CPU: a [queries, 16k] block of scores, in one buffer
# reused by every block, stays in the
# last-level cache for the heaps, measured 1.16x faster than 64k-row blocks at 100k x 256, 4096
# queries, depth 512; GPU: large blocks keep the device busy and let the grouped top-k pay)
BLOCK_ROWS = {"cuda": 262_144, "cpu": 16_384}
GROUP = 32  # columns per group of the grouped top-k (block_topk)
WIDEN = {"fp32": 1.0, "fp16": 2.0, "bf16": 4.0}  # first scan depth per depth asked (doubles when short)
MAX_WIDEN = 64.0
KERNELS = {"cpu": ("heap", "topk"), "cuda": ("topk",)}  # selection kernels by device type, raced in order


def default_precision(device: str) -> str:
    """fp16 on a GPU (tensor cores), fp32 on the CPU."""
    return "fp16" if torch.device(device).type == "cuda" else "fp32"


def gemm_roundoff(precision: str, device: torch.device) -> float:
    """The unit roundoff of the GEMM's inputs: the precision's, or, for fp32, what torch's float32
    matmul setting allows (TF32 or bfloat16 inputs unless it is 'highest')."""
    if precision != "fp32":
        return PRECISIONS[precision][1]
    mode = torch.get_float32_matmul_precision()
    tf32 = device.type == "cuda" and bool(torch.backends.cuda.matmul.allow_tf32)
    if mode == "highest" and not tf32:
        return 0.0
    return 2.0**-11 if mode == "high" or (tf32 and mode == "highest") else 2.0**-8


def score_roundoff(precision: str, device: torch.device, d: int, row_norm: float) -> float:
    """The ``extra_gap`` of :func:`~cir_mine.miner.core.search.exact.exact_cut` for device scores:
    beyond the rounding of two float32 summation orders (``rounding_gap``), a device score of a unit
    query differs from the exact one by at most this times the largest row norm.

    Queries are scaled to unit norm in float32 (2u), both operands are rounded to the GEMM's
    precision (2u_p + u_p^2), sums are float32 and the product may be rounded to the precision once
    more (u_p); 4 u_p + 4 u covers all of them. Float16 adds its subnormal spacing (2^-24 per
    element, at most sqrt(d) of it against a unit vector)."""
    u_p = gemm_roundoff(precision, device)
    extra = 4.0 * u_p + 4.0 * UNIT_ROUNDOFF
    if precision == "fp16":
        extra += math.sqrt(d) * 2.0**-24 * (1.0 + 1.0 / max(row_norm, 1e-30))
    return extra


class TorchSearch:
    """The exact top-k over ``xb`` (float32[n, d], in memory or memory-mapped) with candidates from a
    torch device (``device``: 'cpu', 'cuda', 'cuda:N'; for mining, the one device rule,
    :func:`~cir_mine.miner.accel.device.choose_device`, picks it).

    precision: 'fp32' | 'fp16' | 'bf16' scores on the device, or 'auto' (:func:`default_precision`).
    memory: device bytes for the gallery copy and one chunk's working set (None: DEFAULT_MEMORY,
      on a GPU at most half of the memory free when the back-end opens).
    block_rows: gallery rows per GEMM (None: BLOCK_ROWS).
    kernels: the selection kernels to race (None: KERNELS of the device type)."""

    exact = True
    cheap_depth = True  # a deeper search costs about the same (see ExactSearch)
    deep_share = FLAT_DEEP_SHARE  # ExactSearch's (docs/search.md, "Tuned settings")

    def __init__(
        self,
        xb: np.ndarray,
        device: str = "cpu",
        precision: str = "auto",
        memory: Optional[int] = None,
        block_rows: Optional[int] = None,
        kernels: Optional[Sequence[str]] = None,
    ):
        self.xb = xb
        self.ntotal, self.d = int(xb.shape[0]), int(xb.shape[1])
        self.device = torch.device(device)
        self.precision = default_precision(device) if precision == "auto" else precision
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision {precision!r}: use auto, fp32, fp16 or bf16.", params=("precision",))
        self.dtype = PRECISIONS[self.precision][0]
        kind = "cpu" if self.device.type == "cpu" else "cuda"
        kernels = tuple(kernels) if kernels is not None else KERNELS[kind]
        if not kernels or set(kernels) - set(KERNELS[kind]):
            raise UsageError(
                f"kernels {list(kernels)!r}: on a {kind} device choose among {list(KERNELS[kind])}.",
                params=("kernels",),
            )
        self.race = KernelRace(kernels)
        self.memory = int(memory) if memory is not None else self._default_memory(kind)
        if self.memory < 1 << 20:
            raise UsageError(f"memory must be at least 1 MiB (got {self.memory} bytes).", params=("memory",))
        self.block_rows = int(block_rows or BLOCK_ROWS[kind])
        self.mapped = isinstance(xb, np.memmap)
        self.row_norm = max_row_norm(xb)
        if self.precision == "fp16" and self.row_norm > FP16_LIMIT:
            raise UsageError(
                f"precision fp16: gallery rows have norms up to {self.row_norm:.3g}, beyond what "
                f"float16 scores hold. Use precision fp32 or bf16.",
                params=("precision",),
            )
        self.extra_gap = score_roundoff(self.precision, self.device, self.d, self.row_norm)
        self.clock = Clock()
        self._widen = WIDEN[self.precision]
        self._lock = threading.Lock()
        self.gallery = self._resident()
        log.info(
            "torch search on %s in %s: gallery %s, %d MiB budget",
            self.device,
            self.precision,
            "resident" if self.gallery is not None else f"streamed in blocks of {self.block_rows}",
            self.memory >> 20,
        )

    # -- memory -----------------------------------------------------------------------------------
    def _default_memory(self, kind: str) -> int:
        budget = DEFAULT_MEMORY[kind]
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = min(budget, free // 2)
        return int(budget)

    def _copy_bytes(self) -> int:
        """Bytes the gallery's device copy takes (0: shared with numpy)."""
        if self.device.type == "cpu" and self.dtype == torch.float32 and not self.mapped:
            return 0
        return self.ntotal * self.d * torch.finfo(self.dtype).bits // 8

    def _resident(self) -> Optional[torch.Tensor]:
        """The gallery on the device in ``dtype`` when it fits half the budget, else None (streamed)."""
        if self.mapped or self._copy_bytes() > self.memory // 2:
            return None
        if self._copy_bytes() == 0:
            return host_tensor(np.ascontiguousarray(self.xb, np.float32))
        out = torch.empty((self.ntotal, self.d), dtype=self.dtype, device=self.device)
        for s in range(0, self.ntotal, self.block_rows):
            block = host_tensor(np.ascontiguousarray(self.xb[s : s + self.block_rows], np.float32))
            out[s : s + len(block)] = block.to(self.device).to(self.dtype)
        return out

    def chunk_queries(self, L: int) -> int:
        """Queries per chunk: its scores (float32[q, block_rows], and as much again for a top-k's
        work) and its candidate lists (values and rows, up to 5 L wide between merges) within the
        budget the gallery's copy leaves (a streamed block counted on both sides)."""
        rows = min(self.block_rows, self.ntotal)
        left = self.memory - (self._copy_bytes() if self.gallery is not None else 2 * rows * self.d * 4)
        per_query = rows * 4 * 2 + 5 * L * 12
        return int(max(1, left // per_query))

    # -- search -----------------------------------------------------------------------------------
    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact top-``k`` of each query (float32[b, d]) over the gallery -> (D float32[b, k],
        I int64[b, k])."""
        xq = np.ascontiguousarray(xq, np.float32)
        k = int(min(k, self.ntotal))
        nq = len(xq)
        if nq == 0 or k == 0:
            return exact_cut(self.xb, xq, k, None, self.ntotal, self.row_norm, self.extra_gap, self.clock)
        qnorm = np.sqrt(np.einsum("ij,ij->i", xq, xq, dtype=np.float64))
        unit = (xq / np.where(qnorm > 0, qnorm, 1.0)[:, None]).astype(np.float32)
        depth0 = int(max(1, min(self.ntotal, cut_depth(k))))  # exact_cut's first depth
        step = self.chunk_queries(self.scan_depth(depth0))
        step = -(-nq // -(-nq // step))  # chunks of equal size within the budget
        chunks = [np.arange(s, min(nq, s + step), dtype=np.int64) for s in range(0, nq, step)]
        D = np.empty((nq, k), np.float32)
        I = np.empty((nq, k), np.int64)
        ahead = len(self.race.names) == 1  # one kernel (a GPU's): each chunk launched one ahead
        with torch.inference_mode(), _full_precision_sums(self.device):
            launch = lambda q: self.clock.timed(
                "search", self._launch, self.race.names[0], unit[q], qnorm[q], k, self.scan_depth(depth0)
            )
            pending = launch(chunks[0]) if ahead else None
            for j, q in enumerate(chunks):
                first = pending
                # the device scores the next chunk while the host re-ranks this one
                pending = launch(chunks[j + 1]) if ahead and j + 1 < len(chunks) else None
                D[q], I[q] = self._cut(xq[q], unit[q], qnorm[q], k, depth0, first)
        release_pages(self.xb)
        return D, I

    def _cut(self, xq, unit, qnorm, k: int, depth0: int, first) -> tuple[np.ndarray, np.ndarray]:
        """exact_cut over one chunk: its first fetch may be launched already, the others run here."""

        def fetch(q: np.ndarray, depth: int):
            if first is not None and depth == depth0 and q.size == len(xq):
                return self._take(first, depth == depth0)
            L = self.scan_depth(depth)
            bound, rows = self.race.run(
                q.size,
                depth,
                lambda kernel, part: self._take(
                    self._launch(kernel, unit[q[part]], qnorm[q[part]], k, L), depth == depth0, L
                ),
            )
            alive = np.flatnonzero((rows >= 0).any(0))
            return bound, rows[:, : alive[-1] + 1] if alive.size else rows[:, :0]

        return exact_cut(self.xb, xq, k, fetch, self.ntotal, self.row_norm, self.extra_gap, self.clock)

    def _take(self, launched: "Launched", first_round: bool, width: Optional[int] = None):
        """A launched scan's (bound, rows), rows padded to ``width`` (shares of a race stack)."""
        out = launched.result()
        if first_round and out.saturated > 0.01 * max(1, len(out.rows)):
            # more than 1% of the queries filled their scan: lower precisions have wider bounds,
            # and a wider first scan is cheaper than a second round
            with self._lock:
                self._widen = min(MAX_WIDEN, self._widen * 2)
        rows = out.rows
        if width is not None and rows.shape[1] < width:
            rows = np.pad(rows, ((0, 0), (0, width - rows.shape[1])), constant_values=-1)
        return out.bound, rows

    def scan_depth(self, depth: int) -> int:
        """Rows scanned per query for a fetch ``depth`` rows deep (widened for lower precisions)."""
        with self._lock:
            widen = self._widen
        return int(min(self.ntotal, max(depth, math.ceil(depth * widen))))

    def _launch(self, kernel: str, unit: np.ndarray, qnorm: np.ndarray, k: int, L: int) -> "Launched":
        """Queue the device's work for these unit queries: each one's best ``L`` rows, cut at the
        bound, copied to the host. -> a :class:`Launched` whose ``result`` waits for it."""
        q = torch.from_numpy(unit).to(self.device, non_blocking=True).to(self._gemm_dtype())
        vals, idx = self._scan_heap(q, L) if kernel == "heap" else self._scan_topk(q, L)
        gap = (rounding_gap(self.d) + self.extra_gap) * self.row_norm * (1 + 1e-4) + 1e-7
        if L < self.ntotal:
            # every row whose device score can reach the k-th exact score: within 2 gap of the k-th
            thr = vals[:, k - 1] - 2.0 * gap
            count = (vals >= thr[:, None]).sum(1)
            pos = torch.clamp(count, max=L - 1)
            bound = torch.where(count < L, vals.gather(1, pos[:, None])[:, 0], vals[:, L - 1])
            idx = torch.where(torch.arange(L, device=vals.device)[None, :] < count[:, None], idx, -1)
        else:  # every row scanned: all returned
            count = torch.full((len(vals),), L, dtype=torch.int64, device=vals.device)
            bound = torch.full((len(vals),), -math.inf, device=vals.device)
        return Launched(idx, bound, count, qnorm, L, L < self.ntotal)

    def _gemm_dtype(self) -> torch.dtype:
        # float16 on the CPU is scored in float32 from the float16-rounded gallery (torch's CPU
        # float16 GEMM may sum in float16); the bound is the same
        return torch.float32 if self.precision == "fp16" and self.device.type == "cpu" else self.dtype

    def _blocks(self):
        """(start, device block) over the gallery: slices of the resident copy, or uploaded blocks."""
        for s in range(0, self.ntotal, self.block_rows):
            if self.gallery is not None:
                block = self.gallery[s : s + self.block_rows]
            else:
                host = host_tensor(read_block(self.xb, s, s + self.block_rows))
                if self.device.type == "cuda":
                    host = host.pin_memory()
                block = host.to(self.device, non_blocking=True).to(self.dtype)
                release_pages(self.xb)
            if self.precision == "fp16" and self.device.type == "cpu":
                block = block.to(torch.float16).to(torch.float32)
            yield s, block

    def _buffer(self, q: torch.Tensor) -> Optional[torch.Tensor]:
        """One scores buffer for every block of a scan on the CPU (fresh pages for each block's scores
        cost more than the GEMM writes); None on a GPU, whose allocator reuses its blocks."""
        if self.device.type != "cpu" or q.dtype != torch.float32:
            return None
        return torch.empty(len(q) * min(self.block_rows, self.ntotal), dtype=torch.float32)

    def _scan_topk(self, q: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query's best ``L`` rows by device score, descending: (float32[b, L], int64[b, L])."""
        vals, idx, width = [], [], 0
        buf = self._buffer(q)
        for s, block in self._blocks():
            v, i = block_topk(_scores(q, block, buf), L, GROUP)
            vals.append(v)
            idx.append(i + s)
            width += v.shape[1]
            if width >= 4 * L and len(vals) > 1:  # merge now and then: memory stays bounded
                v, i = _merge(vals, idx, L)
                vals, idx, width = [v], [i], v.shape[1]
        return _merge(vals, idx, L)

    def _scan_heap(self, q: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`_scan_topk`, each block's scores pushed into FAISS's per-query heaps (CPU)."""
        faiss = load_faiss()
        heap = faiss.ResultHeap(len(q), L, keep_max=True)
        buf = self._buffer(q)
        for s, block in self._blocks():
            S = np.ascontiguousarray(_scores(q, block, buf).numpy())
            heap.heaps.addn(S.shape[1], faiss.swig_ptr(S), s, 0, len(q))
        heap.finalize()
        return torch.from_numpy(heap.D), torch.from_numpy(heap.I)

    def describe(self) -> dict:
        """What the footer's ``search`` record holds."""
        return {
            "index": "flat",
            "factory": "Flat",
            "exact": True,
            "params": {},
            "overfetch": 1.0,
            "gpu": self.device.type == "cuda",
            "blocked": self.gallery is None,
            "backend": "torch",
            "device": str(self.device),
            "precision": self.precision,
            "memory": self.memory,
        }

    def measured(self) -> dict:
        """The selection kernels' race and the seconds per stage so far (for the footer and ``-v``):
        search (the device's scan and the wait for it), rerank (exact scores on the host)."""
        return {"kernels": self.race.describe(), "seconds": self.clock.snapshot()}


class Launched:
    """One scan's results, copied to the host when :meth:`result` is asked (on a GPU, into pinned
    memory without waiting for the device)."""

    def __init__(
        self, idx: torch.Tensor, bound: torch.Tensor, count: torch.Tensor, qnorm: np.ndarray, L: int, trimmed: bool
    ):
        cuda = idx.device.type == "cuda"
        self.L, self.qnorm, self.trimmed = L, qnorm, trimmed
        self.rows = self.bound = None
        self.saturated = 0
        width = L if cuda else int(count.max())  # no device sync on a GPU
        self._idx = _to_host(idx[:, :width], cuda)
        self._bound = _to_host(bound.to(torch.float64), cuda)
        self._count = _to_host(count, cuda)
        self._event = torch.cuda.Event() if cuda else None
        if self._event is not None:
            self._event.record()

    def result(self) -> "Launched":
        """Wait for the device: rows int64[b, w] (-1 pads), bound float64[b] in the queries' scale."""
        if self.rows is None:
            if self._event is not None:
                self._event.synchronize()
            count = self._count.numpy()
            width = int(count.max()) if count.size else 0
            self.rows = np.ascontiguousarray(self._idx.numpy()[:, :width], np.int64)
            self.bound = self._bound.numpy() * self.qnorm  # back from unit queries to the queries' scale
            self.saturated = int((count >= self.L).sum()) if self.trimmed else 0
        return self


def block_topk(S: torch.Tensor, L: int, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """The best ``L`` columns of each row of ``S`` (float32[b, R]), unordered: (values, int64 columns).

    With ``group`` > 1 the columns are read in groups of ``group``: the best ``L`` groups by their
    maximum hold every column above the L-th best value (a group left out has ``L`` kept groups
    whose maxima are at least its own, so ``L`` kept values at least as large as any of its
    columns), so one top-k over those groups' columns (and the tail that makes no whole group)
    returns the true best ``L`` values; ties at the L-th may go either way, as in any top-k. The
    top-k then scans R / group maxima and L x group columns instead of R."""
    b, R = S.shape
    if L >= R:  # a copy: S may be a reused buffer
        return S.clone(), torch.arange(R, device=S.device).expand(b, R)
    whole = R - R % group
    if group <= 1 or whole // group <= 2 * L:
        return torch.topk(S, L, dim=1, sorted=False)
    groups = S[:, :whole].unfold(1, group, group)  # [b, R / group, group], a view
    _, best = torch.topk(groups.amax(-1), L, dim=1, sorted=False)
    cols = (best[:, :, None] * group + torch.arange(group, device=S.device)).reshape(b, -1)
    if whole < R:
        cols = torch.cat([cols, torch.arange(whole, R, device=S.device).expand(b, R - whole)], 1)
    v, j = torch.topk(S.gather(1, cols), L, dim=1, sorted=False)
    return v, cols.gather(1, j)


def _scores(q: torch.Tensor, block: torch.Tensor, buf: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q @ block.T as float32[b, rows] (into ``buf``'s memory when given, for float32 operands):
    fp16/bf16 GEMMs on a GPU write float32 (summed in float32)."""
    if buf is not None and q.dtype == torch.float32 and block.dtype == torch.float32:
        return torch.mm(q, block.T, out=buf[: len(q) * len(block)].view(len(q), len(block)))
    if q.dtype != torch.float32 and q.device.type == "cuda":
        try:
            return torch.mm(q, block.T, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass
    return torch.mm(q, block.T).float()


def _merge(vals: list, idx: list, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best ``L`` of several (values, rows) lists of the same queries, descending."""
    v = torch.cat(vals, 1) if len(vals) > 1 else vals[0]
    i = torch.cat(idx, 1) if len(idx) > 1 else idx[0]
    top, j = torch.topk(v, min(L, v.shape[1]), dim=1, sorted=True)
    return top, i.gather(1, j)


def host_tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor over ``a``'s memory (read-only arrays too: no caller writes to the tensor)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def _to_host(x: torch.Tensor, cuda: bool) -> torch.Tensor:
    if not cuda:
        return x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    out.copy_(x, non_blocking=True)
    return out


_reductions = {"users": 0, "saved": None}
_reductions_lock = threading.Lock()


@contextlib.contextmanager
def _full_precision_sums(device: torch.device):
    """On a GPU whose torch lacks float32 output for fp16/bf16 GEMMs, cuBLAS may sum split-K parts in
    the low precision; that is switched off while any search runs (counted across threads)."""
    if device.type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    with _reductions_lock:
        if _reductions["users"] == 0:
            _reductions["saved"] = (m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction)
            m.allow_fp16_reduced_precision_reduction = False
            m.allow_bf16_reduced_precision_reduction = False
        _reductions["users"] += 1
    try:
        yield
    finally:
        with _reductions_lock:
            _reductions["users"] -= 1
            if _reductions["users"] == 0:
                m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction = _reductions[
                    "saved"
                ]
