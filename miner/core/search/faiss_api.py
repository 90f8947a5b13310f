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
800 over 100k x 256; no difference at depth 400 and below).
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

SCORE_SIMD_LEVEL = "AVX2"  # FAISS's SIMD level for every exact score (None: FAISS's own choice)
FAISS_DEFAULT_BLOCK = 1_024  # gallery rows per GEMM of FAISS's flat search, FAISS's own default

_pinned = False
_lock = threading.Lock()


def load_faiss():
    """The ``faiss`` module, its SIMD level pinned (see the module's docstring)."""
    import faiss

    global _pinned
    if not _pinned:
        with _lock:
            if not _pinned:
                _pin_simd(faiss)
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
