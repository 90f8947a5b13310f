"""Compact per-row gallery metadata: ids, categories and attribute lists held in Arrow and numpy
buffers rather than one Python object per row, and vectorized id -> row lookups.

A gallery of millions of rows is mined from a memory-mapped embedding file; what stays resident is
its metadata. Held as Python objects (a list per row, a dict entry per id) that metadata costs about
half a kilobyte a row, more than the compressed index; held here it costs a few dozen bytes.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cir_mine.data.memory import fast_pool

KEY_SEP = "\x1f"  # joins category and image id into one lookup key (a control character no id holds)


def string_array(values) -> pa.Array:
    """One Arrow string array (large_string only past 2 GiB of text) from a column, array or list."""
    if isinstance(values, pa.ChunkedArray):
        try:
            return values.cast(pa.string()).combine_chunks()
        except (pa.ArrowInvalid, pa.ArrowCapacityError):
            return values.cast(pa.large_string()).combine_chunks()
    if isinstance(values, pa.Array):
        return values
    if isinstance(values, np.ndarray):
        values = values.tolist()
    try:
        return pa.array(list(values), pa.string())
    except (pa.ArrowInvalid, pa.ArrowCapacityError):
        return pa.array(list(values), pa.large_string())
    except pa.ArrowTypeError:
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def shared_objects(col) -> np.ndarray:
    """object[n] of str with one Python object per distinct value (a category column of millions of
    rows costs 8 bytes a row, not a string each). Nulls stay None."""
    arr = string_array(col)
    enc = pc.dictionary_encode(arr)
    words = np.empty(len(enc.dictionary) + 1, dtype=object)
    words[:-1] = enc.dictionary.to_pylist()
    words[-1] = None
    idx = enc.indices.fill_null(len(enc.dictionary)).to_numpy(zero_copy_only=False)
    return words[idx]


def gather(values, indices) -> pa.Array:
    """``values[indices]`` (an Arrow array or chunked array; ``indices`` int64 numpy or Arrow), its
    buffers allocated from :func:`~cir_mine.data.memory.fast_pool` whatever the process's default
    pool. A table built by gathers allocates fresh memory that mimalloc (pyarrow's default) hands
    back to the OS between runs; on a VM that returns freed pages to its host each gather then
    faults its pages in again, 4x slower (a 1.6M-row negatives table: 0.1 s against 0.02 s a string
    column; ``bench/negatives.py speed``)."""
    if not isinstance(indices, (pa.Array, pa.ChunkedArray)):
        indices = pa.array(indices)
    return pc.take(values, indices, memory_pool=fast_pool())


def sorted_codes(arr: pa.Array) -> tuple[np.ndarray, list]:
    """(int64[n] code of each value in sorted order of the distinct values, the sorted distinct
    values): ``np.unique(values, return_inverse=True)`` computed in Arrow."""
    enc = pc.dictionary_encode(arr)
    order = pc.array_sort_indices(enc.dictionary).to_numpy()
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order), dtype=np.int64)
    codes = rank[enc.indices.to_numpy(zero_copy_only=False)] if len(arr) else np.zeros(0, np.int64)
    return codes, enc.dictionary.take(pa.array(order)).to_pylist()


def join_keys(categories: pa.Array, ids: pa.Array) -> pa.Array:
    """category + KEY_SEP + id per row (null where either is null)."""
    return pc.binary_join_element_wise(categories, ids, KEY_SEP)


def index_of(probe: pa.Array, value_set: pa.Array) -> np.ndarray:
    """int64[len(probe)]: the first row of ``value_set`` equal to each probe value, -1 when absent."""
    if len(probe) == 0:
        return np.zeros(0, np.int64)
    if probe.type != value_set.type:
        probe = probe.cast(value_set.type)
    return pc.index_in(probe, value_set=value_set).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def first_duplicate(keys: pa.Array) -> Optional[int]:
    """The row of the first value that repeats an earlier one, or None when all are distinct."""
    if pc.count_distinct(keys, mode="all").as_py() == len(keys):
        return None
    first = index_of(keys, keys)
    dup = np.flatnonzero(first != np.arange(len(keys)))
    return int(dup[0]) if dup.size else None


class AttrLists(Sequence):
    """Per-row attribute lists: row i's tags are ``values[offsets[i]:offsets[i + 1]]``, each distinct
    tag one shared string. Indexing gives a fresh ``list[str]``, as a list of lists would."""

    __slots__ = ("offsets", "values", "arrow")

    def __init__(self, arrow: pa.Array):
        self.arrow = arrow  # list<string>[n], nulls read as empty
        lengths = pc.fill_null(pc.list_value_length(arrow), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        self.offsets = np.zeros(len(lengths) + 1, dtype=np.int64)  # int64[n + 1] row starts in ``values``
        np.cumsum(lengths, out=self.offsets[1:])
        self.values = shared_objects(pc.list_flatten(arrow))  # object[e] every row's tags, in row order

    @classmethod
    def from_arrow(cls, col) -> "AttrLists":
        """From a list<string> column."""
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
        return cls(col)

    @classmethod
    def from_lists(cls, lists: Iterable[Sequence[str]]) -> "AttrLists":
        return cls(pa.array([list(a or []) for a in lists], pa.list_(pa.string())))

    def __reduce__(self):
        return (AttrLists, (self.arrow,))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.values[self.offsets[i] : self.offsets[i + 1]].tolist()

    def __iter__(self) -> Iterator[list]:
        values, offsets = self.values, self.offsets.tolist()
        for s, e in zip(offsets[:-1], offsets[1:]):
            yield values[s:e].tolist()

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(other) == len(self) and all(list(a) == list(b) for a, b in zip(self, other))

    __hash__ = None

    def __repr__(self) -> str:
        return f"AttrLists({len(self)} rows, {len(self.values)} tags)"

    def null_row(self) -> Optional[int]:
        """The first row holding a None tag, or None."""
        if not pc.list_flatten(self.arrow).null_count:
            return None
        bad = next(j for j, v in enumerate(self.values.tolist()) if v is None)
        return int(np.searchsorted(self.offsets, bad, side="right") - 1)

    def combos(self) -> tuple[np.ndarray, list]:
        """(int32[n] combination id per row, the combinations as sorted tuples), ids in order of first
        appearance: rows with the same tags in any order share one id. Vectorized over rows; Python
        runs once per distinct tag list."""
        flat = pc.list_flatten(self.arrow)
        if len(flat) and (pc.any(pc.equal(flat, "")).as_py() or pc.any(pc.match_substring(flat, KEY_SEP)).as_py()):
            of: dict = {}
            combo = np.fromiter((of.setdefault(tuple(sorted(a)), len(of)) for a in self), np.int32, len(self))
            return combo, list(of)
        joined = pc.fill_null(pc.binary_join(self.arrow, KEY_SEP), "")
        enc = pc.dictionary_encode(joined)  # dictionary in order of first appearance
        of = {}
        slot = np.array(
            [of.setdefault(tuple(sorted(s.split(KEY_SEP))) if s else (), len(of)) for s in enc.dictionary.to_pylist()],
            np.int32,
        )
        idx = enc.indices.to_numpy(zero_copy_only=False)
        return (slot[idx] if len(idx) else np.zeros(0, np.int32)), list(of)
