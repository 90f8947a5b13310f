"""Search back-ends behind one interface.

A back-end is any object with

  ``search(xq float32[b, d], k) -> (D float32[b, k], I int64[b, k])``  rows by descending score,
                                                                     -1 / -inf pads
  ``ntotal``, ``d``                                                   gallery rows, dimension
  ``exact``                                                           True when I is the exact top-k
  ``describe() -> dict``                                              what the table's footer records

and optionally ``search_ahead(xq, k, deep) -> (D, I, later)``: the exact top-k now and
``later(positions) -> (D, I)``, the exact top-deep of those queries, from the same fetch (the
miner's reserve, ``miner.core.schedule.search_ahead``).

:class:`ExactSearch` (exact top-k over the gallery, in memory or memory-mapped) and :class:`Reranked`
(any ``.search`` source, such as an IVF, IVF-PQ or HNSW index or a sharded engine, over-fetched and
re-scored exactly) live here; anything a caller passes that keeps the contract works the same.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Callable, Optional, Sequence

import numpy as np

from cir_mine.data.errors import DataError, UsageError
from cir_mine.data.progress import Progress
from cir_mine.data.workspace import release_pages
from cir_mine.miner.core.search.build import build_index, use_gpu
from cir_mine.miner.core.search.exact import (
    cut_depth,
    exact_cut,
    exact_rescore,
    faiss_topk,
    fetched_bound,
    gemm_topk,
    max_row_norm,
)
from cir_mine.miner.core.search.faiss_api import load_faiss
from cir_mine.miner.core.search.measure import Clock, KernelRace
from cir_mine.miner.core.search.lists import (
    ListLayout,
    coarse_assign,
    flat_centroids,
    ivf_flat_lists,
    list_major_search,
)
from cir_mine.miner.core.search.params import SEARCH_PARAM, cpu_ivf, faiss_nlist, index_kind, set_search_params

# Tuned settings (docs/search.md, "Tuned settings"): past this share of a first-pass batch short at the
# reserve depth, the later batches are searched at the deepest depth at once
FLAT_DEEP_SHARE = 0.25  # exact search: its deepest search costs about 1.2x the reserve's
LISTS_DEEP_SHARE = 0.25  # list-major IVF: about 1.2x (both probing the deep nprobe, see Reranked.beam_for)
LISTS_RACE_SHARE = 4  # list-major IVF's kernel race: the list kernel on 1/4 of the raced batch


class ExactSearch:
    """The exact top-k by :func:`~cir_mine.miner.core.search.exact.gathered_dot` score (``cheap_depth``:
    a search costs about the same at any depth, so the miner searches deeper than it mines and keeps
    the rest for short queries).

    Candidates come from one of the CPU kernels, whichever this machine runs faster for the batch's
    shape, its exact re-scoring included (:class:`~cir_mine.miner.core.search.measure.KernelRace`):
    FAISS's flat search (:func:`faiss_topk`), numpy's GEMM into FAISS's heaps (:func:`gemm_topk`),
    or a ``scans`` kernel handed in from above the core (name -> object with ``prepare(row_norm)``
    and ``scan(xq, depth, k) -> (bound, rows)``, exact_cut's fetch contract for a cut at k: the
    device rule's factory adds the bfloat16 scan,
    :class:`~cir_mine.miner.accel.bf16.Bf16Scan`); with a FAISS that sees a GPU
    (:func:`~cir_mine.miner.core.search.build.use_gpu`; ``fp16`` storage optional), a flat FAISS
    index there. They scan the gallery in blocks of ``block_rows`` (a memory-mapped gallery,
    ``blocked``, releases each block's pages), and the cut is decided on exact scores
    (:func:`exact_cut`), so the rows never depend on the kernel, the batch or the CPU."""

    exact = True
    cheap_depth = True
    deep_share = FLAT_DEEP_SHARE
    KERNELS = {"faiss": faiss_topk, "gemm": gemm_topk}

    def __init__(
        self,
        xb: np.ndarray,
        device: str = "auto",
        fp16: bool = False,
        block_rows: int = 262_144,
        blocked: Optional[bool] = None,
        kernels: Optional[Sequence[str]] = None,
        scans: Optional[dict] = None,
    ):
        self.xb = xb
        self.ntotal, self.d = int(xb.shape[0]), int(xb.shape[1])
        self.block_rows = int(block_rows)
        self.blocked = isinstance(xb, np.memmap) if blocked is None else bool(blocked)
        self.gpu = not self.blocked and use_gpu(device)
        self.fp16 = bool(fp16)
        self.index = build_index(xb, "flat", device=device, fp16=fp16) if self.gpu else None
        self.scans = dict(scans or {})
        if kernels is None:  # the GEMM kernel last: OpenBLAS's threads spin on after it returns
            kernels = ("faiss", *self.scans, "gemm")
        known = sorted([*self.KERNELS, *self.scans])
        unknown = sorted(set(kernels) - set(known))
        if unknown or not kernels:
            raise UsageError(f"kernels {list(kernels)!r}: choose among {known}.", params=("kernels",))
        self.race = KernelRace(["gpu"] if self.gpu else list(kernels))
        self.clock = Clock()
        self._row_norm: Optional[float] = None
        self._ready: set = set()  # the scans prepared
        self._scan_lock = threading.Lock()

    @property
    def row_norm(self) -> float:
        if self._row_norm is None:
            self._row_norm = max_row_norm(self.xb, self.block_rows)
        return self._row_norm

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact top-``k`` of each query (float32[b, d]) over the gallery."""
        xq = np.ascontiguousarray(xq, np.float32)
        k = int(min(k, self.ntotal))

        self._prepare_scans(len(xq))

        def fetch(q: np.ndarray, depth: int):
            return self.race.run(len(q), depth, lambda kernel, part: self._scored(kernel, xq[q[part]], depth, k))

        return exact_cut(self.xb, xq, k, fetch, self.ntotal, self.row_norm, self.extra_gap, self.clock)

    @property
    def extra_gap(self) -> float:
        """exact_cut's extra_gap: float16 storage on the GPU rounds every row."""
        return 2.0**-11 if self.gpu and self.fp16 else 0.0

    def search_ahead(self, xq: np.ndarray, k: int, deep: int) -> tuple:
        """(D, I, later): the exact top-``k`` of each query, and ``later(sel) -> (D, I)`` the exact
        top-``deep`` of the queries ``sel`` (positions in ``xq``), from the same fetch: the rows
        past the cut at k are re-scored only for the queries asked for."""
        xq = np.ascontiguousarray(xq, np.float32)
        k, deep = int(min(k, self.ntotal)), int(min(deep, self.ntotal))
        self._prepare_scans(len(xq))
        held = {}  # the deep cut's (bound, rows) of every query, from the first fetch

        def fetch(q: np.ndarray, depth: int):
            if held or len(q) < len(xq):  # the queries the bound could not settle: fetched again
                return self.race.run(len(q), depth, lambda kernel, part: self._scored(kernel, xq[q[part]], depth, k))
            depth = int(min(self.ntotal, cut_depth(deep)))
            got = self.race.run(len(q), depth, lambda kernel, part: self._ahead(kernel, xq[q[part]], depth, k, deep))
            held["cut"] = got[3:]
            return got[:3]

        D, I = exact_cut(self.xb, xq, k, fetch, self.ntotal, self.row_norm, self.extra_gap, self.clock)

        def later(sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            sel = np.asarray(sel, np.int64)
            first = [(held["cut"][0][sel], held["cut"][1][sel])] if held else []

            def fetch_deep(q: np.ndarray, depth: int):
                if first and len(q) == len(sel):
                    return first.pop()
                return self.race.run(
                    len(q), depth, lambda kernel, part: self._scored(kernel, xq[sel[q[part]]], depth, deep)
                )

            return exact_cut(self.xb, xq[sel], deep, fetch_deep, self.ntotal, self.row_norm, self.extra_gap, self.clock)

        return D, I, later

    def _ahead(self, kernel: str, xq: np.ndarray, depth: int, k: int, deep: int) -> tuple:
        """(bound, D, I, deep bound, deep rows): a kernel's candidates for the cuts at ``deep`` and
        at ``k`` from one fetch ``depth`` deep, those of the cut at k re-scored exactly."""
        t = time.perf_counter()
        if kernel in self.scans:
            deep_bound, deep_rows, bound, rows = self._scan(kernel)(xq, depth, deep, near=k)
        else:
            D, I = self._fetched(kernel, xq, depth)
            w = min(depth, cut_depth(k))
            deep_bound, deep_rows = fetched_bound(D, depth, self.ntotal), I
            bound, rows = fetched_bound(D, w, self.ntotal), I[:, :w]
        t1 = time.perf_counter()
        D1, I1 = exact_rescore(self.xb, xq, rows, k)
        self.clock.add("search", t1 - t)
        self.clock.add("rerank", time.perf_counter() - t1)
        return bound, D1, I1, deep_bound, deep_rows

    def _prepare_scans(self, nq: int) -> None:
        """The scan kernels' gallery copies, made before a search of ``nq`` queries (outside the
        race's timing)."""
        for name in self.race.names:
            if name in self.scans and nq:
                self.clock.timed("search", self._scan, name)

    def _scan(self, name: str):
        """A scan kernel, prepared (its gallery copy made) on first use."""
        with self._scan_lock:
            if name not in self._ready:
                self.scans[name].prepare(self.row_norm)
                self._ready.add(name)
        return self.scans[name]

    def _scored(self, kernel: str, xq: np.ndarray, depth: int, k: int) -> tuple:
        """(bound, D, I): a kernel's candidates re-scored exactly (both timed, and raced together:
        the bfloat16 scan returns more candidates than the others)."""
        t = time.perf_counter()
        bound, rows = self._candidates(kernel, xq, depth, k)
        t1 = time.perf_counter()
        D, I = exact_rescore(self.xb, xq, rows, k)
        self.clock.add("search", t1 - t)
        self.clock.add("rerank", time.perf_counter() - t1)
        return bound, D, I

    def _candidates(self, kernel: str, xq: np.ndarray, depth: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(bound float64[b], rows int64[b, L]): exact_cut's fetch contract for these queries, cut
        at ``k``."""
        if kernel in self.scans:
            return self._scan(kernel)(xq, depth, k)
        D, I = self._fetched(kernel, xq, depth)
        return fetched_bound(D, depth, self.ntotal), I

    def _fetched(self, kernel: str, xq: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(D, I): the approximate top-``depth`` of FAISS's flat search, the GEMM kernel or the GPU."""
        if kernel == "gpu":
            return self.index.search(xq, depth)
        return self.KERNELS[kernel](xq, self.xb, depth, self.block_rows, release=self.blocked)

    def describe(self) -> dict:
        return {
            "index": "flat",
            "factory": "Flat",
            "exact": True,
            "params": {},
            "overfetch": 1.0,
            "gpu": bool(self.gpu),
            "blocked": bool(self.blocked),
        }

    def measured(self) -> dict:
        """The kernel race and the seconds per stage so far (for the footer and ``-v``)."""
        return {"kernels": self.race.describe(), "seconds": self.clock.snapshot()}


class Reranked:
    """Candidates from ``source`` (``.search(xq, k) -> (D, I)``), over-fetched to ``ceil(k * overfetch)``
    and scored exactly against ``xb``: every returned score is the float32 dot product, only which
    rows come back is approximate.

    A CPU IVF index is searched with each query's lists chosen by exact centroid scores
    (:func:`coarse_assign`), so a query probes the same lists in any batch. An IVF-Flat index (full
    vectors) returns the exact top-k among the rows of those lists, its candidates fetched by the
    faster of FAISS's own search and the list-major kernel (:func:`list_major_search`) and the cut
    decided on exact scores; compressed codes (PQ, SQ) are ranked by FAISS and their ``overfetch``
    best re-ranked exactly. A flat FAISS index gives the exact top-k like :class:`ExactSearch`."""

    exact = False

    def __init__(self, source, xb: np.ndarray, overfetch: float = 1.0, info: Optional[dict] = None):
        if overfetch < 1:
            raise UsageError(f"overfetch must be at least 1 (got {overfetch}).", params=("overfetch",))
        self.source, self.xb, self.overfetch = source, xb, float(overfetch)
        self.ntotal, self.d = int(source.ntotal), int(source.d)
        self.info = dict(info or {})
        self.kind = index_kind(source) if hasattr(source, "is_trained") else "other"
        self.gpu = hasattr(source, "getDevice")
        self.ivf = cpu_ivf(source) if self.kind == "ivf" else None  # searched with exact coarse assignment
        self.lists = (
            ivf_flat_lists(source) if self.ivf is not None else None
        )  # full vectors: exact top-k of the probed rows
        self.layout = None  # its ListLayout, built on first use
        # list-major pays for batches that share lists; FAISS's per-query scan for a few queries.
        # The list kernel's cost per query falls with the queries that meet each list, so it races
        # on a quarter of a batch (LISTS_RACE_SHARE), FAISS on a sixteenth
        self.race = KernelRace(("lists", "faiss"), small="faiss", shares={"lists": LISTS_RACE_SHARE})
        self.clock = Clock()
        self._centroids, self._row_norm = None, None
        self.reference = None  # the exact search its tuning measured against, kept for a recall check

    @property
    def cheap_depth(self) -> bool:
        """Deeper searches cost about the same (IVF lists with full vectors, flat): an HNSW search
        widens its beam with k and a PQ re-rank gathers k x over-fetch rows, so those are not."""
        return self.overfetch == 1 and self.kind in ("ivf", "flat")

    @property
    def deep_share(self) -> Optional[float]:
        """LISTS_DEEP_SHARE for list-major IVF (see ExactSearch.deep_share); None for other sources."""
        return LISTS_DEEP_SHARE if self.lists is not None and self.cheap_depth else None

    def layout_of(self) -> "ListLayout":
        if self.layout is None:
            self.layout = ListLayout.of(self.lists)
        return self.layout

    def centroids(self) -> Optional[np.ndarray]:
        if self._centroids is None:
            self._centroids = self.layout_of().centroids if self.lists is not None else flat_centroids(self.ivf)
        return self._centroids

    def fetch_depth(self, k: int) -> int:
        return int(min(self.ntotal, math.ceil(k * self.overfetch)))

    def search(self, xq: np.ndarray, k: int, nprobe: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """The top ``k`` of each query (float32[b, d]); ``nprobe``: an IVF's lists per query for this
        search (default: the tuned value, deeper searches probing more, see :meth:`beam_for`)."""
        xq = np.ascontiguousarray(xq, np.float32)
        k = int(min(k, self.ntotal))
        kf = self.fetch_depth(k)
        probes = int(nprobe) if nprobe is not None else self._probes(kf) if self.ivf is not None else 0
        if self.lists is not None:
            D, I = self._search_lists(xq, k, probes)
        elif self.ivf is not None:
            D, I = self._rerank(xq, k, lambda: self._preassigned(xq, kf, *self._assign(xq, probes)[::-1]))
        elif self.kind == "flat":
            D, I = self._search_flat(xq, k)
        else:
            deeper = self.deep_params(kf)
            D, I = self._rerank(
                xq, k, lambda: self.source.search(xq, kf, params=deeper) if deeper else self.source.search(xq, kf)
            )
        release_pages(self.xb)
        if D.shape[1] < k:  # the source returned fewer than k rows
            pad = k - D.shape[1]
            D = np.pad(D, ((0, 0), (0, pad)), constant_values=-np.inf)
            I = np.pad(I, ((0, 0), (0, pad)), constant_values=-1)
        return D, I

    def _rerank(self, xq: np.ndarray, k: int, fetch: Callable) -> tuple[np.ndarray, np.ndarray]:
        """The source's candidates (``fetch() -> (D, I)``) scored exactly, the best ``k`` kept."""
        _, I = self.clock.timed("search", fetch)
        return self.clock.timed("rerank", exact_rescore, self.xb, xq, np.asarray(I, np.int64), k)

    def _probes(self, fetch: int) -> int:
        deeper = self.beam_for(fetch)
        return int(deeper) if deeper is not None else int(self.ivf.nprobe)

    def _assign(self, xq: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        return self.clock.timed("search", coarse_assign, self.ivf, xq, nprobe, self.centroids())

    def _search_lists(self, xq: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact top-``k`` among the rows of each query's ``nprobe`` lists."""
        layout = self.layout_of()
        Dq, Iq = self._assign(xq, nprobe)
        total = np.where(Iq >= 0, layout.sizes[np.maximum(Iq, 0)], 0).sum(1)

        def fetch(q: np.ndarray, depth: int):
            D, I = self.race.run(
                len(q),
                depth,
                lambda kernel, part: self._list_candidates(kernel, xq[q[part]], Iq[q[part]], Dq[q[part]], depth),
            )
            return fetched_bound(D, depth, total[q], ordered=False), I

        return exact_cut(self.xb, xq, k, fetch, total, layout.row_norm, clock=self.clock)

    def _list_candidates(self, kernel: str, xq: np.ndarray, Iq: np.ndarray, Dq: np.ndarray, depth: int):
        if kernel == "lists":  # in no order: exact_cut re-scores and sorts them
            return list_major_search(self.lists, xq, depth, Iq, self.layout_of(), ordered=False)
        return self._preassigned(xq, depth, Iq, Dq)

    def _preassigned(self, xq: np.ndarray, k: int, Iq: np.ndarray, Dq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's search of the lists ``Iq`` (int64[nq, p], scores ``Dq``) of each query, top ``k``
        (the probe count passed with the call, so concurrent searches never share a setting)."""
        faiss = load_faiss()
        n = len(xq)
        Iq = np.ascontiguousarray(Iq, np.int64)
        Dq = np.ascontiguousarray(Dq, np.float32)
        D = np.empty((n, k), np.float32)
        I = np.empty((n, k), np.int64)
        if n:
            ptr = faiss.swig_ptr
            self.ivf.search_preassigned_c(
                n,
                ptr(xq),
                k,
                ptr(Iq),
                ptr(Dq),
                ptr(D),
                ptr(I),
                False,
                faiss.SearchParametersIVF(nprobe=int(Iq.shape[1])),
            )
        return D, I

    def _search_flat(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """A flat FAISS index: the exact top-``k`` (its own scores fetch the candidates)."""
        if self._row_norm is None:
            self._row_norm = max_row_norm(self.xb)

        def fetch(q: np.ndarray, depth: int):
            D, I = self.source.search(xq[q], depth)
            return fetched_bound(D, depth, self.ntotal), I

        extra = 2.0**-11 if self.gpu else 0.0  # a GPU index may store float16 rows
        return exact_cut(self.xb, xq, k, fetch, self.ntotal, self._row_norm, extra, self.clock)

    def beam_for(self, fetch: int) -> Optional[int]:
        """The search parameter (efSearch or nprobe) for a search ``fetch`` rows deep, or None for
        the index's own setting.

        Recall was tuned at one depth (``info["depth"]``); deepening searches further. An HNSW beam
        of max(efSearch, k) would fall to k there, and an IVF search probing as few lists finds a
        smaller share of the deeper neighbours, so the tuned parameter-to-depth ratio is kept (IVF:
        at most every list). When the tuning also measured the deepest depth a run searches
        (``info["deep"]``: a back-end whose deeper searches cost about the same, which a run
        searches ahead and mines at the shallower depths from those rows), every search up to that
        depth takes its value: a query's rows then never depend on how deep its batch was searched.
        Past it, its ratio. CPU indexes only: a GPU index keeps its setting."""
        tuned = self.info.get("depth")
        params = self.info.get("params") or {}
        name = SEARCH_PARAM.get(self.kind)
        if not tuned or not name or not params.get(name) or hasattr(self.source, "getDevice"):
            return None
        base = self.fetch_depth(int(tuned))
        deep = self.info.get("deep") or {}
        deep_value = (deep.get("params") or {}).get(name)
        deep_fetch = self.fetch_depth(int(deep.get("depth") or 0))
        if deep_value and deep_fetch > base:
            value = int(deep_value if fetch <= deep_fetch else math.ceil(deep_value * fetch / deep_fetch))
        elif fetch <= base:
            return None
        else:
            value = int(math.ceil(params[name] * fetch / base))
        if name == "nprobe":
            faiss = load_faiss()
            if not isinstance(faiss.downcast_index(self.source), faiss.IndexIVF):
                return None  # a wrapped IVF (pre-transform, ...) keeps its nprobe
            value = min(value, faiss_nlist(self.source))
        return value

    def deep_params(self, fetch: int):
        """FAISS search parameters for :meth:`beam_for`'s value, or None."""
        value = self.beam_for(fetch)
        if value is None:
            return None
        faiss = load_faiss()
        return (
            faiss.SearchParametersHNSW(efSearch=value)
            if self.kind == "hnsw"
            else faiss.SearchParametersIVF(nprobe=value)
        )

    def set_params(self, params: dict) -> None:
        set_search_params(self.source, params)
        self.info["params"] = dict(params)

    def describe(self) -> dict:
        return {"params": {}, **self.info, "exact": bool(self.exact), "overfetch": self.overfetch}

    def measured(self) -> dict:
        """The kernel race and the seconds per stage so far (for the footer and ``-v``)."""
        return {"kernels": self.race.describe(), "seconds": self.clock.snapshot()}


def search_batched(
    index, xq: np.ndarray, k: int, batch_size: int = 4096, progress: Progress = None
) -> tuple[np.ndarray, np.ndarray]:
    """Search ``xq`` (float32[nq, d]) in batches: returns (D float32[nq, k], I int64[nq, k]).

    Memory beyond the outputs is one batch of distances; results equal one big search (``progress``:
    see :mod:`cir_mine.data.progress`, queries searched).
    """
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    nq = xq.shape[0]
    k = int(min(k, index.ntotal))
    D = np.empty((nq, k), dtype=np.float32)
    I = np.empty((nq, k), dtype=np.int64)
    for s in range(0, nq, batch_size):
        e = min(nq, s + batch_size)
        D[s:e], I[s:e] = index.search(xq[s:e], k)
        if progress:
            progress(e - s)
    return D, I


def check_backend(backend, n: int, d: int, what: str) -> None:
    if int(backend.ntotal) != n or int(backend.d) != d:
        raise DataError(
            f"{what}: the search back-end has d={backend.d} and {backend.ntotal} rows but the gallery "
            f"has d={d} and {n} rows. Pass a back-end built over this gallery."
        )
