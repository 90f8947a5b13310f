"""IVF-Flat search list by list: each inverted list meets all the queries that probe it in one GEMM
(the shape of FAISS contrib's big-batch search), and where each gallery row sits in a query's probe order."""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from cir_mine.miner.core.search.faiss_api import load_faiss
from cir_mine.miner.core.search.measure import core_pool
from cir_mine.miner.core.search.exact import exact_rescore, flat_cut, max_row_norm
from cir_mine.miner.core.search.topk import topk_desc

try:  # the compiled selection (miner/core/search/_lists.c); without it, top_positions segment by segment
    from cir_mine.miner.core.search import _lists as KERNEL
except ImportError:  # pragma: no cover - the extension is optional
    KERNEL = None


def ivf_flat_lists(index):
    """The bare CPU ``IndexIVFFlat`` (inner product, array inverted lists) inside ``index``, whose
    lists :func:`list_major_search` can read as float32 blocks in place; None for any other index
    (PQ or SQ codes, a pre-transform, a GPU index, L2, on-disk lists)."""
    faiss = load_faiss()
    if hasattr(index, "getDevice"):
        return None
    ivf = faiss.downcast_index(index)
    if type(ivf) is not faiss.IndexIVFFlat or ivf.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None
    if type(faiss.downcast_InvertedLists(ivf.invlists)) is not faiss.ArrayInvertedLists:
        return None
    return ivf


LIST_MAJOR_SCORES = 1 << 26  # candidate scores one list-major pass holds (256 MB of float32)


@dataclass
class ListLayout:
    """Where an IVF-Flat index's vectors sit: list sizes, and every list's ids back to back."""

    # fmt: off
    sizes: np.ndarray          # int64[nlist] vectors per list
    starts: np.ndarray         # int64[nlist] offset of each list in ``ids``
    ids: np.ndarray            # int64[ntotal] gallery row of every vector, list by list
    row_norm: float = 1.0      # the largest norm of a stored vector
    centroids: Optional[np.ndarray] = None   # float32[nlist, d] of an inner-product flat quantizer (None: another quantizer)
    spare: list = field(default_factory=list, repr=False)   # score buffers not in use, reused from search to search
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # fmt: on

    @contextlib.contextmanager
    def buffer(self, n: int):
        """A float32 buffer of ``n`` scores owned by the caller until the block ends (searches in
        other threads get other buffers; first-touching fresh pages costs more than the scatter
        into them, so buffers are kept for the next search)."""
        with self.lock:
            buf = self.spare.pop() if self.spare else np.empty(0, np.float32)
        if buf.size < n:
            buf = np.empty(n, np.float32)
        try:
            yield buf[:n]
        finally:
            with self.lock:
                self.spare.append(buf)

    @classmethod
    def of(cls, ivf) -> "ListLayout":
        faiss = load_faiss()
        invl = faiss.downcast_InvertedLists(ivf.invlists)
        sizes = np.array([invl.list_size(i) for i in range(ivf.nlist)], np.int64)
        starts = np.cumsum(sizes) - sizes
        ids = np.empty(int(sizes.sum()), np.int64)
        norm = 0.0
        for i in np.flatnonzero(sizes).tolist():
            ids[starts[i] : starts[i] + sizes[i]] = faiss.rev_swig_ptr(invl.get_ids(i), int(sizes[i])).view(np.int64)
            X = _list_vectors(faiss, invl, i, int(sizes[i]), int(ivf.d))
            norm = max(norm, max_row_norm(X))
        return cls(sizes, starts, ids, norm, flat_centroids(ivf))


def _list_vectors(faiss, invl, li: int, size: int, d: int) -> np.ndarray:
    """The float32[size, d] vectors of list ``li``, read in place."""
    return faiss.rev_swig_ptr(invl.get_codes(li), size * d * 4).view(np.float32).reshape(size, d)


def flat_centroids(ivf) -> Optional[np.ndarray]:
    """float32[nlist, d]: the centroids of an IVF whose coarse quantizer is a CPU inner-product flat
    index (the factory's default), or None."""
    faiss = load_faiss()
    q = faiss.downcast_index(ivf.quantizer)
    if type(q) is not faiss.IndexFlatIP:
        return None
    return np.ascontiguousarray(q.reconstruct_n(0, q.ntotal), np.float32)


def coarse_assign(
    ivf, xq: np.ndarray, nprobe: int, centroids: Optional[np.ndarray] = None, clock=None
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``nprobe`` lists, by exact score against the centroids (ties by the lower list):
    the same lists whatever the batch, where the quantizer's own batched search may break a near-tie
    at the cut either way. An IVF with another kind of quantizer keeps the quantizer's own search.
    -> (scores float32[nq, nprobe], lists int64[nq, nprobe])."""
    nprobe = int(max(1, min(nprobe, ivf.nlist)))
    xq = np.ascontiguousarray(xq, np.float32)
    if centroids is None:
        return ivf.quantizer.search(xq, nprobe)
    return flat_cut(ivf.quantizer, centroids, xq, nprobe, clock)


@contextlib.contextmanager
def one_blas_thread():
    """BLAS limited to one thread while any search in the process needs it (entered once for the
    process, however many threads enter: nested entries from two threads cannot restore each other's
    limit out of order)."""
    global _BLAS_USERS, _BLAS_LIMIT
    with _BLAS_LOCK:
        if _BLAS_USERS == 0:
            from threadpoolctl import threadpool_limits

            _BLAS_LIMIT = threadpool_limits(limits=1, user_api="blas")
        _BLAS_USERS += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_USERS -= 1
            if _BLAS_USERS == 0:
                _BLAS_LIMIT.restore_original_limits()
                _BLAS_LIMIT = None


_BLAS_LOCK = threading.Lock()
_BLAS_USERS = 0
_BLAS_LIMIT = None


def list_major_search(
    ivf,
    xq: np.ndarray,
    k: int,
    assign: np.ndarray,
    layout: ListLayout,
    budget: int = LIST_MAJOR_SCORES,
    ordered: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Candidates of an IVF-Flat search list by list (the shape of FAISS contrib's big-batch search):
    the queries are bucketed by the lists they probe (``assign``: int64[nq, p], from
    :func:`coarse_assign`; -1 slots probe nothing) and each list's vectors, read in place, meet all
    of its queries in one float32 GEMM. Each query's scores are collected and its top ``k`` kept by
    partition: every list is read once per pass instead of once per query and no heap is kept, so a
    batch runs at BLAS speed instead of memory speed. Queries go in passes of at most ``budget``
    collected scores, one pass at a time, each pass's lists and then its queries split between
    FAISS's thread count of workers (so that a list meets every query of the pass that probes it).
    The scores are BLAS sums whose last bits depend on the batch; :func:`exact_cut` decides the cut.
    -> (D float32[nq, k], I int64[nq, k]) by descending score, -1 / -inf pads (``ordered=False``:
    each query's k in no order, for a caller that re-scores and sorts them itself)."""
    faiss = load_faiss()
    xq = np.ascontiguousarray(xq, np.float32)
    nq = xq.shape[0]
    assign = np.asarray(assign, np.int64)
    D = np.full((nq, k), -np.inf, np.float32)
    I = np.full((nq, k), -1, np.int64)
    if nq == 0 or k == 0:
        return D, I
    sizes = np.where(assign >= 0, layout.sizes[np.maximum(assign, 0)], 0)
    tot = sizes.sum(1)
    ends = np.cumsum(tot)
    invl = faiss.downcast_InvertedLists(ivf.invlists)
    workers = max(1, faiss.omp_get_max_threads())
    # one BLAS thread per worker: its GEMMs are small, and threads of BLAS would spin
    with one_blas_thread():
        q0 = 0
        while q0 < nq:  # queries q0..q1-1, at least one, their scores within the budget
            q1 = max(q0 + 1, int(np.searchsorted(ends, (ends[q0 - 1] if q0 else 0) + budget, side="right")))
            A, C, T = assign[q0:q1], sizes[q0:q1], tot[q0:q1]
            with layout.buffer(int(T.sum())) as buf:
                plan = _list_plan(layout, A, C, T)
                cut = _split(plan.work, workers)
                _each(lambda a, b: _score_lists(faiss, invl, layout, xq[q0:q1], plan, a, b, buf), cut, workers)
                base = np.r_[0, np.cumsum(T)]
                qcut = _split(np.maximum(T, 1), workers)

                def top(a: int, b: int) -> None:
                    seg = buf[base[a] : base[b]]
                    D[q0 + a : q0 + b], I[q0 + a : q0 + b] = _top_of_segments(
                        seg, layout, A[a:b], C[a:b], T[a:b], k, ordered
                    )

                _each(top, qcut, workers)
            q0 = q1
    return D, I


def _each(fn, cut: list, threads: int) -> None:
    """fn(cut[i], cut[i + 1]) for every part of ``cut``: on the process's list-major pool when
    ``threads`` > 1 (its tasks never wait on each other, so searches from two threads may share it),
    else on this thread; returns when all are done."""
    parts = list(zip(cut[:-1], cut[1:]))
    if threads == 1 or len(parts) < 2:
        for a, b in parts:
            fn(a, b)
        return
    pool = core_pool("cir-mine-lists")
    for f in [pool.submit(fn, a, b) for a, b in parts]:
        f.result()


def _split(work: np.ndarray, parts: int) -> list:
    """Bounds of at most ``parts`` consecutive runs of ``work`` (int64[n]) holding about equal sums."""
    if work.size == 0:
        return [0, 0]
    ends = np.cumsum(work)
    at = np.searchsorted(ends, ends[-1] * np.arange(1, parts) / parts, side="right")
    return sorted({0, work.size, *at.tolist()})


@dataclass
class _ListPlan:
    """A pass's (query, probe) slots ordered by list: each list's run of slots and where each slot's
    scores go in the pass's buffer."""

    # fmt: off
    lists: np.ndarray    # int64[g] the list of each run
    bounds: np.ndarray   # int64[g + 1] each run's first slot in ``dst``/``qsel``
    dst: np.ndarray      # int64[slots] each slot's segment start in the buffer, list by list
    qsel: np.ndarray     # int64[slots] each slot's query in the pass
    work: np.ndarray     # int64[g] scores each run computes (list size x its queries)
    # fmt: on


def _list_plan(layout: ListLayout, A: np.ndarray, C: np.ndarray, T: np.ndarray) -> _ListPlan:
    """The plan of a pass: each query's scores against its probed lists' vectors go query after
    query, each query's lists in probe order (a query's segment starts at the sum of the earlier
    ones); empty lists and -1 slots compute nothing."""
    p = A.shape[1]
    off = np.cumsum(C, 1) - C
    base = np.cumsum(T) - T
    flat = A.ravel()
    order = np.argsort(flat, kind="stable")
    lists = flat[order]
    bounds = np.flatnonzero(np.r_[True, lists[1:] != lists[:-1], True])
    starts = bounds[:-1]
    run_lists = lists[starts] if starts.size else np.zeros(0, np.int64)
    sizes = np.where(run_lists >= 0, layout.sizes[np.maximum(run_lists, 0)], 0)
    work = sizes * np.diff(bounds)
    dst = (base[:, None] + off).ravel()[order]
    return _ListPlan(run_lists, bounds, dst, order // p, work)


def _score_lists(faiss, invl, layout: ListLayout, xp: np.ndarray, plan: _ListPlan, g0: int, g1: int, buf) -> None:
    """Fill ``buf`` with the scores of the plan's runs ``g0``..``g1 - 1``: each list's vectors
    against the queries of its run, each query's column into its segment."""
    within = np.arange(int(layout.sizes.max(initial=0)))[:, None]  # row offsets inside a list
    bounds, dst, qsel = plan.bounds, plan.dst, plan.qsel
    for g in range(g0, g1):
        if plan.work[g] == 0:
            continue
        li, a, b = int(plan.lists[g]), int(bounds[g]), int(bounds[g + 1])
        size = int(layout.sizes[li])
        X = _list_vectors(faiss, invl, li, size, xp.shape[1])
        # [size, m] = the list's rows against its queries: OpenBLAS packs the small query side
        # with less work in this orientation; column j goes to query j's segment
        S = X @ xp[qsel[a:b]].T
        if KERNEL is not None:
            KERNEL.scatter(S, size, b - a, dst[a:b], buf)
        else:
            buf[dst[a:b] + within[:size]] = S


def _top_of_segments(
    buf: np.ndarray, layout: ListLayout, A: np.ndarray, C: np.ndarray, T: np.ndarray, k: int, ordered: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``k`` best scores in its segment of ``buf`` and their gallery rows, by descending
    score (``ordered=False``: in no order); -1 / -inf past a query's candidates. A collected position
    maps to a row through the query's own probe slots (an empty slot shares the next one's start:
    the search passes it). The compiled kernel when built, else :func:`top_positions` per query."""
    m, p = A.shape
    off = np.cumsum(C, 1) - C  # each probe slot's start in its query's segment
    seg_start = np.cumsum(T) - T  # each query's segment in buf
    if KERNEL is not None and m:
        D, I = np.empty((m, k), np.float32), np.empty((m, k), np.int64)
        r = int(math.ceil(k / SAMPLE_STRIDE * SAMPLE_OVER)) + SAMPLE_SPARE
        i64 = lambda a: np.ascontiguousarray(a, np.int64)
        KERNEL.top(
            buf, i64(seg_start), i64(T), i64(off), i64(A), layout.starts, layout.ids, m, p, k, SAMPLE_STRIDE, r, D, I
        )
        return topk_desc(D, I, k) if ordered else (D, I)
    D = np.full((m, k), -np.inf, np.float32)
    I = np.full((m, k), -1, np.int64)
    for r in np.flatnonzero(T).tolist():
        n, kk = int(T[r]), min(k, int(T[r]))
        seg = buf[seg_start[r] : seg_start[r] + n]
        pos = top_positions(seg, kk) if kk < n else np.arange(n)
        slot = np.searchsorted(off[r], pos, side="right") - 1
        D[r, :kk], I[r, :kk] = seg[pos], layout.ids[layout.starts[A[r, slot]] + pos - off[r, slot]]
    return topk_desc(D, I, k) if ordered else (D, I)


SAMPLE_STRIDE = 16  # the selection's threshold comes from every this-many-th score of a segment (a cache line)
SAMPLE_OVER = 1.25  # ... at this many times the rank of the k-th best in the sample, plus SAMPLE_SPARE
SAMPLE_SPARE = 8


def top_positions(seg: np.ndarray, k: int) -> np.ndarray:
    """The positions of ``k`` best scores of ``seg`` (float32[n], k < n), in no order: those of a
    full partition, found among the scores at or above a threshold read off a sample (a partition
    of every SAMPLE_STRIDE-th score, then of the few above it), and by the full partition where the
    threshold leaves fewer than ``k``. Ties at the k-th score may keep other positions than the
    full partition keeps; the k-th score is the same."""
    n = seg.size
    sample = seg[::SAMPLE_STRIDE]
    r = int(math.ceil(k / SAMPLE_STRIDE * SAMPLE_OVER)) + SAMPLE_SPARE  # the sample's rank read
    if r < sample.size:
        t = np.partition(sample, sample.size - r)[sample.size - r]
        pos = np.flatnonzero(seg >= t)
        if pos.size >= k:
            return pos[np.argpartition(seg[pos], pos.size - k)[pos.size - k :]] if pos.size > k else pos
    return np.argpartition(seg, n - k)[n - k :]


def probe_positions(ivf, layout: ListLayout, xq: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each gallery row of ``rows`` (int64[b, L], -1 pads), the position of the list that holds
    it in query ``b``'s probe order (0: the list the coarse quantizer ranks first): a search probing
    ``nprobe`` lists scans that row iff its position is below ``nprobe``. -> int32[b, L], -1 for pads."""
    nlist = int(ivf.nlist)
    list_of = np.empty(int(ivf.ntotal), np.int32)
    list_of[layout.ids] = np.repeat(np.arange(nlist, dtype=np.int32), layout.sizes)
    out = np.full(rows.shape, -1, np.int32)
    xq = np.ascontiguousarray(xq, np.float32)
    every = np.arange(nlist, dtype=np.int64)
    for s in range(0, len(xq), 256):
        if layout.centroids is not None:  # every list in probe order: coarse_assign's, without a search
            lists = np.broadcast_to(every, (len(xq[s : s + 256]), nlist))
            _, order = exact_rescore(layout.centroids, xq[s : s + 256], lists, nlist)
        else:
            _, order = coarse_assign(ivf, xq[s : s + 256], nlist, layout.centroids)
        pos = np.full((len(order), nlist), nlist, np.int32)
        np.put_along_axis(pos, np.where(order >= 0, order, 0), np.arange(nlist, dtype=np.int32), 1)
        r = rows[s : s + 256]
        ok = r >= 0
        out[s : s + 256] = np.where(ok, np.take_along_axis(pos, list_of[np.where(ok, r, 0)].astype(np.int64), 1), -1)
    return out
