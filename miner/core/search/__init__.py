"""The search layer: for each composed query, which gallery rows are its candidates and what are their
exact scores.

One module per job:

- :mod:`.faiss_api`: the one way FAISS is reached (:func:`load_faiss`, :func:`to_cpu`);
- :mod:`.topk`: top-k in one order everywhere (score descending, ties by the lower row, -1 pads last);
- :mod:`.exact`: the exact kernel (the float32 dot product every written score comes from) and
  exact top-k over the gallery;
- :mod:`.lists`: the list-major IVF-Flat kernel;
- :mod:`.params`: index kinds and their search parameters;
- :mod:`.backends`: the back-ends behind one interface (exact, FAISS indexes re-ranked exactly);
- :mod:`.tuning`: recall tuning against exact search;
- :mod:`.build`: the one index builder and where FAISS puts an index (CPU or GPU);
- :mod:`.persist`: indexes on disk, gallery fingerprints, reopening a table's back-end.

docs/search.md states the contract the back-ends keep.
"""

from cir_mine.miner.core.search.backends import ExactSearch, Reranked, check_backend, search_batched
from cir_mine.miner.core.search.build import build_index, factory_string, sample_rows, use_gpu
from cir_mine.miner.core.search.exact import gathered_dot, gemm_topk
from cir_mine.miner.core.search.faiss_api import load_faiss, to_cpu
from cir_mine.miner.core.search.topk import merge_topk, topk_desc

__all__ = [
    "ExactSearch",
    "Reranked",
    "build_index",
    "check_backend",
    "factory_string",
    "gathered_dot",
    "gemm_topk",
    "load_faiss",
    "merge_topk",
    "sample_rows",
    "search_batched",
    "to_cpu",
    "topk_desc",
    "use_gpu",
]
