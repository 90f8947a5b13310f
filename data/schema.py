"""The workspace's table schemas: one :class:`TableSchema` per table (see docs/formats.md).

Each table is described once, as a tuple of :class:`Column`; the writers' Arrow schemas
(:meth:`TableSchema.arrow`) and the readers' checks (:meth:`TableSchema.check`) both derive from
it. A reader accepts what a writer of another tool may have chosen (large strings, large lists,
any float width for scores); a writer always writes the canonical types.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from cir_mine.data.errors import SchemaError


def _is_str(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def embedding_type(dim: int) -> pa.DataType:
    """The embedding columns' type: fixed_size_list<float32>[dim]."""
    return pa.list_(pa.float32(), dim)


@dataclass(frozen=True)
class Kind:
    """A column type: what readers accept, what writers write, and its name in messages."""

    # fmt: off
    human: str                      # the type as docs/formats.md and error messages name it
    accepts: object                 # predicate on an Arrow type read from a file
    written: object                 # dim -> the Arrow type a writer uses
    # fmt: on


STRING = Kind("string", _is_str, lambda dim: pa.string())
STRING_LIST = Kind("list<string>", lambda t: _is_list(t) and _is_str(t.value_type), lambda dim: pa.list_(pa.string()))
FLOAT_LIST = Kind(
    "list<float32>", lambda t: _is_list(t) and pa.types.is_floating(t.value_type), lambda dim: pa.list_(pa.float32())
)
EMBEDDING = Kind(
    "fixed_size_list<float32>[d]",
    lambda t: pa.types.is_fixed_size_list(t) and pa.types.is_float32(t.value_type),
    embedding_type,
)


@dataclass(frozen=True)
class Column:
    # fmt: off
    name: str
    kind: Kind
    required: bool = True           # optional columns may be absent; when present their type is checked
    # fmt: on


@dataclass(frozen=True)
class TableSchema:
    """One table's columns, in the order writers write them."""

    # fmt: off
    what: str                       # the table's name in messages: gallery, triplets
    columns: tuple
    # fmt: on

    @property
    def required(self) -> list[str]:
        return [c.name for c in self.columns if c.required]

    @property
    def optional(self) -> list[str]:
        return [c.name for c in self.columns if not c.required]

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)

    def arrow(self, dim: int, optional: Sequence[str] = ()) -> pa.Schema:
        """The Arrow schema a writer uses: the required columns, then ``optional`` in the order given."""
        cols = [c for c in self.columns if c.required] + [self.column(name) for name in optional]
        return pa.schema([pa.field(c.name, c.kind.written(dim)) for c in cols])

    def check(self, schema: pa.Schema, path: Path, without: Sequence[str] = ()) -> None:
        """SchemaError naming ``path`` and the column when a required column (other than ``without``)
        is missing or a column has another type."""
        required = [c for c in self.columns if c.required and c.name not in without]
        for c in required:
            if c.name not in schema.names:
                raise SchemaError(
                    f"{path}: missing column '{c.name}' ({c.kind.human}); a {self.what} table needs the columns "
                    f"{', '.join(r.name for r in required)}. See docs/formats.md."
                )
            t = schema.field(c.name).type
            if not c.kind.accepts(t):
                raise SchemaError(
                    f"{path}: column '{c.name}' has type {t}, expected {c.kind.human}. See docs/formats.md."
                )
        for c in self.columns:
            if not c.required and c.name in schema.names and not c.kind.accepts(schema.field(c.name).type):
                raise SchemaError(
                    f"{path}: column '{c.name}' has type {schema.field(c.name).type}, expected {c.kind.human}."
                )


GALLERY = TableSchema(
    "gallery",
    (
        Column("image_id", STRING),
        Column("category", STRING),
        Column("attributes", STRING_LIST),
        Column("embedding", EMBEDDING),
        Column("path", STRING, required=False),
        # parallel to attributes: the zero-shot probability of each entry (NaN for given tags)
        Column("attribute_scores", FLOAT_LIST, required=False),
    ),
)

TRIPLETS = TableSchema(
    "triplets",
    (
        Column("query_id", STRING),
        Column("category", STRING),
        Column("ref_id", STRING),
        Column("target_id", STRING),
        Column("captions", STRING_LIST),
        Column("text_embedding", EMBEDDING),
        Column("extra_positive_ids", STRING_LIST, required=False),
        Column("verified_negative_ids", STRING_LIST, required=False),
        Column("img_set", STRING_LIST, required=False),
        Column("source", STRING, required=False),
    ),
)


def gallery_schema(dim: int, with_path: bool = False) -> pa.Schema:
    return GALLERY.arrow(dim, ("path",) if with_path else ())


def triplets_schema(dim: int, optional: Sequence[str] = ()) -> pa.Schema:
    return TRIPLETS.arrow(dim, optional)


# ------------------------------------------------------------------------------------------------
# Row checks every reader makes


def object_array(col) -> np.ndarray:
    """An Arrow column as object[n] of Python values."""
    out = np.empty(len(col), dtype=object)
    out[:] = col.to_pylist()
    return out


def check_no_empty_ids(table: pa.Table, path: Path, columns: Sequence[str], what: str) -> None:
    """Id columns hold no empty (or blank) string: an id names one image or query."""
    import pyarrow.compute as pc

    for name in columns:
        col = table.column(name)
        blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0).to_numpy(zero_copy_only=False)
        if blank.any():
            i = int(np.flatnonzero(blank)[0])
            raise SchemaError(
                f"{path}: column '{name}' has {int(blank.sum())} empty id(s) (first: row {i}). Every "
                f"{what} needs an id; drop those rows or name them."
            )


def check_no_nulls(table: pa.Table, path: Path, ids: np.ndarray, what: str, columns: Sequence[str]) -> None:
    """String columns hold no nulls ('' stands for none, e.g. CIRR's category)."""
    for name in columns:
        if name in table.schema.names and table.column(name).null_count:
            col = table.column(name).combine_chunks()
            first = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise SchemaError(
                f"{path}: column '{name}' has {col.null_count} null value(s) (first: {what} "
                f"'{ids[first]}'). Use '' for none, or drop those rows."
            )
