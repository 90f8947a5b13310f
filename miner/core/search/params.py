"""Index kinds and their search parameters (nprobe, efSearch): parse, set, read, what to tune."""

from __future__ import annotations

from typing import Optional

from cir_mine.data.errors import UsageError
from cir_mine.miner.core.search.faiss_api import load_faiss

SEARCH_PARAM = {"ivf": "nprobe", "hnsw": "efSearch"}  # index kind -> the search parameter tuning sets


def parse_search_params(spec: Optional[str]) -> dict:
    """'nprobe=16,efSearch=64' -> {'nprobe': 16, 'efSearch': 64} (integers)."""
    out: dict = {}
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, eq, value = part.partition("=")
        try:
            out[name.strip()] = int(value)
        except ValueError:
            raise UsageError(
                f"search_params {spec!r}: use name=integer pairs separated by commas, e.g. nprobe=16 or efSearch=128.",
                params=("search_params",),
            ) from None
        if not eq:
            raise UsageError(
                f"search_params {spec!r}: use name=integer pairs, e.g. nprobe=16.", params=("search_params",)
            )
    return out


def index_kind(index) -> str:
    """'ivf' | 'hnsw' | 'flat' | 'other' for a FAISS index (CPU or GPU)."""
    faiss = load_faiss()
    if faiss.try_extract_index_ivf(index) is not None if hasattr(faiss, "try_extract_index_ivf") else False:
        return "ivf"
    name = type(faiss.downcast_index(index)).__name__ if hasattr(faiss, "downcast_index") else ""
    if "HNSW" in name:
        return "hnsw"
    if "Flat" in name:
        return "flat"
    return "other"


def cpu_ivf(index):
    """The CPU ``IndexIVF`` that ``index`` is (downcast), or None (a GPU index, a pre-transform or
    another wrapper, a non-IVF index)."""
    faiss = load_faiss()
    if hasattr(index, "getDevice"):
        return None
    ivf = faiss.downcast_index(index)
    return ivf if isinstance(ivf, faiss.IndexIVF) else None


def set_search_params(index, params: dict) -> None:
    """Apply {'nprobe': n, 'efSearch': e} to a FAISS index (CPU or GPU); UsageError for names it lacks."""
    if not params:
        return
    faiss = load_faiss()
    ps = (
        faiss.GpuParameterSpace()
        if hasattr(index, "getDevice") and hasattr(faiss, "GpuParameterSpace")
        else faiss.ParameterSpace()
    )
    for name, value in params.items():
        try:
            ps.set_index_parameter(index, name, int(value))
        except RuntimeError:
            raise UsageError(
                f"search parameter {name}={value}: the index ({type(index).__name__}) has no "
                f"parameter {name!r}; IVF indexes take nprobe, HNSW takes efSearch."
            ) from None


def current_params(index) -> dict:
    """The tunable search parameter of ``index`` with its current value ({} for flat)."""
    faiss = load_faiss()
    kind = index_kind(index)
    if kind == "ivf":
        return {"nprobe": int(faiss.extract_index_ivf(index).nprobe)}
    if kind == "hnsw":
        return {"efSearch": int(faiss.downcast_index(index).hnsw.efSearch)}
    return {}


def tunable(index) -> tuple[str, list]:
    """(parameter name, increasing values to try) for ``index``; ('', []) when nothing is tunable."""
    kind = index_kind(index)
    if kind == "ivf":
        nlist = faiss_nlist(index)
        top = min(nlist, 2048) if hasattr(index, "getDevice") else nlist  # GPU IVF: nprobe <= 2048
        vals = sorted({min(top, 2**i) for i in range(0, 31) if 2 ** (i - 1) < top})
        return "nprobe", vals
    if kind == "hnsw":
        return "efSearch", [2**i for i in range(4, 14)]
    return "", []


def faiss_nlist(index) -> int:
    """Inverted lists of the IVF index inside ``index`` (a wrapped or GPU one included)."""
    return int(load_faiss().extract_index_ivf(index).nlist)


def default_overfetch(factory: str) -> float:
    """Over-fetch for exact re-ranking: 1 when the index stores full vectors (its ranking is exact
    within the lists it visits), 4 for compressed codes (PQ, SQ), whose ranking is approximate."""
    return 4.0 if any(t in factory for t in ("PQ", "SQ", "LSH", "RaBitQ")) else 1.0
