"""Building an inner-product index over a gallery, and where FAISS puts it.

A FAISS index goes to the GPU only when ``faiss.get_num_gpus() > 0`` and the caller did not ask for
the CPU (:func:`use_gpu`); the choice is logged. All indexes are inner-product (cosine on unit vectors).
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from cir_mine.data.errors import UsageError
from cir_mine.data.workspace import read_block, release_pages
from cir_mine.miner.core.search.exact import flat_cut
from cir_mine.miner.core.search.faiss_api import load_faiss

log = logging.getLogger(__name__)

NAMED_FACTORIES = {
    "flat": "Flat",
    "ivf": "IVF{nlist},Flat",
    "ivfpq": "IVF{nlist},PQ{m}",
    "hnsw": "HNSW32,Flat",
}


def sample_rows(m: int, n: int, seed: int, salt: int) -> np.ndarray:
    """A seeded sorted sample of ``min(n, m)`` of ``range(m)`` (a stream per ``salt``)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(salt)])
    return np.sort(rng.choice(m, size=min(int(n), m), replace=False)).astype(np.int64)


DEVICES = ("auto", "cpu", "cuda")  # what a ``device`` parameter accepts (and 'cuda:N')


def check_device(device: str) -> None:
    """UsageError unless ``device`` is 'auto', 'cpu', 'cuda' or 'cuda:N'."""
    ok = isinstance(device, str) and (device in DEVICES or (device.startswith("cuda:") and device[5:].isdigit()))
    if not ok:
        raise UsageError(f"device {device!r}: use auto, cpu or cuda.", params=("device",))


def use_gpu(device: str = "auto") -> bool:
    """Whether a FAISS index goes to the GPU: when ``device`` is not 'cpu' and the installed FAISS
    sees a GPU (FAISS GPU is optional; which device 'auto' and 'cuda' mean is the one device rule's,
    ``cir_mine.miner.accel.device.choose_device``, which the callers above the core apply)."""
    check_device(device)
    if device == "cpu":
        return False
    faiss = load_faiss()
    return (faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0) > 0


def factory_string(spec: str, n: int, dim: int) -> str:
    """'flat'|'ivf'|'ivfpq'|'hnsw' or a FAISS factory string -> a factory string."""
    if spec in NAMED_FACTORIES:
        nlist = max(1, min(4096, int(4 * np.sqrt(max(n, 1)))))
        # PQ sub-vectors of at least 4 dimensions (d=512 -> 64, d=32 -> 8): 1-d codebooks waste bits.
        m = next((m for m in (64, 32, 16, 8, 4, 2) if dim % m == 0 and dim // m >= 4), 1)
        return NAMED_FACTORIES[spec].format(nlist=nlist, m=m)
    return spec


# Training of an IVF index's coarse quantizer: sampled points per list, k-means iterations.
TRAIN_PER_LIST = 64
KMEANS_ITERS = 10
ADD_BLOCK = 65_536  # rows added to an index at a time (a memory-mapped gallery's pages released after each)


def check_spec(spec: str, n: int, dim: int) -> str:
    """The factory string of ``spec`` over ``n`` vectors of ``dim``; UsageError, before anything is
    built or written, when FAISS cannot build it or it has more lists than vectors."""
    faiss = load_faiss()
    fs = factory_string(spec, n, dim)
    try:
        index = faiss.index_factory(dim, fs, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise UsageError(
            f"index {spec!r}: FAISS cannot build {fs!r} ({str(e).splitlines()[0]}).", params=("index",)
        ) from None
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and ivf.nlist > n:
        raise UsageError(
            f"index {spec!r}: {fs!r} has {ivf.nlist} lists but the gallery has {n} images; FAISS "
            f"needs at least one training vector per list. Use index flat, or IVF{max(1, n // 39)},Flat.",
            params=("index",),
        )
    return fs


def build_index(
    xb: np.ndarray,
    spec: str = "flat",
    device: str = "auto",
    fp16: bool = False,
    seed: int = 0,
    train_sample: Optional[int] = None,
    add: bool = True,
):
    """The one index builder: an inner-product index over ``xb`` (float32[n, d], may be memory-mapped).

    ``spec``: 'flat' | 'ivf' | 'ivfpq' | 'hnsw' or a FAISS factory string (:func:`factory_string`).
    An index that needs training is trained on a seeded sample of ``train_sample`` rows (default
    TRAIN_PER_LIST per inverted list, at least 65,536; every row when there are fewer), an IVF
    coarse quantizer by KMEANS_ITERS k-means iterations. Rows are added in blocks of ADD_BLOCK
    (``add=False``: trained and empty, for shards that add their own rows). Flat and IVF indexes go
    to the GPU when FAISS sees one (:func:`use_gpu`; ``fp16``: float16 storage there); HNSW stays on the CPU.
    -> the index (CPU or GPU)."""
    faiss = load_faiss()
    n, d = xb.shape
    fs = factory_string(spec, n, d)
    try:
        index = faiss.index_factory(d, fs, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise UsageError(
            f"index {spec!r}: FAISS cannot build {fs!r} ({str(e).splitlines()[0]}).", params=("index",)
        ) from None
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and hasattr(faiss.downcast_index(ivf), "do_polysemous_training"):
        # Polysemous training (on by default for IVFPQ) takes minutes on a few thousand vectors
        # and only serves Hamming-filtered search, which nothing here uses.
        faiss.downcast_index(ivf).do_polysemous_training = False
    if not index.is_trained:
        _train(index, ivf, xb, spec, fs, seed, train_sample)
    gpu = "HNSW" not in fs and use_gpu(device)
    if gpu:
        co = faiss.GpuClonerOptions()
        co.useFloat16 = bool(fp16)
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index, co)
    if add:
        add_rows(index, xb)
    log.info("FAISS index %s on %s (n=%d, d=%d)", fs, "GPU" if gpu else "CPU", n, d)
    return index


def _train(index, ivf, xb: np.ndarray, spec: str, fs: str, seed: int, train_sample: Optional[int]) -> None:
    """Train ``index`` on a seeded sample of ``xb`` (see :func:`build_index`)."""
    n = xb.shape[0]
    nlist = int(ivf.nlist) if ivf is not None else 1
    if ivf is not None:
        # k-means of the coarse quantizer on TRAIN_PER_LIST points per list (FAISS's default of
        # 256 costs about half an hour of CPU at 1M x 256 with 4000 lists; the lists only route
        # the search, whose recall is tuned and measured, and re-ranking is exact)
        ivf.cp.niter = KMEANS_ITERS
        ivf.cp.max_points_per_centroid = TRAIN_PER_LIST
    ntrain = min(n, int(train_sample) if train_sample else max(TRAIN_PER_LIST * nlist, 65_536))
    rows = np.arange(n) if ntrain >= n else sample_rows(n, ntrain, seed, 7)
    x = np.ascontiguousarray(xb[rows], np.float32)
    try:
        if exact_lists(index, ivf) and len(x) >= nlist:
            ivf.quantizer.add(exact_kmeans(x, nlist, KMEANS_ITERS, seed, bool(ivf.cp.spherical)))
        index.train(x)  # a filled flat quantizer is kept: FAISS trains the codes (PQ, SQ) alone
    except RuntimeError as e:
        raise UsageError(
            f"index {spec!r}: FAISS cannot train {fs!r} on {n} vectors "
            f"({str(e).splitlines()[0][:160]}). Use index flat or a smaller factory string.",
            params=("index",),
        ) from None
    release_pages(xb)


NEAREST_MARGIN = 1  # a row's second-best centroid fetched (a near-tie at the first fetches 4 more)
SPLIT_EPS = 1.0 / 1024  # an empty cluster takes the largest one's centroid, both moved apart by this share


def exact_lists(index, ivf) -> bool:
    """Whether ``index`` is an IVF on the CPU with a flat inner-product quantizer (not wrapped in a
    transform): trained and filled by exact assignment (:func:`exact_kmeans`, :func:`add_rows`)."""
    faiss = load_faiss()
    if ivf is None or not isinstance(faiss.downcast_index(index), faiss.IndexIVF):
        return False
    q = faiss.downcast_index(ivf.quantizer)
    return isinstance(q, faiss.IndexFlat) and q.metric_type == faiss.METRIC_INNER_PRODUCT


def nearest_list(centroids: np.ndarray, x: np.ndarray, flat=None) -> np.ndarray:
    """Each row's centroid of largest exact score, ties by the lower one (:func:`flat_cut`), so that
    no BLAS kernel, thread count or batch moves a row to another list. -> int64[n]."""
    if flat is None:
        flat = load_faiss().IndexFlatIP(centroids.shape[1])
        flat.add(np.ascontiguousarray(centroids, np.float32))
    out = np.empty(len(x), np.int64)
    for s in range(0, len(x), ADD_BLOCK):
        out[s : s + ADD_BLOCK] = flat_cut(flat, centroids, x[s : s + ADD_BLOCK], 1, margin=NEAREST_MARGIN)[1][:, 0]
    return out


def exact_kmeans(x: np.ndarray, nlist: int, niter: int, seed: int, spherical: bool = True) -> np.ndarray:
    """Inner-product k-means centroids of ``x`` (float32[n, d], n >= nlist) whose bits no BLAS
    kernel or thread count changes: seeded initial rows, each iteration's assignment by
    :func:`nearest_list`, each centroid the float64 sum of its rows in row order (a sum over the
    rows' axis adds them one by one) over their count, and each empty cluster given half of the
    largest one (FAISS's split, without its random draw); ``spherical`` (FAISS's setting for an
    inner-product IVF): each centroid then scaled to unit norm, its squared norm summed one
    dimension after another in float64. -> float32[nlist, d]."""
    n, d = x.shape
    cent = x[sample_rows(n, nlist, seed, 11)].copy()
    apart = np.where(np.arange(d) % 2 == 0, 1.0, -1.0).astype(np.float32) * np.float32(SPLIT_EPS)
    for _ in range(niter):
        assign = nearest_list(cent, x)
        order = np.argsort(assign, kind="stable")
        counts = np.bincount(assign, minlength=nlist)
        xs, ends = x[order], np.cumsum(counts)
        for c in np.flatnonzero(counts):
            cent[c] = (xs[ends[c] - counts[c] : ends[c]].sum(axis=0, dtype=np.float64) / counts[c]).astype(np.float32)
        for ci in np.flatnonzero(counts == 0):
            cj = int(np.argmax(counts))
            if counts[cj] < 2:
                break
            cent[ci], cent[cj] = cent[cj] * (1 + apart), cent[cj] * (1 - apart)
            counts[ci] = counts[cj] // 2
            counts[cj] -= counts[ci]
        if spherical:
            c64, sq = cent.astype(np.float64), np.zeros(nlist)
            for j in range(d):
                sq += c64[:, j] * c64[:, j]
            cent = (c64 / np.where(sq > 0, np.sqrt(sq), 1.0)[:, None]).astype(np.float32)
    return cent


def add_rows(index, xb: np.ndarray) -> None:
    """Add the rows of ``xb`` to ``index`` in blocks of ADD_BLOCK (a memory-mapped gallery's pages
    released after each): an IVF with a flat quantizer (:func:`exact_lists`) takes each row into
    its :func:`nearest_list` (``add_core`` with the lists given, as FAISS contrib's
    ``add_preassigned``), any other index assigns them itself."""
    faiss = load_faiss()
    ivf = faiss.try_extract_index_ivf(index)
    exact = exact_lists(index, ivf)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist) if exact else None
    for s in range(0, xb.shape[0], ADD_BLOCK):
        block = np.ascontiguousarray(read_block(xb, s, s + ADD_BLOCK), np.float32)
        if exact:  # FAISS contrib's add_preassigned: add_core with the lists given
            lists = np.ascontiguousarray(nearest_list(centroids, block, ivf.quantizer), np.int64)
            ivf.add_core(len(block), faiss.swig_ptr(block), None, faiss.swig_ptr(lists))
        else:
            index.add(block)
        release_pages(xb)
