"""The one way the package reaches FAISS: :func:`load_faiss` (imported lazily: FAISS is heavy and
pulls in OpenMP), and :func:`to_cpu` for an index that may live on a GPU.

FAISS picks its SIMD code path by the CPU (AVX2, AVX-512, ...), and a dot product summed by 8-wide
and by 16-wide vectors rounds differently in the last bits. So that exact scores have the same bits
on every x86-64 CPU, :func:`load_faiss` sets FAISS's level to ``SCORE_SIMD_LEVEL`` (AVX2, which every
x86-64 CPU these tools run on has) unless the ``FAISS_SIMD_LEVEL`` environment variable chooses one.
On other architectures FAISS keeps its own level.

FAISS's flat search scores 1,024 gallery rows per GEMM by default, and keeps a reservoir of 2k
candidates per query that it partitions whenever it fills: at depths near or above the block that
happens every block. :func:`~cir_mine.miner.core.search.exact.faiss_topk` widens the block to 4k rows
for such depths (docs/benchmarks.md, "Exact-search kernels": 1.7x faster at 1,024 queries and depth
800 over 100k x 256 in a run under load, the same within 2% on a quiet run).

FAISS's flat search scores a batch by BLAS GEMMs only from ``distance_compute_blas_threshold``
onwards (faiss-cpu 1.15 compares queries x dimension with 128,000: below 500 queries at d=256); a
smaller batch is scored one query at a time, 6-12x slower per query at 64 to 469 queries over
100k x 256 on the Intel Xeon Processor (docs/benchmarks.md, "Exact-search kernels"). Batches that small are
common here: the kernel race's parts, the queries a deepening pass searches again, a run's last
batch, the recall check's sample. :func:`load_faiss` sets the threshold to ``BLAS_FROM`` so every
batch takes the GEMM path; which path scored a candidate never changes the rows, since every cut is
decided on exact scores (:mod:`cir_mine.miner.core.search.exact`).
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

SCORE_SIMD_LEVEL = "AVX2"  # FAISS's SIMD level for every exact score (None: FAISS's own choice)
FAISS_DEFAULT_BLOCK = 1_024  # gallery rows per GEMM of FAISS's flat search, FAISS's own default
# Tuned setting (docs/search.md, "Tuned settings"): FAISS's flat search uses BLAS from this many
# queries x dimension on (FAISS's distance_compute_blas_threshold; see the module's docstring)
BLAS_FROM = 1

_pinned = False
_lock = threading.Lock()


def load_faiss():
    """The ``faiss`` module, its SIMD level pinned and its flat search on BLAS for every batch
    (see the module's docstring)."""
    import faiss

    global _pinned
    if not _pinned:
        with _lock:
            if not _pinned:
                _pin_simd(faiss)
                faiss.cvar.distance_compute_blas_threshold = BLAS_FROM
                _pinned = True
    return faiss


def _pin_simd(faiss) -> None:
    cfg = getattr(faiss, "SIMDConfig", None)
    level = getattr(faiss, f"SIMDLevel_{SCORE_SIMD_LEVEL}", None) if SCORE_SIMD_LEVEL else None
    if os.environ.get("FAISS_SIMD_LEVEL") or cfg is None or level is None:
        return
    try:
        if cfg.is_simd_level_available(level) and cfg.get_level() != level:
            cfg.set_level(level)
            log.debug("FAISS SIMD level set to %s for exact scores", SCORE_SIMD_LEVEL)
    except (RuntimeError, AttributeError, TypeError):  # a FAISS without runtime dispatch keeps its level
        pass


def to_cpu(index):
    """A CPU copy of a GPU index; a CPU index as it is."""
    faiss = load_faiss()
    return faiss.index_gpu_to_cpu(index) if hasattr(index, "getDevice") else index
