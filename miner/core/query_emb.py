"""A user's own query embeddings (``cir-mine negatives --query-emb Q.npy``), checked before mining."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from cir_mine.data.errors import DataError
from cir_mine.data.validate import QUERY_FIX, check_matrix

FIX = QUERY_FIX   # the API's query_emb gets the same advice


def check_query_embeddings(emb: np.ndarray, query_ids: Sequence[str], dim: int, where: str) -> np.ndarray:
    """Validate query embeddings -> float32[m, d] with unit rows (the one validator of outside arrays,
    :func:`cir_mine.data.validate.check_matrix`): a real float array of shape (len(query_ids), dim),
    finite, without all-zero rows. Raises DataError naming ``where`` and the first bad row's query."""
    return check_matrix(emb, where, rows=len(query_ids), dim=dim, ids=query_ids, what="query", fix=FIX)


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
