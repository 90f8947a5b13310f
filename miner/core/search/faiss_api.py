"""The one way the package reaches FAISS: :func:`load_faiss` (imported lazily: FAISS is heavy and
pulls in OpenMP), and :func:`to_cpu` for an index that may live on a GPU."""
from __future__ import annotations


def load_faiss():
    """The ``faiss`` module."""
    import faiss

    return faiss


def to_cpu(index):
    """A CPU copy of a GPU index; a CPU index as it is."""
    faiss = load_faiss()
    return faiss.index_gpu_to_cpu(index) if hasattr(index, "getDevice") else index
