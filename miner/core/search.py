"""FAISS primitives over a gallery: build, save/load (atomic), batched search with bounded memory.

One GPU rule: GPU FAISS is used only when ``faiss.get_num_gpus() > 0`` and the caller did not
ask for the CPU; the choice is logged. All indexes are inner-product (cosine on unit vectors).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from cir_mine.data.errors import DataError, UsageError
from cir_mine.data.io import atomic_path, write_json_atomic
from cir_mine.data.workspace import read_block, release_pages  # noqa: F401  (re-exported for the miner)

log = logging.getLogger(__name__)


NAMED_FACTORIES = {
    "flat": "Flat",
    "ivf": "IVF{nlist},Flat",
    "ivfpq": "IVF{nlist},PQ{m}",
    "hnsw": "HNSW32,Flat",
}



def _faiss():
    import faiss  # imported lazily: it is heavy and pulls in OpenMP

    return faiss



def use_gpu(device: str = "auto") -> bool:
    """The one GPU rule: 'cpu' never, 'cuda' required, 'auto' when FAISS sees a GPU."""
    faiss = _faiss()
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
    faiss = _faiss()
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



def to_cpu(index):
    faiss = _faiss()
    return faiss.index_gpu_to_cpu(index) if hasattr(index, "getDevice") else index



def save_index(index, path: str | Path, meta: dict) -> None:
    """Write the index and ``{path}.json`` (dimension, count, factory, gallery hash) atomically."""
    faiss = _faiss()
    path = Path(path)
    with atomic_path(path) as tmp:
        faiss.write_index(to_cpu(index), str(tmp))
    write_json_atomic(path.with_suffix(path.suffix + ".json"), meta)



def load_index(path: str | Path, device: str = "auto"):
    faiss = _faiss()
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: index not found. Build it with `cir-mine index --work WORK --split SPLIT`.")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise DataError(f"{path}: not a readable FAISS index ({str(e).splitlines()[0]}).") from None
    if use_gpu(device):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index



def index_meta(path: str | Path) -> dict:
    p = Path(path)
    p = p.with_suffix(p.suffix + ".json")
    if not p.exists():
        return {}
    try:
        meta = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: malformed index metadata ({e}). Rebuild the index with cir-mine index.") from None
    if not isinstance(meta, dict):
        raise DataError(f"{p}: malformed index metadata (expected a JSON object). Rebuild the index with "
                        f"cir-mine index.")
    return meta



def search_batched(index, xq: np.ndarray, k: int, batch_size: int = 4096,
                   progress: Optional[Callable[[int], None]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Search ``xq`` (float32[nq, d]) in batches: returns (D float32[nq, k], I int64[nq, k]).

    Memory beyond the outputs is one batch of distances; results equal one big search.
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



def brute_force_search(xb: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference implementation (tests): full score matrix, stable descending sort."""
    S = xq @ xb.T
    I = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(S, I, axis=1), I



def gallery_fingerprint(image_ids, categories, emb: np.ndarray, block_rows: int = 65_536) -> str:
    """First 16 hex digits of SHA-256 over the gallery's ids, categories and embedding bytes
    (read in blocks of rows, so a memory-mapped gallery is never loaded whole)."""
    import hashlib

    h = hashlib.sha256()
    for chunk in _id_bytes(categories, image_ids):
        h.update(chunk)
    for s in range(0, emb.shape[0], block_rows):
        h.update(read_block(emb, s, s + block_rows).tobytes())
        release_pages(emb)
    return h.hexdigest()[:16]






def _id_bytes(categories, image_ids, block_rows: int = 1 << 20):
    """The bytes of "{category}\\0{image_id}\\0" for every row, in blocks (built in Arrow, not per row)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from cir_mine.data.rows import string_array

    n = len(image_ids)
    for s in range(0, n, block_rows):
        c, i = string_array(categories[s:s + block_rows]), string_array(image_ids[s:s + block_rows])
        if c.null_count or i.null_count:        # not a validated gallery: spell each value as Python does
            yield "".join(f"{a}\0{b}\0" for a, b in zip(c.to_pylist(), i.to_pylist())).encode()
            continue
        joined = pc.binary_join_element_wise(c.cast(i.type), i, pa.scalar("", i.type), "\0")
        wide = pa.types.is_large_string(joined.type)
        off = np.frombuffer(joined.buffers()[1], np.int64 if wide else np.int32)[joined.offset:joined.offset + len(joined) + 1]
        yield joined.buffers()[2][int(off[0]):int(off[-1])].to_pybytes()


def check_index(index, gallery, index_path, gallery_path, gallery_hash: Optional[str] = None,
                fix: str = "Rebuild it with `cir-mine index`") -> None:
    """DataError unless ``index`` was built from ``gallery`` (same d, same rows, same hash when known)."""
    if index.d != gallery.dim or index.ntotal != len(gallery):
        raise DataError(f"{index_path}: the index has d={index.d} and {index.ntotal} rows but {gallery_path} "
                        f"has d={gallery.dim} and {len(gallery)} rows. {fix}.")
    if gallery_hash:
        now = gallery_fingerprint(gallery.id_array, gallery.category_array, gallery.embeddings)
        if now != gallery_hash:
            raise DataError(f"{index_path}: built from another gallery (hash {gallery_hash}, {gallery_path} has "
                            f"{now}). {fix}.")

