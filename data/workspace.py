"""The workspace: the on-disk contract between every stage (see docs/formats.md).

A workspace directory holds, per split, ``gallery.{split}.parquet`` (or a folder
``gallery.{split}/part-*.parquet`` of row-aligned parts, read as one gallery in part-name order) and
``triplets.{split}.parquet``, optionally ``index.{split}.faiss``, and one ``manifest.json``. Every table is validated on read:
a wrong column, dtype or dimension, or NaN/unnormalized embeddings raise :class:`SchemaError`
naming the file and the column.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cir_mine.data.errors import DataError, SchemaError, UsageError
from cir_mine.data.io import (atomic_path, check_readable_file, discard, is_write_error, make_dirs, read_parquet,
                              read_parquet_schema, replace_dir, side_name, signals_blocked, transaction,
                              write_error, write_json_atomic)
from cir_mine.data.rows import AttrLists, first_duplicate, index_of, join_keys, shared_objects, string_array

SCHEMA_VERSION = 1
NORM_TOLERANCE = 1e-3
SPLIT_RE = re.compile(r"^[A-Za-z0-9_\-]+$")

# Required columns: name -> (predicate on the arrow type, human-readable type).
_STR = (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "string")
_STR_LIST = (
    lambda t: (pa.types.is_list(t) or pa.types.is_large_list(t)) and
    (pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)),
    "list<string>",
)
_EMB = (
    lambda t: pa.types.is_fixed_size_list(t) and pa.types.is_float32(t.value_type),
    "fixed_size_list<float32>[d]",
)

GALLERY_COLUMNS = {"image_id": _STR, "category": _STR, "attributes": _STR_LIST, "embedding": _EMB}
# attribute_scores: parallel to attributes, the zero-shot probability of each entry (NaN for given tags).
_FLOAT_LIST = (
    lambda t: (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_floating(t.value_type),
    "list<float32>",
)
GALLERY_OPTIONAL = {"path": _STR, "attribute_scores": _FLOAT_LIST}
TRIPLET_COLUMNS = {
    "query_id": _STR, "category": _STR, "ref_id": _STR, "target_id": _STR,
    "captions": _STR_LIST, "text_embedding": _EMB,
}
TRIPLET_OPTIONAL = {
    "extra_positive_ids": _STR_LIST, "verified_negative_ids": _STR_LIST,
    "img_set": _STR_LIST, "source": _STR,
}


def embedding_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def gallery_schema(dim: int, with_path: bool = False) -> pa.Schema:
    fields = [
        pa.field("image_id", pa.string()), pa.field("category", pa.string()),
        pa.field("attributes", pa.list_(pa.string())), pa.field("embedding", embedding_type(dim)),
    ]
    if with_path:
        fields.append(pa.field("path", pa.string()))
    return pa.schema(fields)


def triplets_schema(dim: int, optional: Sequence[str] = ()) -> pa.Schema:
    fields = [
        pa.field("query_id", pa.string()), pa.field("category", pa.string()),
        pa.field("ref_id", pa.string()), pa.field("target_id", pa.string()),
        pa.field("captions", pa.list_(pa.string())), pa.field("text_embedding", embedding_type(dim)),
    ]
    for name in optional:
        fields.append(pa.field(name, pa.string() if name == "source" else pa.list_(pa.string())))
    return pa.schema(fields)


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


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    n = np.linalg.norm(x, axis=axis, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------------
# Validation


def _check_columns(schema: pa.Schema, path: Path, required: dict, optional: dict, what: str) -> None:
    for name, (pred, human) in required.items():
        if name not in schema.names:
            raise SchemaError(
                f"{path}: missing column '{name}' ({human}); a {what} table needs the columns "
                f"{', '.join(required)}. See docs/formats.md."
            )
        t = schema.field(name).type
        if not pred(t):
            raise SchemaError(f"{path}: column '{name}' has type {t}, expected {human}. See docs/formats.md.")
    for name, (pred, human) in optional.items():
        if name in schema.names and not pred(schema.field(name).type):
            raise SchemaError(
                f"{path}: column '{name}' has type {schema.field(name).type}, expected {human}."
            )


def check_embeddings(emb: np.ndarray, path: Path, column: str, ids: Sequence[str]) -> None:
    """Raise SchemaError when ``emb`` has NaN/inf rows or rows that are not unit length."""
    if emb.shape[0] == 0:
        return
    finite = np.isfinite(emb).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise SchemaError(
            f"{path}: column '{column}' has {bad.size} row(s) with NaN or inf values "
            f"(first: {ids[bad[0]]!s}). Re-embed those items or drop them."
        )
    norms = np.sqrt(np.einsum("ij,ij->i", emb, emb, dtype=np.float64))
    off = np.abs(norms - 1.0) > NORM_TOLERANCE
    if off.any():
        bad = np.flatnonzero(off)
        raise SchemaError(
            f"{path}: column '{column}' has {bad.size} row(s) that are not L2-normalized "
            f"(first: {ids[bad[0]]!s} with norm {norms[bad[0]]:.4f}). Normalize the embeddings "
            f"(x / ||x||) before writing the workspace."
        )


def _check_no_empty_ids(table: pa.Table, path: Path, columns: Sequence[str], what: str) -> None:
    """Id columns hold no empty (or blank) string: an id names one image or query."""
    import pyarrow.compute as pc

    for name in columns:
        col = table.column(name)
        blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0).to_numpy(zero_copy_only=False)
        if blank.any():
            i = int(np.flatnonzero(blank)[0])
            raise SchemaError(f"{path}: column '{name}' has {int(blank.sum())} empty id(s) (first: row {i}). Every "
                              f"{what} needs an id; drop those rows or name them.")


def _check_no_nulls(table: pa.Table, path: Path, ids: np.ndarray, what: str, columns: Sequence[str]) -> None:
    """String columns hold no nulls ('' stands for none, e.g. CIRR's category)."""
    for name in columns:
        if name in table.schema.names and table.column(name).null_count:
            col = table.column(name).combine_chunks()
            first = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise SchemaError(f"{path}: column '{name}' has {col.null_count} null value(s) (first: {what} "
                              f"'{ids[first]}'). Use '' for none, or drop those rows.")


# ----------------------------------------------------------------------------------------------
# In-memory tables


@dataclass
class Gallery:
    """A validated gallery table. ``embeddings``: float32[n, d], L2-normalized."""

    path: Path
    image_ids: np.ndarray            # object[n] of str
    categories: np.ndarray           # object[n] of str (one shared object per distinct category)
    attributes: Sequence             # [n] list[str] ("group:value") per row: a list, or AttrLists read from a file
    embeddings: np.ndarray           # float32[n, d]
    paths: Optional[np.ndarray] = None
    _row: Optional[dict] = field(default=None, repr=False)
    _key_row: Optional[dict] = field(default=None, repr=False)
    _ids: Optional[pa.Array] = field(default=None, repr=False)    # string[n] image ids, for vectorized lookups
    _keys: Optional[pa.Array] = field(default=None, repr=False)   # string[n] category KEY_SEP image id
    _cats: Optional[pa.Array] = field(default=None, repr=False)   # string[n] categories
    data_hash: Optional[str] = field(default=None, repr=False)    # split hash of the data read (Workspace.load)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return int(self.image_ids.shape[0])

    @property
    def id_array(self) -> pa.Array:
        """The image ids as one Arrow string array."""
        if self._ids is None:
            self._ids = string_array(self.image_ids)
        return self._ids

    @property
    def category_array(self) -> pa.Array:
        """The categories as one Arrow string array."""
        if self._cats is None:
            self._cats = string_array(self.categories)
        return self._cats

    @property
    def row_of(self) -> dict:
        """image_id -> row index (the first row when an id stands in two categories)."""
        if self._row is None:
            row: dict = {}
            for i, k in enumerate(self.image_ids.tolist()):
                row.setdefault(k, i)
            self._row = row
        return self._row

    @property
    def key_row(self) -> dict:
        """(category, image_id) -> row index."""
        if self._key_row is None:
            self._key_row = {k: i for i, k in enumerate(zip(self.categories.tolist(), self.image_ids.tolist()))}
        return self._key_row

    def lookup(self, ids, categories=None) -> np.ndarray:
        """int64 row of each id (resolved within ``categories`` when given, then by id alone; the
        first row when an id stands in two categories), -1 where absent. Vectorized: no per-row
        Python objects, so it stays cheap on a gallery of millions of rows."""
        probe = string_array(ids)
        rows = np.full(len(probe), -1, np.int64)
        if categories is not None:
            if self._keys is None:
                self._keys = join_keys(self.category_array, self.id_array)
            rows = index_of(join_keys(string_array(categories).cast(probe.type), probe), self._keys)
        miss = rows < 0
        if miss.any():
            rows[miss] = index_of(probe.filter(pa.array(miss)), self.id_array)
        return rows

    def rows(self, ids: Iterable[str], categories: Optional[Iterable[str]] = None,
             what: str = "image") -> np.ndarray:
        """Row indices of ``ids`` (resolved within ``categories`` when given, then by id alone).

        Raises DataError naming the first missing id.
        """
        ids = ids if hasattr(ids, "__getitem__") else list(ids)       # indexable, for the message
        out = self.lookup(ids, None if categories is None else
                          categories if hasattr(categories, "__len__") else list(categories))
        if (out < 0).any():
            first = int(np.flatnonzero(out < 0)[0])
            i = ids[first]
            raise DataError(f"{self.path}: {what} id '{i.as_py() if isinstance(i, pa.Scalar) else i}' is not in the gallery.")
        return out


@dataclass
class Triplets:
    """A validated triplets table. ``text_embeddings``: float32[m, d], L2-normalized."""

    path: Path
    query_ids: np.ndarray
    categories: np.ndarray
    ref_ids: np.ndarray
    target_ids: np.ndarray
    captions: list
    text_embeddings: np.ndarray
    extra_positive_ids: list         # list[m] of list[str] (empty lists when the column is absent)
    verified_negative_ids: list
    img_set: list
    source: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.query_ids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.text_embeddings.shape[1])

    def subset(self, idx: np.ndarray) -> "Triplets":
        idx = np.asarray(idx, dtype=np.int64)
        pick = lambda lst: [lst[i] for i in idx.tolist()]
        return Triplets(
            self.path, self.query_ids[idx], self.categories[idx], self.ref_ids[idx],
            self.target_ids[idx], pick(self.captions), self.text_embeddings[idx],
            pick(self.extra_positive_ids), pick(self.verified_negative_ids), pick(self.img_set),
            None if self.source is None else self.source[idx],
        )


def _obj(col) -> np.ndarray:
    out = np.empty(len(col), dtype=object)
    out[:] = col.to_pylist()
    return out


PART_GLOB = "part-*.parquet"


def gallery_part_files(folder: Path) -> list[Path]:
    """The parts of a gallery folder, in row order (sorted by name); DataError when there are none."""
    parts = sorted(p for p in folder.glob(PART_GLOB) if p.is_file())
    if not parts:
        raise DataError(f"{folder}: a gallery folder needs {PART_GLOB} files and has none. Write the parts "
                        f"(e.g. `cir-mine embed --engine ray`) or use a gallery.SPLIT.parquet file.")
    return parts


def _gallery_columns(without_embedding: bool) -> dict:
    return {k: v for k, v in GALLERY_COLUMNS.items() if not (without_embedding and k == "embedding")}


def _read_gallery_file(path: Path, without_embedding: bool) -> pa.Table:
    if without_embedding:
        names = read_parquet_schema(path).names if path.exists() else []
        table = read_parquet(path, [c for c in names if c != "embedding"])
    else:
        table = read_parquet(path)
    _check_columns(table.schema, path, _gallery_columns(without_embedding), GALLERY_OPTIONAL, "gallery")
    return table


def _read_gallery_table(path: Path, without_embedding: bool = False) -> pa.Table:
    """One gallery file, or the row-aligned parts of a gallery folder concatenated in name order
    (``without_embedding``: the ``embedding`` column is not read, and may be absent)."""
    if not path.is_dir():
        return _read_gallery_file(path, without_embedding)
    tables = []
    for part in gallery_part_files(path):
        t = _read_gallery_file(part, without_embedding)
        if tables and t.schema.remove_metadata() != tables[0].schema:
            cols = lambda sch: ", ".join(f"{f.name}: {f.type}" for f in sch)  # noqa: E731
            raise SchemaError(f"{part}: columns ({cols(t.schema)}) differ from the first part's ({cols(tables[0].schema)}); "
                              f"every part of a gallery folder needs the same columns and embedding dimension.")
        tables.append(t.replace_schema_metadata(None))
    return pa.concat_tables(tables)


def read_gallery(path: str | Path, check_norm: bool = True, embeddings_path: Optional[Path] = None) -> Gallery:
    """A gallery file or a folder of parts (``part-*.parquet``), validated, as one :class:`Gallery`.

    With ``embeddings_path`` (a row-aligned float32/float16 ``.npy``), the embeddings are
    memory-mapped from it instead of read from the ``embedding`` column, which may then be absent:
    galleries larger than memory are mined block by block."""
    path = Path(path)
    return gallery_from_table(_read_gallery_table(path, embeddings_path is not None), path, check_norm,
                              embeddings_path)


def gallery_from_table(table: pa.Table, path: Path, check_norm: bool = True,
                       embeddings_path: Optional[Path] = None) -> Gallery:
    """Validate a gallery-schema Arrow table (``path`` names it in errors) -> :class:`Gallery`;
    ``embeddings_path`` as in :func:`read_gallery`."""
    _check_columns(table.schema, path, _gallery_columns(embeddings_path is not None), GALLERY_OPTIONAL, "gallery")
    if table.column("image_id").null_count:
        raise SchemaError(f"{path}: column 'image_id' has null values.")
    _check_no_empty_ids(table, path, ["image_id"], "image")
    id_arr = string_array(table.column("image_id"))
    cat_arr = string_array(table.column("category"))
    ids = _obj(id_arr)
    cats = shared_objects(cat_arr)
    _check_no_nulls(table, path, ids, "image", ("category", "path"))
    # image_id is unique within a category. The same id may stand in two categories (real
    # FashionIQ lists 516 ASINs under both shirt and toptee); such rows are one product.
    keys = join_keys(cat_arr.cast(id_arr.type), id_arr)
    dup = first_duplicate(keys)
    if dup is not None:
        raise SchemaError(
            f"{path}: column 'image_id' has a duplicated id '{ids[dup]}' in category '{cats[dup]}'. "
            f"Each gallery image must appear once per category; drop the duplicates."
        )
    if embeddings_path is not None:
        emb = open_embeddings(embeddings_path, len(ids), path)
        if check_norm:
            for s in range(0, len(ids), 65_536):
                check_embeddings(read_block(emb, s, s + 65_536), embeddings_path, "rows", ids[s:])
                release_pages(emb)
    else:
        try:
            emb = embedding_numpy(table.column("embedding"))
        except ValueError:
            raise SchemaError(f"{path}: column 'embedding' has null rows.") from None
        if check_norm:
            check_embeddings(emb, path, "embedding", ids)
    attrs = AttrLists.from_arrow(table.column("attributes"))
    bad = attrs.null_row()
    if bad is not None:
        raise SchemaError(f"{path}: column 'attributes' of image '{ids[bad]}' holds a null; each attribute is a "
                          f"'group:value' string. Drop the nulls.")
    paths = _obj(table.column("path")) if "path" in table.schema.names else None
    return Gallery(path, ids, cats, attrs, emb, paths, _ids=id_arr, _keys=keys, _cats=cat_arr)


def open_embeddings(path: Path, n: int, gallery_path: Path) -> np.ndarray:
    """Memory-map a row-aligned ``float32[n, d]`` / ``float16[n, d]`` ``.npy`` (read-only)."""
    try:
        emb = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise SchemaError(f"{path}: not a readable .npy array ({e}). Rewrite it with `cir-mine index --npy`.") from None
    if emb.ndim != 2 or emb.dtype not in (np.float32, np.float16) or emb.shape[0] != n:
        raise SchemaError(f"{path}: holds {emb.dtype}{list(emb.shape)} but {gallery_path} has {n} rows; expected "
                          f"float32 or float16 [{n}, d], row r = gallery row r. Rewrite it with `cir-mine index --npy`.")
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
        with open(tmp, "r+b") as fh:   # reserve the blocks: a full disk is an error here, not a SIGBUS later
            os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
        s = 0
        for block in emb_blocks:
            out[s:s + len(block)] = block
            s += len(block)
            out.flush()
            release_pages(out)
        if s != n:
            raise DataError(f"{path}: got {s} rows for {n}.")
        del out


def read_triplets(path: str | Path, dim: Optional[int] = None, check_norm: bool = True) -> Triplets:
    path = Path(path)
    return triplets_from_table(read_parquet(path), path, dim, check_norm)


def triplets_from_table(table: pa.Table, path: Path, dim: Optional[int] = None,
                        check_norm: bool = True) -> Triplets:
    """Validate a triplets-schema Arrow table (``path`` names it in errors) -> :class:`Triplets`."""
    _check_columns(table.schema, path, TRIPLET_COLUMNS, TRIPLET_OPTIONAL, "triplets")
    qids = _obj(table.column("query_id"))
    if table.column("query_id").null_count:
        raise SchemaError(f"{path}: column 'query_id' has null values.")
    _check_no_nulls(table, path, qids, "query", ("category", "ref_id", "target_id", "source"))
    _check_no_empty_ids(table, path, ["query_id", "ref_id", "target_id"], "query")
    same = np.flatnonzero(_obj(table.column("ref_id")) == _obj(table.column("target_id")))
    if same.size:
        i = int(same[0])
        raise SchemaError(f"{path}: {same.size} query(ies) name their reference as their target (first: query "
                          f"'{qids[i]}', image '{table.column('ref_id')[i]}'); a query asks for another image. Drop "
                          f"those rows.")
    if len(set(qids.tolist())) != len(qids):
        raise SchemaError(f"{path}: column 'query_id' has duplicated ids; query ids must be unique.")
    try:
        emb = embedding_numpy(table.column("text_embedding"))
    except ValueError:
        raise SchemaError(f"{path}: column 'text_embedding' has null rows.") from None
    if dim is not None and emb.shape[1] != dim:
        raise SchemaError(
            f"{path}: column 'text_embedding' has dimension {emb.shape[1]} but the gallery has "
            f"dimension {dim}. Both must come from the same encoder; re-embed one of them."
        )
    if check_norm:
        check_embeddings(emb, path, "text_embedding", qids)
    n = len(qids)

    def lists(name):
        if name not in table.schema.names:
            return [[] for _ in range(n)]
        return [list(v or []) for v in table.column(name).to_pylist()]

    captions = lists("captions")
    for i, caps in enumerate(captions):
        # Real FashionIQ holds some empty captions beside a non-empty one; a query needs one.
        if not any(c is not None and str(c).strip() for c in caps):
            raise SchemaError(
                f"{path}: column 'captions' of query '{qids[i]}' has no non-empty caption. "
                f"Drop the query or give it a caption."
            )
    return Triplets(
        path, qids, _obj(table.column("category")), _obj(table.column("ref_id")),
        _obj(table.column("target_id")), captions, emb, lists("extra_positive_ids"),
        lists("verified_negative_ids"), lists("img_set"),
        _obj(table.column("source")) if "source" in table.schema.names else None,
    )


# ----------------------------------------------------------------------------------------------
# Writers


def gallery_table(image_ids, categories, attributes, embeddings: np.ndarray, paths=None) -> pa.Table:
    dim = int(embeddings.shape[1])
    cols = [
        pa.array(list(image_ids), pa.string()), pa.array(list(categories), pa.string()),
        pa.array([list(a) for a in attributes], pa.list_(pa.string())), embedding_array(embeddings),
    ]
    if paths is not None:
        cols.append(pa.array(list(paths), pa.string()))
    return pa.Table.from_arrays(cols, schema=gallery_schema(dim, with_path=paths is not None))


def triplets_table(query_ids, categories, ref_ids, target_ids, captions, text_embeddings: np.ndarray,
                   **optional) -> pa.Table:
    dim = int(text_embeddings.shape[1])
    names = [k for k in ("extra_positive_ids", "verified_negative_ids", "img_set", "source")
             if optional.get(k) is not None]
    schema = triplets_schema(dim, names)
    cols = [
        pa.array(list(query_ids), pa.string()), pa.array(list(categories), pa.string()),
        pa.array(list(ref_ids), pa.string()), pa.array(list(target_ids), pa.string()),
        pa.array([list(c) for c in captions], pa.list_(pa.string())), embedding_array(text_embeddings),
    ]
    for k in names:
        v = optional[k]
        cols.append(pa.array(list(v), pa.string()) if k == "source"
                    else pa.array([list(x) for x in v], pa.list_(pa.string())))
    return pa.Table.from_arrays(cols, schema=schema)


def write_gallery_parts(tables: Iterable[pa.Table], folder: str | Path, metadata: Optional[dict] = None) -> None:
    """Write a gallery folder of parts ``part-00000.parquet``... atomically: the parts go into a temp
    folder beside ``folder`` that then replaces it (:func:`cir_mine.data.io.replace_dir`: inside a
    transaction the older folder comes back if the job fails)."""
    folder = Path(folder)
    make_dirs(folder.parent)
    tmp = side_name(folder, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for i, t in enumerate(tables):
            write_table(t, tmp / f"part-{i:05d}.parquet", metadata)
        replace_dir(tmp, folder)
    except BaseException as e:
        with signals_blocked():
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and is_write_error(e):
            raise write_error(folder, e) from None
        raise


def write_table(table: pa.Table, path: str | Path, metadata: Optional[dict] = None, journal: bool = True) -> None:
    """Write ``table`` to ``path`` atomically; ``metadata`` (JSON-able) goes into the file footer
    (``journal``: see :func:`cir_mine.data.io.atomic_path`)."""
    if metadata:
        meta = dict(table.schema.metadata or {})
        meta.update({k.encode(): json.dumps(v, sort_keys=True).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(meta)
    with atomic_path(path, journal) as tmp:
        pq.write_table(table, tmp)


def read_metadata(path: str | Path) -> dict:
    """The JSON metadata stored by :func:`write_table` (keys without the ARROW schema)."""
    meta = read_parquet_schema(path).metadata or {}
    out = {}
    for k, v in meta.items():
        key = k.decode()
        if key.startswith("ARROW:"):
            continue
        try:
            out[key] = json.loads(v.decode())
        except ValueError:
            out[key] = v.decode()
    return out


# ----------------------------------------------------------------------------------------------
# Workspace


def library_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("numpy", "pyarrow", "faiss-cpu", "faiss-gpu-cu12", "torch", "open_clip_torch", "duckdb"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


class Workspace:
    """A workspace directory. Tables are validated when read."""

    MANIFEST = "manifest.json"

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def from_arrays(cls, gallery_emb, image_ids, **kw) -> "Workspace":
        """An in-memory workspace of one split from numpy arrays; no file is read or written.

        See :func:`cir_mine.data.arrays.workspace_from_arrays` for the arguments."""
        from cir_mine.data.arrays import workspace_from_arrays

        return workspace_from_arrays(gallery_emb, image_ids, **kw)

    # paths
    def gallery_path(self, split: str) -> Path:
        """``gallery.{split}.parquet``, or the parts folder ``gallery.{split}/`` when only it exists."""
        f = self.gallery_file(split)
        d = self.gallery_dir(split)
        return d if d.is_dir() and not f.exists() else f

    def gallery_file(self, split: str) -> Path:
        return self.root / f"gallery.{check_split(split)}.parquet"

    def gallery_dir(self, split: str) -> Path:
        return self.root / f"gallery.{check_split(split)}"

    def gallery_files(self, split: str) -> list[Path]:
        """The Parquet file(s) of a split's gallery, in row order."""
        p = self.gallery_path(split)
        return gallery_part_files(p) if p.is_dir() else [p]

    def write_gallery(self, split: str, table: pa.Table | Iterable[pa.Table], metadata: Optional[dict] = None) -> Path:
        """Write a split's gallery atomically: one table -> the single file, several (an iterable, consumed
        one at a time) -> a parts folder.
        The other form, if present, is removed afterwards (:func:`cir_mine.data.io.discard`), so a split
        never has both; inside a transaction a failure puts the old form back."""
        with transaction():
            if isinstance(table, pa.Table):
                write_table(table, self.gallery_file(split), metadata)
                if self.gallery_dir(split).is_dir():
                    discard(self.gallery_dir(split))
                return self.gallery_file(split)
            write_gallery_parts(table, self.gallery_dir(split), metadata)
            if os.path.lexists(self.gallery_file(split)):
                discard(self.gallery_file(split))
            return self.gallery_dir(split)

    def triplets_path(self, split: str) -> Path:
        return self.root / f"triplets.{check_split(split)}.parquet"

    def index_path(self, split: str) -> Path:
        return self.root / f"index.{check_split(split)}.faiss"

    def embeddings_path(self, split: str) -> Path:
        """``gallery.{split}.npy``: the gallery's embeddings as a row-aligned array (optional)."""
        return self.root / f"gallery.{check_split(split)}.npy"

    @property
    def manifest_path(self) -> Path:
        return self.root / self.MANIFEST

    def require(self) -> "Workspace":
        if not self.root.is_dir():
            raise DataError(
                f"{self.root}: workspace directory not found. Create one with `cir-mine synth` or "
                f"`cir-mine embed`, or point --work at an existing workspace."
            )
        return self

    def splits(self) -> list[str]:
        """Split names of the ``gallery.{split}.parquet`` files and ``gallery.{split}/`` part folders; a
        stray ``gallery.*.parquet`` whose split is not a valid name (e.g. ``gallery.train copy.parquet``)
        is a DataError naming it."""
        out = set()
        for p in self.root.glob("gallery.*.parquet"):
            if p.is_dir():
                continue
            name = p.name[len("gallery."):-len(".parquet")]
            if not SPLIT_RE.match(name):
                raise DataError(f"{p}: not a split table (split names use letters, digits, '-' or '_'). "
                                f"Rename or move it out of {self.root}.")
            out.add(name)
        out |= {p.name[len("gallery."):] for p in self.root.glob("gallery.*") if p.is_dir()
                and SPLIT_RE.match(p.name[len("gallery."):])}
        return sorted(out)

    def _require_split(self, split: str, path: Path) -> None:
        self.require()
        if os.path.lexists(path) and not path.is_dir():     # a gallery may be a folder of parts
            check_readable_file(path)   # a dangling link or a symlink loop is named as such
        if not path.exists():
            have = ", ".join(self.splits()) or "none"
            raise DataError(f"{path}: file not found; splits in {self.root}: {have}. Pass one with --split.")

    # tables
    def gallery(self, split: str, check_norm: bool = True) -> Gallery:
        p = self.gallery_path(split)
        self._require_split(split, p)
        if self.gallery_file(split).exists() and self.gallery_dir(split).is_dir():
            raise DataError(f"{self.root}: split '{split}' has both {self.gallery_file(split).name} and the parts "
                            f"folder {self.gallery_dir(split).name}/; remove the one that is out of date.")
        npy = self.embeddings_path(split)
        if (npy.exists() and p.is_file() and "embedding" in read_parquet_schema(p).names
                and npy.stat().st_mtime_ns < p.stat().st_mtime_ns):
            raise SchemaError(f"{npy}: older than {p}, so it may hold other embeddings. Rewrite it with "
                              f"`cir-mine index --work {self.root} --split {split} --npy`, or delete it.")
        g = read_gallery(p, check_norm=check_norm, embeddings_path=npy if npy.exists() else None)
        if len(g) == 0:
            raise DataError(f"{p}: the gallery is empty (0 rows). Re-embed the split or choose another with --split.")
        dim = self.manifest().get("dim")
        if dim is not None and g.dim != int(dim):
            raise SchemaError(
                f"{p}: column 'embedding' has dimension {g.dim} but {self.manifest_path} says {dim}."
            )
        return g

    def triplets(self, split: str, gallery: Optional[Gallery] = None, check_norm: bool = True) -> Triplets:
        p = self.triplets_path(split)
        if not p.exists() and self.gallery_path(split).exists():
            raise DataError(
                f"{p}: file not found: {self.root} holds the gallery of split '{split}' but no queries "
                f"(features only). Add queries: write {p.name} in the triplets schema (query_id, category, ref_id, "
                f"target_id, captions, text_embedding from the features' encoder; docs/formats.md), or embed "
                f"images and captions with `cir-mine embed --dataset fashioniq|cirr|folder --root ROOT "
                f"--work {self.root} --split {split}`.")
        self._require_split(split, p)
        dim = gallery.dim if gallery is not None else self.manifest().get("dim")
        t = read_triplets(p, dim=dim, check_norm=check_norm)
        if len(t) == 0:
            raise DataError(f"{p}: no queries (0 rows). Re-embed the split or choose another with --split.")
        if gallery is not None:
            check_triplets_against_gallery(t, gallery)
        return t

    def load(self, split: str) -> tuple[Gallery, Triplets]:
        """The split's gallery and triplets, validated, as one version: the split's hash is taken before
        and after reading, and a split rewritten meanwhile (another process replaced a table) is a
        DataError, so what a reader holds is always the data of ``gallery.data_hash``."""
        before = self.split_hash(split)
        try:
            g = self.gallery(split)
            t = self.triplets(split, gallery=g)
        except DataError:
            self.check_unchanged(split, before)     # tables of two versions disagree: name the cause
            raise
        self.check_unchanged(split, before)
        g.data_hash = before
        pa.default_memory_pool().release_unused()   # the Parquet read's buffers and lookup hash tables
        return g, t

    def summary(self) -> dict:
        """Validate every split and return {manifest, hash, splits: {split: {images, triplets, categories}}}."""
        self.require()
        splits = {}
        for split in self.splits():
            g = self.gallery(split)
            t = self.triplets(split, gallery=g) if self.triplets_path(split).exists() else None
            splits[split] = {"images": len(g), "triplets": 0 if t is None else len(t),
                             "categories": sorted(set(g.categories.tolist()))}
        return {"manifest": self.manifest(), "hash": self.manifest_hash(), "splits": splits}

    def image_root(self, split: str) -> Optional[Path]:
        """The dataset root the gallery ``path`` column of ``split`` is relative to, as recorded by
        ``cir-mine embed`` (absolute), or None when the workspace does not record one."""
        if not self.manifest_path.exists():
            return None
        root = ((self.manifest().get("embed") or {}).get(split) or {}).get("root")
        return Path(root) if root else None

    # manifest
    def manifest(self) -> dict:
        if self.manifest_path.exists():
            try:
                m = json.loads(self.manifest_path.read_text())
            except ValueError as e:
                raise DataError(f"{self.manifest_path}: malformed JSON ({e}).") from None
            if not isinstance(m, dict):
                raise DataError(f"{self.manifest_path}: expected a JSON object.")
            version = m.get("schema_version")
            if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 1):
                raise DataError(f"{self.manifest_path}: 'schema_version' must be a positive integer, found {version!r}. "
                                f"Repair the manifest, or delete it to derive one from the tables.")
            if version is not None and version > SCHEMA_VERSION:
                raise DataError(f"{self.manifest_path}: schema_version {version} is newer than this cir-mine reads "
                                f"({SCHEMA_VERSION}). Upgrade cir-mine to read this workspace.")
            dim = m.get("dim")
            if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool) or dim < 1):
                raise DataError(f"{self.manifest_path}: 'dim' must be a positive integer, found {dim!r}. Repair the "
                                f"manifest, or delete it to derive one from the tables.")
            return m
        return self.derive_manifest()

    def derive_manifest(self) -> dict:
        """A manifest computed from the tables' footers (for workspaces made without one)."""
        self.require()
        counts, dim = {}, None
        for kind in ("gallery", "triplets"):
            col = "embedding" if kind == "gallery" else "text_embedding"
            tables = [(p.name[: -len(".parquet")], [p]) for p in sorted(self.root.glob(f"{kind}.*.parquet")) if p.is_file()]
            if kind == "gallery":                         # parts folders count as one table
                tables += [(p.name, sorted(p.glob(PART_GLOB))) for p in sorted(self.root.glob("gallery.*"))
                           if p.is_dir() and SPLIT_RE.match(p.name[len("gallery."):])]
            for name, files in sorted(tables):
                mds = [pq.read_metadata(f) for f in files]
                counts[name] = sum(md.num_rows for md in mds)
                for md in mds[:1]:
                    sch = md.schema.to_arrow_schema()
                    if col in sch.names and pa.types.is_fixed_size_list(sch.field(col).type):
                        dim = dim or sch.field(col).type.list_size
        return {"schema_version": SCHEMA_VERSION, "derived": True, "dim": dim, "counts": counts,
                "encoder": {"name": "unknown"}, "source": "unknown"}

    def manifest_hash(self) -> str:
        """The identity of the workspace's data: the manifest without its times and library versions,
        plus a digest of the bytes of every gallery and triplets table. A byte-identical rebuild has
        the same hash; new features or triplets change it."""
        m = {k: v for k, v in self.manifest().items() if k not in ("updated", "created", "versions")}
        m["content"] = {p.name: file_digest(p) for kind in ("gallery", "triplets")
                        for p in sorted(self.root.glob(f"{kind}.*.parquet"))}
        return hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()[:16]

    def split_hash(self, split: str) -> str:
        """Identity of one split's data: a hash over ``gallery.{split}.parquet`` (or each part of the
        folder ``gallery.{split}/``) and
        ``triplets.{split}.parquet`` (each file's size and Parquet footer, which holds its row
        counts, column chunk sizes and statistics). Other splits and the manifest do not enter it,
        so embedding another split leaves it unchanged; rewriting this split's tables changes it."""
        h = hashlib.sha256(check_split(split).encode())
        for p in (self.gallery_path(split), self.triplets_path(split)):
            h.update(f"|{p.name}|".encode())
            if p.is_dir():                                # a gallery folder: every part, in row order
                for part in sorted(p.glob(PART_GLOB)):
                    h.update(f"|{part.name}|".encode() + file_fingerprint(part))
            elif p.exists():
                h.update(file_fingerprint(p))
        return h.hexdigest()[:16]

    def check_unchanged(self, split: str, data_hash: Optional[str], while_: str = "read") -> None:
        """DataError when the split's data is no longer the version ``data_hash`` (another process
        rewrote a table of it after it was read); None checks nothing."""
        if data_hash is not None and self.split_hash(split) != data_hash:
            raise DataError(f"{self.root}: split '{split}' changed while it was {while_} (another process rewrote "
                            f"{self.gallery_path(split).name} or {self.triplets_path(split).name}). Run the command "
                            f"again once that writer is done.")

    def check_new_split(self, split: str, dim: Optional[int], overwrite: bool, flag: str = "--work") -> None:
        """Before writing split ``split`` with dimension ``dim``: refuse an existing split without
        ``overwrite`` and a dimension other than the other splits' (UsageError; ``dim=None``: no check)."""
        mine = (self.gallery_path(split), self.triplets_path(split))
        if not overwrite:
            for p in mine:
                if p.exists():
                    raise UsageError(f"{flag} {self.root}: split '{split}' exists ({p.name}). Pass --overwrite to "
                                     f"replace it, or choose another --split or {flag}.")
        if dim is None or not self.root.is_dir():
            return
        for kind, col in (("gallery", "embedding"), ("triplets", "text_embedding")):
            for p in sorted(self.root.glob(f"{kind}.*.parquet")):
                if p in mine:
                    continue
                try:
                    t = pq.read_schema(p).field(col).type
                except (KeyError, pa.ArrowInvalid, OSError):
                    continue   # unreadable tables are reported by the readers
                if pa.types.is_fixed_size_list(t) and t.list_size != dim:
                    raise UsageError(f"{flag} {self.root}: {p.name} has d={t.list_size}; a '{split}' split with "
                                     f"d={dim} would make the workspace unreadable. Use the same encoder (d="
                                     f"{t.list_size}), or write to another {flag}.")

    def write_manifest(self, **fields) -> dict:
        """Merge ``fields`` into the manifest and refresh counts/dim from the tables."""
        base = self.manifest() if self.manifest_path.exists() else {}
        derived = self.derive_manifest()
        m = {**base, **fields}
        m["schema_version"] = SCHEMA_VERSION
        m["counts"] = derived["counts"]
        m["dim"] = derived["dim"] if derived["dim"] is not None else m.get("dim")
        m.setdefault("created", now_iso())
        m.setdefault("encoder", {"name": "unknown"})
        m.setdefault("source", "unknown")
        m["versions"] = library_versions()
        m.pop("derived", None)
        write_json_atomic(self.manifest_path, m)
        return m


_DIGESTS: dict = {}


def file_fingerprint(path: Path) -> bytes:
    """sha256 of a file's bytes (the content, not its times), cached per process by path, size,
    mtime and inode, so a command pays one read of each table at most."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        _DIGESTS[key] = h.digest()
    return _DIGESTS[key]


def file_digest(path: Path) -> str:
    """:func:`file_fingerprint` as 16 hex digits."""
    return file_fingerprint(path).hex()[:16]


def check_split(split: str) -> str:
    from cir_mine.data.errors import UsageError

    if not SPLIT_RE.match(split or ""):
        raise UsageError(f"invalid split name {split!r}: use letters, digits, '-' or '_' (e.g. train, val).")
    return split


def check_triplets_against_gallery(t: Triplets, g: Gallery) -> None:
    """Every reference and target must be a gallery image."""
    for col, ids in (("ref_id", t.ref_ids), ("target_id", t.target_ids)):
        absent = np.flatnonzero(g.lookup(ids) < 0)
        if absent.size:
            raise DataError(
                f"{t.path}: column '{col}' names {absent.size} image(s) missing from {g.path} "
                f"(first: {ids[absent[0]]}, query {t.query_ids[absent[0]]}). "
                f"Re-embed the gallery or drop those triplets."
            )
