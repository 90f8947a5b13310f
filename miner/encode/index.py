"""A workspace's saved FAISS index: (re)build ``index.{split}.faiss`` from its gallery, load and check it.

The FAISS primitives (build, search, save/load, where an index lives) live in :mod:`cir_mine.miner.core.search`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional


from cir_mine.data.errors import DataError, UsageError
from cir_mine.miner.core.search.build import build_index, check_spec, factory_string, use_gpu
from cir_mine.miner.core.search.persist import check_index, gallery_fingerprint, index_meta, load_index, save_index

log = logging.getLogger(__name__)


def load_workspace_index(ws, split: str, gallery=None, device: str = "auto"):
    """Load ``index.{split}.faiss`` and check it still matches ``gallery.{split}.parquet``."""
    path = ws.index_path(split)
    index = load_index(path, device)
    meta = index_meta(path)
    check_index(
        index,
        gallery if gallery is not None else ws.gallery(split),
        path,
        ws.gallery_path(split),
        meta.get("gallery_hash"),
        f"Rebuild it with `cir-mine index work={ws.root} split={split}`",
        ("work", "split"),
        meta.get("gallery_file"),
    )
    return index


def write_gallery_npy(ws, split: str, dtype: str = "float32") -> Path:
    """Write ``gallery.{split}.npy`` (float32 or float16 [n, d], row r = gallery row r) from the
    gallery's ``embedding`` column, row group by row group, so mining can memory-map it."""
    import numpy as np
    import pyarrow.parquet as pq

    from cir_mine.data.workspace import embedding_numpy, write_embeddings_npy

    if dtype not in ("float32", "float16"):
        raise UsageError(f"npy_dtype {dtype!r}: use float32 or float16.", params=("npy_dtype",))
    src = ws.gallery_path(split)
    pf = pq.ParquetFile(src)
    if "embedding" not in pf.schema_arrow.names:
        raise DataError(f"{src}: has no 'embedding' column to write {ws.embeddings_path(split).name} from.")
    n, dim = pf.metadata.num_rows, pf.schema_arrow.field("embedding").type.list_size
    blocks = (embedding_numpy(b.column(0)) for b in pf.iter_batches(batch_size=65_536, columns=["embedding"]))
    write_embeddings_npy(blocks, n, dim, ws.embeddings_path(split), np.dtype(dtype))
    return ws.embeddings_path(split)


def index_workspace(
    work: str | Path,
    split: str,
    spec: str = "flat",
    device: str = "auto",
    fp16: bool = False,
    lock: bool = True,
    npy: Optional[str] = None,
) -> dict:
    """(Re)build ``index.{split}.faiss`` from ``gallery.{split}.parquet``; returns the saved meta.

    Meta (``index.{split}.faiss.json``): factory, metric, dim, gallery_rows, gallery_hash, gallery_file
    (the gallery file's digest, when it is one file), gpu, fp16.
    Row ``r`` of the index is row ``r`` of the gallery table. ``lock=False`` when the caller
    already holds the workspace lock. ``npy`` ('float32' | 'float16'): also write the row-aligned
    ``gallery.{split}.npy`` that mining memory-maps (first, so the index is built from it).
    """
    from cir_mine.data.io import transaction, write_job
    from cir_mine.data.workspace import Workspace

    from cir_mine.miner.accel.device import choose_device

    choose_device(device)  # the one device rule: 'cuda' needs a GPU (FAISS builds there if it can)
    ws = Workspace(work)
    ws.require()
    with write_job(ws.root, "cir-mine index") if lock else transaction():
        if npy:
            write_gallery_npy(ws, split, npy)
        return _index_workspace(ws, split, spec, device, fp16)


def _index_workspace(ws, split: str, spec: str, device: str, fp16: bool) -> dict:
    g = ws.versioned_gallery(split)
    if len(g) == 0:
        raise DataError(f"{ws.gallery_path(split)}: the gallery is empty; nothing to index.")
    check_spec(spec, len(g), g.dim)
    index = build_index(g.embeddings, spec, device=device, fp16=fp16)
    meta = {
        "spec": spec,
        "factory": factory_string(spec, len(g), g.dim),
        "metric": "inner_product",
        "dim": g.dim,
        "gallery_rows": len(g),
        "gallery_hash": gallery_fingerprint(g.id_array, g.category_array, g.embeddings),
        "gallery": ws.gallery_path(split).name,
        **({"gallery_file": g.file_digest} if g.file_digest else {}),
        "gpu": use_gpu(device),
        "fp16": bool(fp16),
    }
    save_index(index, ws.index_path(split), meta)
    return meta
