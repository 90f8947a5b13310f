"""Parquet files: open one or fail clearly; write one atomically with JSON metadata in its footer."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

from cir_mine.data.atomic import atomic_path
from cir_mine.data.errors import SchemaError
from cir_mine.data.files import check_readable_file

if TYPE_CHECKING:
    import pyarrow as pa


def read_parquet(path: str | os.PathLike, columns=None):
    """The Parquet table at ``path`` (only those of ``columns`` it has, when given) -> pa.Table.

    Raises DataError when the file is missing, SchemaError when it is not readable Parquet."""
    import pyarrow.parquet as pq

    path = Path(path)
    check_readable_file(path)
    with _parquet_errors(path):
        if columns is not None:
            names = pq.read_schema(path).names
            columns = [c for c in columns if c in names]
        return pq.read_table(path, columns=columns)


def read_parquet_schema(path: str | os.PathLike):
    """The schema (with its footer metadata) of the Parquet file at ``path``, rows unread.

    Raises SchemaError when the file is not readable Parquet."""
    import pyarrow.parquet as pq

    with _parquet_errors(Path(path)):
        return pq.read_schema(path)


@contextlib.contextmanager
def _parquet_errors(path: Path) -> Iterator[None]:
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowInvalid, OSError) as e:
        raise SchemaError(f"{path}: not a readable Parquet file ({e}).") from None


def write_table(table: pa.Table, path: str | Path, metadata: Optional[dict] = None, journal: bool = True) -> None:
    """Write ``table`` to ``path`` atomically; ``metadata`` (JSON-able) goes into the file footer
    (``journal``: see :func:`cir_mine.data.atomic.atomic_path`)."""
    import pyarrow.parquet as pq

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
