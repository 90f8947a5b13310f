"""A user's own query embeddings (``cir-mine negatives --query-emb Q.npy``), checked before mining."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from cir_mine.data.errors import DataError, UsageError
from cir_mine.data.validate import QUERY_FIX, check_matrix

FIX = QUERY_FIX  # the API's query_emb gets the same advice


def check_query_embeddings(emb: np.ndarray, query_ids: Sequence[str], dim: int, where: str) -> np.ndarray:
    """Validate query embeddings -> float32[m, d] with unit rows (the one validator of outside arrays,
    :func:`cir_mine.data.validate.check_matrix`): a real float array of shape (len(query_ids), dim),
    finite, without all-zero rows. Raises DataError naming ``where`` and the first bad row's query."""
    return check_matrix(emb, where, rows=len(query_ids), dim=dim, ids=query_ids, what="query", fix=FIX)


def align_query_embeddings(emb: np.ndarray, given_ids: Sequence, query_ids: Sequence[str], where: str) -> np.ndarray:
    """Rows given with their query ids -> the rows in ``query_ids``' order (the split's triplets).

    emb: [len(given_ids), d], row i the query ``given_ids[i]`` (any order, e.g. a training loop's
    own dataset order). Raises DataError for an id the split does not have, an id given twice, a
    query of the split left out, or a row count that is not the number of ids. Values are checked
    by :func:`check_query_embeddings`."""
    if emb is None:
        raise UsageError(
            "query_ids names the rows of query_emb; pass query_emb too.", params=("query_ids", "query_emb")
        )
    given = [None if q is None else str(q) for q in (given_ids.tolist() if hasattr(given_ids, "tolist") else given_ids)]
    emb = np.asarray(emb)
    if emb.ndim < 1 or emb.shape[0] != len(given):
        raise DataError(
            f"{where}: {emb.shape[0] if emb.ndim else 0} rows but {len(given)} query ids; give one id per row.",
            params=("query_ids",),
        )
    if None in given:
        i = given.index(None)
        raise DataError(
            f"{where}: query_ids[{i}] is None (an item without a query, e.g. a FashionIQ entry whose "
            f"captions are all empty); leave its row out.",
            params=("query_ids",),
        )
    pos = {q: i for i, q in enumerate(query_ids.tolist() if hasattr(query_ids, "tolist") else query_ids)}
    unknown = [q for q in given if q not in pos]
    if unknown:
        raise DataError(
            f"{where}: {len(unknown)} query id(s) are not queries of the split (first: {unknown[0]}); "
            f"the split has {len(pos)} queries, e.g. {next(iter(pos), '-')}.",
            params=("query_ids",),
        )
    rows = np.fromiter((pos[q] for q in given), np.int64, len(given))
    seen = np.bincount(rows, minlength=len(pos))
    if (seen > 1).any():
        first = next(q for q in given if seen[pos[q]] > 1)
        raise DataError(
            f"{where}: query id {first} is given {int(seen.max())} times; give each query once.", params=("query_ids",)
        )
    if (seen == 0).any():
        ids = list(pos)
        missing = np.flatnonzero(seen == 0)
        raise DataError(
            f"{where}: {missing.size} of the split's {len(pos)} queries are missing (first: "
            f"{ids[missing[0]]}); give a row for every query of the split.",
            params=("query_ids",),
        )
    out = np.empty_like(emb)
    out[rows] = emb
    return out


def read_query_ids(path: str | Path) -> list[str]:
    """Query ids from a file: one per line (.txt, blank lines skipped) or a JSON list (.json)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: query ids not found. Write one query id per line, in the rows' order.")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            ids = json.loads(text)
        except ValueError as e:
            raise DataError(f"{path}: malformed JSON ({e}); expected a list of query ids.") from None
        if not isinstance(ids, list) or not all(isinstance(x, str) for x in ids):
            raise DataError(f"{path}: expected a JSON list of query id strings.")
        return ids
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_query_embeddings(
    path: str | Path, query_ids: Sequence[str], dim: int, given_ids: Optional[Sequence[str]] = None
) -> np.ndarray:
    """Load a .npy of query embeddings and check it (:func:`check_query_embeddings`); with
    ``given_ids`` (the query id of each row), reorder it to ``query_ids``' order first."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: query embeddings not found. {FIX}")
    try:
        emb = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy file ({e}). {FIX}") from None
    if not isinstance(emb, np.ndarray):
        raise DataError(f"{path}: holds several arrays (.npz), expected one .npy array. {FIX}")
    if given_ids is not None:
        emb = align_query_embeddings(emb, given_ids, query_ids, str(path))
    return check_query_embeddings(emb, query_ids, dim, str(path))
