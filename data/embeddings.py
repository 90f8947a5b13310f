"""Embedding arrays: the Arrow column <-> float32[n, d], unit-norm checks, and galleries memory-mapped
from a row-aligned ``.npy`` (read block by block, pages released, so a gallery larger than memory
is mined at bounded RSS)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from cir_mine.data.atomic import atomic_path
from cir_mine.data.cores import usable_cores
from cir_mine.data.errors import DataError, SchemaError
from cir_mine.data.validate import NORM_TOLERANCE


def embedding_array(emb: np.ndarray) -> pa.FixedSizeListArray:
    """float32[n, d] -> fixed_size_list<float32>[d] without a Python loop."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, d = emb.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=pa.float32()), d)


def embedding_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """fixed_size_list<float32>[d] column -> float32[n, d] (one copy at most)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    d = col.type.list_size
    if col.null_count:
        raise ValueError("null embeddings")
    flat = col.flatten()  # honours slice offsets
    return flat.to_numpy(zero_copy_only=False).reshape(-1, d)


def embedding_rows(opened, column: str, path: Path) -> np.ndarray:
    """The fixed_size_list<float32>[d] ``column`` of an open Parquet file (``opened``:
    :class:`~cir_mine.data.parquet.OpenParquet`) as one float32[rows, d] array that numpy owns,
    filled row group by row group, the row groups decoded on one thread per core. SchemaError
    (naming ``path``) when a row is null.

    Owned by numpy rather than viewed in Arrow's buffer: numpy asks the kernel for huge pages for
    large arrays (``madvise``), and the gathers that score candidate rows run about 25% faster on
    them than on 4 KiB pages (docs/benchmarks.md, "Reading a workspace"); filled by row groups, the
    read holds the array and a row group's Arrow buffers per thread, not the column twice."""
    meta = opened.file.metadata
    d = opened.file.schema_arrow.field(column).type.list_size
    out = np.empty((meta.num_rows, d), np.float32)
    starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
    threads = max(1, min(usable_cores(), meta.num_row_groups))

    def fill(part: int) -> None:
        f = opened.file if part == 0 else opened.reader()
        for i in range(part, meta.num_row_groups, threads):
            at = int(starts[i])
            for chunk in f.read_row_group(i, columns=[column], use_threads=False).column(0).chunks:
                if chunk.null_count:
                    raise SchemaError(f"{path}: column '{column}' has null rows.")
                out[at : at + len(chunk)] = chunk.flatten().to_numpy().reshape(-1, d)
                at += len(chunk)
            if at != starts[i + 1]:
                raise SchemaError(
                    f"{path}: row group {i} holds {at - starts[i]} embeddings for {meta.row_group(i).num_rows} rows."
                )

    if threads == 1:
        fill(0)
    else:
        with ThreadPoolExecutor(threads, thread_name_prefix="cir-mine-read") as pool:
            for done in [pool.submit(fill, t) for t in range(threads)]:
                done.result()
    return out


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    n = np.linalg.norm(x, axis=axis, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32, copy=False)


def check_embeddings(emb: np.ndarray, path: Path, column: str, ids: Sequence[str]) -> None:
    """Raise SchemaError when ``emb`` has NaN/inf rows or rows that are not unit length."""
    if emb.shape[0] == 0:
        return
    # float32/float16 squares summed in float64 cannot overflow: a row's norm is finite iff its values are
    norms = np.sqrt(np.einsum("ij,ij->i", emb, emb, dtype=np.float64))
    finite = np.isfinite(norms) if emb.dtype in (np.float32, np.float16) else np.isfinite(emb).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise SchemaError(
            f"{path}: column '{column}' has {bad.size} row(s) with NaN or inf values "
            f"(first: {ids[bad[0]]!s}). Re-embed those items or drop them."
        )
    off = np.abs(norms - 1.0) > NORM_TOLERANCE
    if off.any():
        bad = np.flatnonzero(off)
        raise SchemaError(
            f"{path}: column '{column}' has {bad.size} row(s) that are not L2-normalized "
            f"(first: {ids[bad[0]]!s} with norm {norms[bad[0]]:.4f}). Normalize the embeddings "
            f"(x / ||x||) before writing the workspace."
        )


def open_embeddings(path: Path, n: int, gallery_path: Path) -> np.ndarray:
    """Memory-map a row-aligned ``float32[n, d]`` / ``float16[n, d]`` ``.npy`` (read-only)."""
    try:
        emb = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise SchemaError(
            f"{path}: not a readable .npy array ({e}). Rewrite it with `cir-mine index npy`.", params=("npy",)
        ) from None
    if emb.ndim != 2 or emb.dtype not in (np.float32, np.float16) or emb.shape[0] != n:
        raise SchemaError(
            f"{path}: holds {emb.dtype}{list(emb.shape)} but {gallery_path} has {n} rows; expected "
            f"float32 or float16 [{n}, d], row r = gallery row r. Rewrite it with `cir-mine index npy`.",
            params=("npy",),
        )
    advise_random(emb)
    return emb


def _mapping(x):
    """The ``mmap`` behind a memory-mapped array (or a view of one), else None."""
    m = getattr(x, "_mmap", None)
    if m is None and isinstance(getattr(x, "base", None), np.memmap):
        m = getattr(x.base, "_mmap", None)
    return m


def advise_random(x) -> None:
    """Tell the kernel that a memory-mapped gallery is read at random rows (MADV_RANDOM): a gathered
    row then faults in its own page only, not the 64-128 KiB of read-ahead and fault-around that
    would fill RSS and page cache with neighbours nobody asked for. Block scans use
    :func:`read_block`, which asks for their read-ahead explicitly."""
    import mmap

    m = _mapping(x)
    if m is not None and hasattr(m, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        try:
            m.madvise(mmap.MADV_RANDOM)
        except (OSError, ValueError):
            pass


def read_block(x, start: int, stop: int, dtype=np.float32) -> np.ndarray:
    """Rows ``start:stop`` of ``x`` as a contiguous in-memory array. For a memory-mapped array the
    range is first read ahead at once (MADV_WILLNEED), so a sequential scan of a gallery opened with
    :func:`advise_random` still reads large blocks instead of one page per fault."""
    import mmap

    m = _mapping(x)
    view = x[start:stop]
    if m is not None and hasattr(m, "madvise") and hasattr(mmap, "MADV_WILLNEED") and view.size:
        try:
            base = np.frombuffer(m, np.uint8).ctypes.data
            lo = view.ctypes.data - base
            lo -= lo % mmap.PAGESIZE
            m.madvise(mmap.MADV_WILLNEED, lo, min(len(m), view.ctypes.data - base + view.nbytes) - lo)
        except (OSError, ValueError, TypeError):
            pass
    return np.ascontiguousarray(view, dtype=dtype)


def release_pages(x) -> None:
    """Drop the resident pages of a memory-mapped array from this process (the page cache keeps
    them), so scanning or gathering from a gallery larger than memory does not grow RSS."""
    import mmap

    m = _mapping(x)
    if m is not None and hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            m.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


def write_embeddings_npy(emb_blocks, n: int, dim: int, path: Path, dtype=np.float32) -> None:
    """Write ``n`` rows arriving as blocks of float[b, dim] into a ``.npy`` atomically (bounded memory)."""
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n, dim))
        with open(tmp, "r+b") as fh:  # reserve the blocks: a full disk is an error here, not a SIGBUS later
            os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
        s = 0
        for block in emb_blocks:
            out[s : s + len(block)] = block
            s += len(block)
            out.flush()
            release_pages(out)
        if s != n:
            raise DataError(f"{path}: got {s} rows for {n}.")
        del out


def array_bytes(a: np.ndarray) -> memoryview:
    """The bytes of ``a`` in C order as a view, for a hash: the same bytes as ``a.tobytes()`` without
    the copy (hashing a 1M x 256 float32 gallery: 0.95 s against 1.6 s)."""
    return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
