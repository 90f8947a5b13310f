"""Building an inner-product index over a gallery, and the one GPU rule.

One GPU rule: GPU FAISS is used only when ``faiss.get_num_gpus() > 0`` and the caller did not
ask for the CPU; the choice is logged. All indexes are inner-product (cosine on unit vectors).
"""
from __future__ import annotations

import logging

import numpy as np

from cir_mine.data.errors import UsageError
from cir_mine.data.workspace import read_block, release_pages
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



def use_gpu(device: str = "auto") -> bool:
    """The one GPU rule: 'cpu' never, 'cuda' required, 'auto' when FAISS sees a GPU."""
    faiss = load_faiss()
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device == "cpu":
        return False
    if device == "cuda":
        if n == 0:
            raise UsageError("device cuda: FAISS sees no GPU. Install the 'gpu' extra on a GPU machine, or use device cpu.",
                             params=("device",))
        return True
    if device != "auto":
        raise UsageError(f"unknown device {device!r}: use auto, cpu or cuda.")
    return n > 0


def factory_string(spec: str, n: int, dim: int) -> str:
    """'flat'|'ivf'|'ivfpq'|'hnsw' or a FAISS factory string -> a factory string."""
    if spec in NAMED_FACTORIES:
        nlist = max(1, min(4096, int(4 * np.sqrt(max(n, 1)))))
        # PQ sub-vectors of at least 4 dimensions (d=512 -> 64, d=32 -> 8): 1-d codebooks waste bits.
        m = next((m for m in (64, 32, 16, 8, 4, 2) if dim % m == 0 and dim // m >= 4), 1)
        return NAMED_FACTORIES[spec].format(nlist=nlist, m=m)
    return spec


def build_index(xb: np.ndarray, spec: str = "flat", device: str = "auto", fp16: bool = False):
    """Build an inner-product index over ``xb`` (float32[n, d]); returns a CPU or GPU index."""
    faiss = load_faiss()
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    n, d = xb.shape
    fs = factory_string(spec, n, d)
    try:
        index = faiss.index_factory(d, fs, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise UsageError(f"--index {spec!r}: FAISS cannot build {fs!r} ({str(e).splitlines()[0]}).") from None
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and hasattr(faiss.downcast_index(ivf), "do_polysemous_training"):
        # Polysemous training (on by default for IVFPQ) takes minutes on a few thousand vectors
        # and only serves Hamming-filtered search, which nothing here uses.
        faiss.downcast_index(ivf).do_polysemous_training = False
    gpu = use_gpu(device)
    if gpu:
        co = faiss.GpuClonerOptions()
        co.useFloat16 = bool(fp16)
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index, co)
    log.info("FAISS index %s on %s (n=%d, d=%d)", fs, "GPU" if gpu else "CPU", n, d)
    if not index.is_trained:
        if n < 39 * max(1, getattr(faiss.extract_index_ivf(index), "nlist", 1) if "IVF" in fs else 1):
            log.warning("few training points for %s", fs)
        index.train(xb)
    index.add(xb)
    return index


# Training of an IVF index's coarse quantizer: sampled points per list, k-means iterations.
TRAIN_PER_LIST = 64
KMEANS_ITERS = 10


def approximate_index(xb: np.ndarray, spec: str, device: str = "auto", fp16: bool = False, seed: int = 0):
    """Build an approximate index ('ivf' | 'ivfpq' | 'hnsw' | FAISS factory) over ``xb``: trained on a
    seeded sample of at most TRAIN_PER_LIST points per list (at least 65,536), rows added in blocks (``xb`` may be memory-mapped).
    HNSW stays on the CPU (FAISS has no GPU HNSW); flat and IVF follow the one GPU rule."""
    faiss = load_faiss()
    n, d = xb.shape
    fs = factory_string(spec, n, d)
    try:
        index = faiss.index_factory(d, fs, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise UsageError(f"--index {spec!r}: FAISS cannot build {fs!r} ({str(e).splitlines()[0]}).") from None
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and hasattr(faiss.downcast_index(ivf), "do_polysemous_training"):
        faiss.downcast_index(ivf).do_polysemous_training = False
    if not index.is_trained:
        nlist = int(ivf.nlist) if ivf is not None else 1
        if ivf is not None:
            # k-means of the coarse quantizer on TRAIN_PER_LIST points per list (FAISS's default of
            # 256 costs about half an hour of CPU at 1M x 256 with 4000 lists; the lists only route
            # the search, whose recall is tuned and measured, and re-ranking is exact)
            ivf.cp.niter = KMEANS_ITERS
            ivf.cp.max_points_per_centroid = TRAIN_PER_LIST
        ntrain = min(n, max(TRAIN_PER_LIST * nlist, 65_536))
        rows = np.arange(n) if ntrain >= n else sample_rows(n, ntrain, seed, 7)
        try:
            index.train(np.ascontiguousarray(xb[rows], np.float32))
        except RuntimeError as e:
            raise UsageError(f"--index {spec!r}: FAISS cannot train {fs!r} on {n} vectors "
                             f"({str(e).splitlines()[0][:160]}). Use --index flat or a smaller factory string.") from None
        release_pages(xb)
    gpu = ivf is not None and "HNSW" not in fs and use_gpu(device)
    if gpu:
        co = faiss.GpuClonerOptions()
        co.useFloat16 = bool(fp16)
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index, co)
    step = 65_536
    for s in range(0, n, step):
        index.add(read_block(xb, s, s + step))
        release_pages(xb)
    log.info("FAISS index %s on %s (n=%d, d=%d)", fs, "GPU" if gpu else "CPU", n, d)
    return index, fs

