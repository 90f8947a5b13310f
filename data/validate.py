"""One validator for arrays and ids that come from outside cir-mine: feature imports (``.npy`` with an
ids file, ``.parquet``, clip-retrieval folders), query embeddings (``--query-emb``, the API's
``query_emb``) and ``Workspace.from_arrays``. Every entry point calls these functions, so the CLI and
the Python API refuse the same inputs with the same one-line message (:class:`DataError`, naming
``where``: a file, or the parameter the array was passed as).

- :func:`check_matrix`: a real floating-point array [n, d] (float16/32/64; not complex, integer, bool
  or object), of the expected shape, finite, without all-zero rows; rows L2-normalized to float32 with
  norms computed without overflow or underflow (rows scaled by their largest entry before squaring);
  rows already of unit length (within 1e-5) are kept bit for bit.
- :func:`check_ids`: ids as non-empty strings (a byte-order mark stripped; nulls, non-strings and NUL
  characters refused), unique (within a category when categories are given).
- :func:`check_labels`: categories or paths as strings (a null is '').
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from cir_mine.data.errors import DataError

BLOCK = 65_536  # rows checked and normalized at a time (bounded memory on large galleries)
NORM_TOLERANCE = 1e-3  # |norm - 1| allowed for rows that must arrive normalized
QUERY_FIX = "Give float32[n_queries, d], one row per query in the triplets' row order."
UNIT = 1e-5  # |norm - 1| up to which a row counts as normalized already and is kept as given


def _row_name(i: int, ids: Optional[Sequence[str]], what: str) -> str:
    return f"row {i}" + (f", {what} {ids[i]}" if ids is not None and i < len(ids) else "")


def check_matrix(
    x,
    where: str,
    *,
    rows: Optional[int] = None,
    dim: Optional[int] = None,
    ids: Optional[Sequence[str]] = None,
    what: str = "image",
    normalize: bool = True,
    fix: str = "",
) -> np.ndarray:
    """``x`` -> float32[n, d] with unit rows (``normalize``), or checked to be unit rows already.

    rows / dim: the shape it must have (None: any non-empty). ids: names the first bad row in the
    message (as ``what ID``). fix: a sentence appended to shape and dtype errors (how to write the file).
    """
    tail = f" {fix}" if fix else ""
    a = x if isinstance(x, np.ndarray) else _as_array(x, where, tail)
    if np.iscomplexobj(a):
        raise DataError(
            f"{where}: complex values (dtype {a.dtype}); expected real floating-point numbers (float32).{tail}"
        )
    if not np.issubdtype(a.dtype, np.floating):
        raise DataError(f"{where}: dtype {a.dtype}, expected floating point (float32).{tail}")
    want = (rows if rows is not None else "n", dim if dim is not None else "d")
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        if rows is not None and dim is not None:
            want = (rows, dim)
            raise DataError(
                f"{where}: shape {tuple(a.shape)}, expected {want}: one row per {what} of the split, in "
                f"the gallery's dimension.{tail}"
            )
        raise DataError(f"{where}: shape {tuple(a.shape)}, expected a non-empty 2-d array [n, d].{tail}")
    want = (rows if rows is not None else a.shape[0], dim if dim is not None else a.shape[1])
    if a.shape != want:
        raise DataError(
            f"{where}: shape {tuple(a.shape)}, expected {want}: one row per {what} of the split, in the "
            f"gallery's dimension.{tail}"
        )
    out = np.empty(a.shape, np.float32)
    for s in range(0, a.shape[0], BLOCK):
        out[s : s + BLOCK] = _unit_rows(np.asarray(a[s : s + BLOCK]), s, where, ids, what, normalize)
    return out


def _as_array(x, where: str, tail: str) -> np.ndarray:
    try:
        a = np.asarray(x)
    except ValueError:
        a = np.asarray(x, dtype=object)
    if a.dtype == object:
        raise DataError(
            f"{where}: not a numeric array (rows of different lengths, nulls or objects); expected float[n, d].{tail}"
        )
    return a


def _unit_rows(b: np.ndarray, start: int, where: str, ids, what: str, normalize: bool) -> np.ndarray:
    redo = "Re-encode those queries." if what == "query" else "Recompute or drop those rows."
    finite = np.isfinite(b).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DataError(
            f"{where}: {bad.size} row(s) with NaN or inf values (first: "
            f"{_row_name(start + int(bad[0]), ids, what)}). {redo}"
        )
    big = np.abs(b).max(axis=1)  # each row's largest entry: scaling by it never overflows
    zero = big == 0
    if zero.any():
        bad = np.flatnonzero(zero)
        article = "an" if what[0] in "aeiou" else "a"
        raise DataError(
            f"{where}: {bad.size} all-zero row(s) (first: {_row_name(start + int(bad[0]), ids, what)}); "
            f"{article} {what} embedding needs a direction. {redo}"
        )
    with np.errstate(all="ignore"):
        b32 = b.astype(np.float32)
        norm = np.linalg.norm(b32, axis=1)
        plain = np.isfinite(norm) & (norm > 1e-15) & np.isfinite(b32).all(axis=1)
        out = np.empty(b.shape, np.float32)
        out[plain] = b32[plain] / norm[plain, None]  # x / ||x|| for ordinary rows
        unit = plain & (np.abs(norm - 1.0) <= UNIT)
        out[unit] = b32[unit]  # normalized already: kept bit for bit
        if not plain.all():  # tiny or huge rows: scale first, then normalize
            scaled = b[~plain] / big[~plain, None]
            out[~plain] = (scaled / np.linalg.norm(scaled, axis=1, keepdims=True)).astype(np.float32)
        if normalize:
            return out
        sn = big.astype(np.float64) * np.linalg.norm((b / big[:, None]).astype(np.float64), axis=1)
        off = np.abs(sn - 1.0) > NORM_TOLERANCE
        if off.any():
            i = int(np.flatnonzero(off)[0])
            raise DataError(
                f"{where}: {int(off.sum())} row(s) that are not L2-normalized (first: "
                f"{_row_name(start + i, ids, what)} with norm {sn[i]:.4g}). Normalize them (x / ||x||), "
                f"or pass normalize=True."
            )
    return b32


def check_ids(
    values, where: str, what: str = "image id", categories: Optional[Sequence[str]] = None, unique: bool = True
) -> list[str]:
    """Ids from outside -> list[str]: each a non-empty string without NUL characters (a leading
    byte-order mark stripped); with ``unique``, no id twice (within its category when ``categories``)."""
    out = []
    for i, v in enumerate(values):
        if v is None:
            raise DataError(f"{where}: {what} of row {i} is null. Every row needs an id; drop the row or name it.")
        if not isinstance(v, str):
            raise DataError(f"{where}: {what} of row {i} is {v!r} ({type(v).__name__}); ids must be strings.")
        v = v.lstrip("\ufeff")
        if not v.strip():
            raise DataError(f"{where}: {what} of row {i} is empty. Every row needs an id; drop the row or name it.")
        if "\x00" in v:
            raise DataError(f"{where}: {what} of row {i} ({v!r}) holds a NUL character. Remove it.")
        out.append(v)
    if unique:
        seen: set = set()
        keys = zip(categories, out) if categories is not None else ((None, v) for v in out)
        for key in keys:
            if key in seen:
                inside = f" in category '{key[0]}'" if key[0] else ""
                raise DataError(
                    f"{where}: {what} '{key[1]}' appears twice{inside}. Each image needs one feature row; "
                    f"drop the duplicates."
                )
            seen.add(key)
    return out


def check_labels(values, where: str, what: str = "category") -> list[str]:
    """Categories or paths from outside -> list[str] (a null is ''; anything but a string is refused)."""
    out = []
    for i, v in enumerate(values):
        if v is None:
            v = ""
        if not isinstance(v, str):
            raise DataError(f"{where}: {what} of row {i} is {v!r} ({type(v).__name__}); expected a string.")
        out.append(v.lstrip("\ufeff"))
    return out
