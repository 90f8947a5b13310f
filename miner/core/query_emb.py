"""A user's own query embeddings (``cir-mine negatives --query-emb Q.npy``), checked before mining."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from cir_mine.data.errors import DataError
from cir_mine.data.workspace import l2_normalize

FIX = "Save float32[n_queries, d] with numpy.save, one row per query in the triplets' row order."


def check_query_embeddings(emb: np.ndarray, query_ids: Sequence[str], dim: int, where: str) -> np.ndarray:
    """Validate query embeddings -> float32[m, d] with unit rows.

    ``emb`` must be a float array of shape (len(query_ids), dim), finite, without all-zero rows;
    rows are L2-normalized. Raises DataError naming ``where`` and the first bad row's query."""
    m = len(query_ids)
    if not np.issubdtype(emb.dtype, np.floating):
        raise DataError(f"{where}: dtype {emb.dtype}, expected floating point (float32). {FIX}")
    if emb.shape != (m, dim):
        raise DataError(f"{where}: shape {tuple(emb.shape)}, expected ({m}, {dim}): one row per query of the "
                        f"split, in the gallery's dimension. {FIX}")
    emb = emb.astype(np.float32, copy=False)
    finite = np.isfinite(emb).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DataError(f"{where}: {bad.size} row(s) with NaN or inf values (first: row {bad[0]}, query "
                        f"{query_ids[bad[0]]}). Re-encode those queries.")
    zero = ~np.any(emb != 0, axis=1)
    if zero.any():
        bad = np.flatnonzero(zero)
        raise DataError(f"{where}: {bad.size} all-zero row(s) (first: row {bad[0]}, query {query_ids[bad[0]]}); "
                        f"a query embedding needs a direction. Re-encode those queries.")
    return l2_normalize(emb)


def read_query_embeddings(path: str | Path, query_ids: Sequence[str], dim: int) -> np.ndarray:
    """Load a .npy of query embeddings and check it (:func:`check_query_embeddings`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: query embeddings not found. {FIX}")
    try:
        emb = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy file ({e}). {FIX}") from None
    if not isinstance(emb, np.ndarray):
        raise DataError(f"{path}: holds several arrays (.npz), expected one .npy array. {FIX}")
    return check_query_embeddings(emb, query_ids, dim, str(path))
