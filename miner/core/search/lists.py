"""IVF-Flat search list by list: each inverted list meets all the queries that probe it in one GEMM
(the shape of FAISS contrib's big-batch search), and where each gallery row sits in a query's probe order."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from cir_mine.miner.core.search.faiss_api import load_faiss
from cir_mine.miner.core.search.topk import topk_desc


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
        faiss = load_faiss()
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
    faiss = load_faiss()
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

