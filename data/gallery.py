"""The gallery table: one row per image (id, category, attributes, embedding), as one file
``gallery.{split}.parquet`` or a folder of row-aligned parts ``gallery.{split}/part-*.parquet``.
Validated on read (:data:`cir_mine.data.schema.GALLERY`); the in-memory :class:`Gallery` looks
images up by id without per-row Python objects."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import pyarrow as pa

from cir_mine.data.embeddings import (
    check_embeddings,
    embedding_array,
    embedding_numpy,
    embedding_rows,
    open_embeddings,
    read_block,
    release_pages,
)
from cir_mine.data.errors import DataError, SchemaError
from cir_mine.data.files import is_write_error, make_dirs, side_name, write_error
from cir_mine.data.journal import replace_dir
from cir_mine.data.parquet import parquet_file, write_table
from cir_mine.data.rows import (
    AttrLists,
    first_duplicate,
    index_of,
    join_keys,
    shared_objects,
    string_array,
)
from cir_mine.data.schema import (
    GALLERY,
    check_no_empty_ids,
    check_no_nulls,
    gallery_schema,
    object_array,
)
from cir_mine.data.signals import signals_blocked


@dataclass
class Gallery:
    """A validated gallery table. ``embeddings``: float32[n, d], L2-normalized."""

    # fmt: off
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
    file_digest: Optional[str] = field(default=None, repr=False)  # digest of the one file the rows came from (Workspace.load)
    # fmt: on

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

    def rows(self, ids: Iterable[str], categories: Optional[Iterable[str]] = None, what: str = "image") -> np.ndarray:
        """Row indices of ``ids`` (resolved within ``categories`` when given, then by id alone).

        Raises DataError naming the first missing id.
        """
        ids = ids if hasattr(ids, "__getitem__") else list(ids)  # indexable, for the message
        out = self.lookup(
            ids, None if categories is None else categories if hasattr(categories, "__len__") else list(categories)
        )
        if (out < 0).any():
            first = int(np.flatnonzero(out < 0)[0])
            i = ids[first]
            raise DataError(
                f"{self.path}: {what} id '{i.as_py() if isinstance(i, pa.Scalar) else i}' is not in the gallery."
            )
        return out


PART_GLOB = "part-*.parquet"


def gallery_part_files(folder: Path) -> list[Path]:
    """The parts of a gallery folder, in row order (sorted by name); DataError when there are none."""
    parts = sorted(p for p in folder.glob(PART_GLOB) if p.is_file())
    if not parts:
        raise DataError(
            f"{folder}: a gallery folder needs {PART_GLOB} files and has none. Write the parts "
            f"(e.g. `cir-mine embed engine=ray`) or use a gallery.SPLIT.parquet file.",
            params=("engine",),
        )
    return parts


def _read_gallery_file(path: Path, without_embedding: bool) -> tuple[pa.Table, pa.Schema, Optional[np.ndarray]]:
    """(the columns but ``embedding``, the file's schema, the embeddings or None with
    ``without_embedding``), read from one open of the file."""
    with parquet_file(path) as opened:
        schema = opened.file.schema_arrow
        GALLERY.check(schema, path, ("embedding",) if without_embedding else ())
        table = opened.file.read(columns=[c for c in schema.names if c != "embedding"])
        emb = None if without_embedding else embedding_rows(opened, "embedding", path)
    return table, schema.remove_metadata(), emb


def _read_gallery_table(path: Path, without_embedding: bool = False) -> tuple[pa.Table, Optional[np.ndarray]]:
    """One gallery file, or the row-aligned parts of a gallery folder concatenated in name order:
    (the columns but ``embedding``, float32[n, d] embeddings; None with ``without_embedding``, where
    the column is not read and may be absent)."""
    if not path.is_dir():
        table, _, emb = _read_gallery_file(path, without_embedding)
        return table, emb
    tables, embs, first = [], [], None
    for part in gallery_part_files(path):
        t, schema, emb = _read_gallery_file(part, without_embedding)
        if first is not None and schema != first:
            cols = lambda sch: ", ".join(f"{f.name}: {f.type}" for f in sch)  # noqa: E731
            raise SchemaError(
                f"{part}: columns ({cols(schema)}) differ from the first part's ({cols(first)}); "
                f"every part of a gallery folder needs the same columns and embedding dimension."
            )
        first = schema if first is None else first
        tables.append(t.replace_schema_metadata(None))
        embs.append(emb)
    emb = None if without_embedding else (embs[0] if len(embs) == 1 else np.concatenate(embs))
    return pa.concat_tables(tables), emb


def read_gallery(path: str | Path, check_norm: bool = True, embeddings_path: Optional[Path] = None) -> Gallery:
    """A gallery file or a folder of parts (``part-*.parquet``), validated, as one :class:`Gallery`.

    With ``embeddings_path`` (a row-aligned float32/float16 ``.npy``), the embeddings are
    memory-mapped from it instead of read from the ``embedding`` column, which may then be absent:
    galleries larger than memory are mined block by block."""
    path = Path(path)
    table, emb = _read_gallery_table(path, embeddings_path is not None)
    return gallery_from_table(table, path, check_norm, embeddings_path, embeddings=emb)


def gallery_from_table(
    table: pa.Table,
    path: Path,
    check_norm: bool = True,
    embeddings_path: Optional[Path] = None,
    embeddings: Optional[np.ndarray] = None,
) -> Gallery:
    """Validate a gallery-schema Arrow table (``path`` names it in errors) -> :class:`Gallery`;
    ``embeddings_path`` as in :func:`read_gallery`; ``embeddings``: the rows' float32[n, d]
    embeddings read apart (the table's ``embedding`` column, then, may be absent)."""
    GALLERY.check(table.schema, path, ("embedding",) if embeddings_path is not None or embeddings is not None else ())
    if table.column("image_id").null_count:
        raise SchemaError(f"{path}: column 'image_id' has null values.")
    check_no_empty_ids(table, path, ["image_id"], "image")
    id_arr = string_array(table.column("image_id"))
    cat_arr = string_array(table.column("category"))
    ids = object_array(id_arr)
    cats = shared_objects(cat_arr)
    check_no_nulls(table, path, ids, "image", ("category", "path"))
    # image_id is unique within a category. The same id may stand in two categories (real
    # FashionIQ lists 516 ASINs under both shirt and toptee); such rows are one product.
    keys = join_keys(cat_arr.cast(id_arr.type), id_arr)
    dup = first_duplicate(keys)
    if dup is not None:
        raise SchemaError(
            f"{path}: column 'image_id' has a duplicated id '{ids[dup]}' in category '{cats[dup]}'. "
            f"Each gallery image must appear once per category; drop the duplicates."
        )
    if embeddings is None and embeddings_path is not None:
        emb = open_embeddings(embeddings_path, len(ids), path)
        if check_norm:
            for s in range(0, len(ids), 65_536):
                check_embeddings(read_block(emb, s, s + 65_536), embeddings_path, "rows", ids[s:])
                release_pages(emb)
    else:
        emb = embeddings
        if emb is None:
            try:
                emb = embedding_numpy(table.column("embedding"))
            except ValueError:
                raise SchemaError(f"{path}: column 'embedding' has null rows.") from None
        if check_norm:
            check_embeddings(emb, path, "embedding", ids)
    attrs = AttrLists.from_arrow(table.column("attributes"))
    bad = attrs.null_row()
    if bad is not None:
        raise SchemaError(
            f"{path}: column 'attributes' of image '{ids[bad]}' holds a null; each attribute is a "
            f"'group:value' string. Drop the nulls."
        )
    paths = object_array(table.column("path")) if "path" in table.schema.names else None
    return Gallery(path, ids, cats, attrs, emb, paths, _ids=id_arr, _keys=keys, _cats=cat_arr)


def gallery_table(image_ids, categories, attributes, embeddings: np.ndarray, paths=None) -> pa.Table:
    dim = int(embeddings.shape[1])
    cols = [
        pa.array(list(image_ids), pa.string()),
        pa.array(list(categories), pa.string()),
        pa.array([list(a) for a in attributes], pa.list_(pa.string())),
        embedding_array(embeddings),
    ]
    if paths is not None:
        cols.append(pa.array(list(paths), pa.string()))
    return pa.Table.from_arrays(cols, schema=gallery_schema(dim, with_path=paths is not None))


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
