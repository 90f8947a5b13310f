"""Indexes on disk: save and load (atomic), the metadata beside them, the gallery fingerprint an index is
checked against, and reopening the very back-end a negatives table was mined with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from cir_mine.data.embeddings import array_bytes
from cir_mine.data.errors import DataError
from cir_mine.data.io import atomic_path, write_json_atomic
from cir_mine.data.workspace import file_digest, read_block, release_pages
from cir_mine.miner.core.search.backends import ExactSearch, Reranked
from cir_mine.miner.core.search.build import use_gpu
from cir_mine.miner.core.search.faiss_api import load_faiss, to_cpu


def save_index(index, path: str | Path, meta: dict) -> None:
    """Write the index and ``{path}.json`` (dimension, count, factory, gallery hash) atomically."""
    faiss = load_faiss()
    path = Path(path)
    with atomic_path(path) as tmp:
        faiss.write_index(to_cpu(index), str(tmp))
        size = Path(tmp).stat().st_size
    write_json_atomic(path.with_suffix(path.suffix + ".json"), {**meta, "bytes": size})


def load_index(path: str | Path, device: str = "auto", verified: bool = False):
    """The index saved at ``path`` (on the GPU where ``device`` asks). A file of the size its metadata
    records (:func:`save_index`) has its vectors and codes mapped read-only, not copied (FAISS's
    ``IO_FLAG_MMAP_IFC``): searches read them from the page cache, so a 1 GB IVF-Flat opens in
    milliseconds instead of the 1 to 2.5 s of reading it into fresh memory; so is one whose SHA-256
    the caller has checked against the one recorded when it was saved (``verified``). Any other file
    is read whole, which refuses a truncated one (a mapping would not). cir-mine replaces an index
    file only by rename, which leaves a mapping whole."""
    faiss = load_faiss()
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"{path}: index not found. Build it with `cir-mine index work=WORK split=SPLIT`.", params=("work", "split")
        )
    try:
        index = faiss.read_index(str(path), getattr(faiss, "IO_FLAG_MMAP_IFC", 0) if verified or _sized(path) else 0)
    except RuntimeError as e:
        raise DataError(
            f"{path}: not a readable FAISS index ({str(e).splitlines()[0]}). "
            "Rebuild it with `cir-mine index work=WORK split=SPLIT`.",
            params=("work", "split"),
        ) from None
    if use_gpu(device):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


def _sized(path: Path) -> bool:
    """Whether the index file has the size its metadata recorded when it was saved."""
    try:
        return index_meta(path).get("bytes") == path.stat().st_size
    except (DataError, OSError):
        return False


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
        raise DataError(
            f"{p}: malformed index metadata (expected a JSON object). Rebuild the index with cir-mine index."
        )
    return meta


def gallery_fingerprint(image_ids, categories, emb: np.ndarray, block_rows: int = 65_536) -> str:
    """First 16 hex digits of SHA-256 over the gallery's ids, categories and embedding bytes
    (read in blocks of rows, so a memory-mapped gallery is never loaded whole)."""
    import hashlib

    h = hashlib.sha256()
    for chunk in _id_bytes(categories, image_ids):
        h.update(chunk)
    for s in range(0, emb.shape[0], block_rows):
        h.update(array_bytes(read_block(emb, s, s + block_rows)))
        release_pages(emb)
    return h.hexdigest()[:16]


def _id_bytes(categories, image_ids, block_rows: int = 1 << 20):
    """The bytes of "{category}\\0{image_id}\\0" for every row, in blocks (built in Arrow, not per row)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from cir_mine.data.rows import string_array

    n = len(image_ids)
    for s in range(0, n, block_rows):
        c, i = string_array(categories[s : s + block_rows]), string_array(image_ids[s : s + block_rows])
        if c.null_count or i.null_count:  # not a validated gallery: spell each value as Python does
            yield "".join(f"{a}\0{b}\0" for a, b in zip(c.to_pylist(), i.to_pylist())).encode()
            continue
        joined = pc.binary_join_element_wise(c.cast(i.type), i, pa.scalar("", i.type), "\0")
        wide = pa.types.is_large_string(joined.type)
        off = np.frombuffer(joined.buffers()[1], np.int64 if wide else np.int32)[
            joined.offset : joined.offset + len(joined) + 1
        ]
        yield joined.buffers()[2][int(off[0]) : int(off[-1])].to_pybytes()


def check_index(
    index,
    gallery,
    index_path,
    gallery_path,
    gallery_hash: Optional[str] = None,
    fix: str = "Rebuild it with `cir-mine index`",
    params: tuple = (),
    gallery_file: Optional[str] = None,
) -> None:
    """DataError unless ``index`` was built from ``gallery`` (same d, same rows, same hash when known).
    ``gallery_file``: the digest of the gallery file the index was built from (its metadata's
    ``gallery_file``); rows read from a file of that digest (``gallery.file_digest``) are the rows
    the index was built from, so their hash is not computed again."""
    if index.d != gallery.dim or index.ntotal != len(gallery):
        raise DataError(
            f"{index_path}: the index has d={index.d} and {index.ntotal} rows but {gallery_path} "
            f"has d={gallery.dim} and {len(gallery)} rows. {fix}.",
            params=params,
        )
    if gallery_hash and not (gallery_file and getattr(gallery, "file_digest", None) == gallery_file):
        now = gallery_fingerprint(gallery.id_array, gallery.category_array, gallery.embeddings)
        if now != gallery_hash:
            raise DataError(
                f"{index_path}: built from another gallery (hash {gallery_hash}, {gallery_path} has {now}). {fix}.",
                params=params,
            )


def saved_index_path(table_path) -> Path:
    p = Path(table_path)
    return p.with_name(p.name + ".faiss")


def save_backend_index(backend: Reranked, path) -> None:
    """Write the FAISS index behind ``backend`` to ``path`` atomically (CPU form)."""
    with atomic_path(path) as tmp:
        load_faiss().write_index(to_cpu(backend.source), str(tmp))


def reopen(search: dict, xb: np.ndarray, workspace_index, table_path, device: str = "auto", fp16: bool = False):
    """The back-end a negatives table was mined with, from its footer's ``search`` record: the exact
    search, or the very same index file (the workspace's ``index.{split}.faiss`` or the one saved
    beside the table), checked by fingerprint, with the recorded parameters and over-fetch. Nothing
    is re-tuned. ``workspace_index``: the workspace's index path; ``table_path``: the table's."""
    if not search or search.get("exact", True) or search.get("index") in (None, "none", "flat"):
        return ExactSearch(xb, device=device, fp16=fp16)
    if search.get("index") == "workspace":
        path = Path(workspace_index)
        fix = "Re-mine round 0 with `cir-mine negatives`, or restore the index it was mined with"
    elif search.get("file"):
        path = Path(table_path).with_name(search["file"])
        fix = "Re-mine round 0 with `cir-mine negatives` (it saves the index beside the table)"
    else:
        raise DataError(
            f"{table_path}: mined through a {search.get('index')!r} index that was not saved, so later "
            f"rounds cannot search the same one. Re-mine round 0 with `cir-mine negatives out`.",
            params=("out",),
        )
    if not path.exists():
        raise DataError(f"{path}: the index {table_path} was mined with is missing. {fix}.")
    now = file_digest(path)
    if search.get("fingerprint") and now != search["fingerprint"]:
        raise DataError(
            f"{path}: changed since {table_path} was mined (fingerprint {search['fingerprint']}, now {now}). {fix}."
        )
    raw = load_index(
        path, device if index_kind_of_file(search) != "hnsw" else "cpu", verified=bool(search.get("fingerprint"))
    )
    backend = Reranked(
        raw,
        xb,
        float(search.get("overfetch", 1.0)),
        {k: search[k] for k in ("index", "factory", "file", "fingerprint", "depth", "deep") if k in search},
    )
    backend.set_params(dict(search.get("params") or {}))
    return backend


def index_kind_of_file(search: dict) -> str:
    return "hnsw" if "HNSW" in str(search.get("factory", "")) else "other"
