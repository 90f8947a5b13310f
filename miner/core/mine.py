"""Mining: queries -> search back-end -> guards -> strategies -> one long-format negatives table.

``mine_negatives(ws, split, cfg)`` runs the steps and returns a :class:`MineResult` (an Arrow table
in the negatives schema and the footer metadata); ``mine_to_file`` adds the lock and the atomic
write. The steps, one module each: the config (:mod:`~cir_mine.miner.core.config`), prepare
(:mod:`~cir_mine.miner.core.prepare`), the search back-end (:mod:`~cir_mine.miner.core.backend`),
search, guard and select per batch along the depth ladder (:mod:`~cir_mine.miner.core.schedule`,
strategies seeing a :class:`~cir_mine.miner.core.context.BatchContext`), the optional recall report
(:mod:`~cir_mine.miner.core.recall`) and assemble (:mod:`~cir_mine.miner.core.assemble`). Rows
depend on (inputs, config, seed) only, never on the batch size or on how deep a batch was searched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa

from cir_mine.data.io import check_output, write_job
from cir_mine.data.progress import Progress
from cir_mine.data.workspace import Workspace, file_digest
from cir_mine.miner.core.assemble import assemble_table, footer, seconds, stage_seconds
from cir_mine.miner.core.backend import exact_reference, open_search
from cir_mine.miner.core.config import MineConfig
from cir_mine.miner.core.prepare import prepare
from cir_mine.miner.core.recall import check_recall
from cir_mine.miner.core.schedule import mine_queries
from cir_mine.miner.core.search.persist import save_backend_index, saved_index_path
from cir_mine.miner.core.strategies import REGISTRY
from cir_mine.miner.core.tables import write_negatives

__all__ = ["MineConfig", "MineResult", "mine_negatives", "mine_to_file"]

log = logging.getLogger(__name__)


@dataclass
class MineResult:
    # fmt: off
    table: pa.Table                         # negatives schema, one row per (query, negative)
    meta: dict                              # footer metadata (config, shortfall, guard counts, ...)
    guard_counts: dict = field(default_factory=dict)  # guard -> int64[m] candidates removed per query
    backend: object = field(default=None, repr=False)  # the search back-end the run used (None: no search)
    # fmt: on

    @property
    def shortfall(self) -> list:
        return self.meta["shortfall"]["query_ids"]

    def grouped(self, ws: Optional[Workspace] = None):
        """The table per query, as :meth:`cir_mine.miner.core.tables.NegativesTable.grouped`."""
        from cir_mine.miner.core.tables import NegativesTable

        return NegativesTable(None, self.table, self.meta).grouped(ws)


def mine_negatives(
    ws: Workspace,
    split: str,
    cfg: MineConfig,
    query_emb: Optional[np.ndarray] = None,
    mining_round: int = 0,
    index=None,
    progress: Progress = None,
    loaded: Optional[tuple] = None,
    query_ids: Optional[Sequence[str]] = None,
) -> MineResult:
    """Mine negatives for every query of ``split``: prepare, open the search back-end, then per batch
    search (approximate back-ends re-ranked exactly), guard and select; deepen short queries;
    assemble the table and its footer.

    query_emb: float32[m, d] normalized query embeddings (a trained model's, from cir-train's
    refresh); None with ``cfg.query == 'zero-shot'`` uses normalize(ref + w * text).
    index: a search back-end (see cir_mine.miner.core.search.backends) or a FAISS inner-product index over the
    gallery rows, or a factory of one (``cir_mine.miner.accel.device_search``: exact search on the
    GPU the device rule picks); default: the one ``cfg.index`` names (exact flat unless told).
    progress: ``progress(n, total=None)`` (:mod:`cir_mine.data.progress`), n queries more finished per batch.
    loaded: ``ws.load(split)`` already in memory (cir-train's refresh mines the same split every
    round), so the gallery and triplets are not read again.
    query_ids: the query id of each row of ``query_emb`` (any order, e.g. your dataset's): the rows
    are put in the triplets' order; an unknown, repeated or missing query raises DataError."""
    t0 = time.perf_counter()
    if query_ids is not None:
        from cir_mine.miner.core.query_emb import align_query_embeddings

        loaded = loaded if loaded is not None else ws.require().load(split)
        query_emb = align_query_embeddings(query_emb, query_ids, loaded[1].query_ids, "query_emb")
    prep = prepare(ws, split, cfg, query_emb, mining_round, loaded)
    backend, search_meta = open_search(prep, ws, split, cfg, index) if prep.need_ranked else (None, {"index": "none"})
    prep.prepared = {
        name: REGISTRY[name].prepare(prep.pool, prep.qs, backend, cfg, ki)
        for name, ki, _ in prep.mined
        if REGISTRY[name].prepare is not None
    }
    t_prep = time.perf_counter() - t0
    prefetch = cfg.prefetch if cfg.prefetch is not None else default_prefetch(search_meta)
    before = _measured(backend)
    mined = mine_queries(prep, cfg, backend, np.arange(prep.m, dtype=np.int64), prefetch, progress)
    after = _measured(backend)
    if cfg.check_recall and backend is not None:
        reference = getattr(backend, "reference", None) or exact_reference(prep.pool.xb, cfg, index)
        search_meta["check"] = check_recall(prep, cfg, backend, mined, reference)
        if getattr(backend, "reference", None) is not None:
            backend.reference = None  # its memory (a bfloat16 gallery copy) goes with it
    search_meta["prefetch"] = bool(prefetch)
    t2 = time.perf_counter()
    table = assemble_table(prep.pool, prep.qs, prep.parts, mined.out, mining_round, cfg.seed)
    timing = stage_seconds(
        prep, mined, before.get("seconds", {}), after.get("seconds", {}), t_prep, time.perf_counter() - t2
    )
    timing["total_s"] = seconds(time.perf_counter() - t0)
    if after.get("kernels"):
        timing["kernels"] = after["kernels"]  # the kernel race: microseconds per query of each kernel
    meta = footer(ws, split, cfg, prep, mined, table, mining_round, query_emb is None, search_meta, timing)
    log.info("mined %d rows for %d queries (shortfall %d)", table.num_rows, prep.m, meta["shortfall"]["count"])
    return MineResult(table, meta, mined.guard_counts, backend)


def default_prefetch(search_meta: dict) -> bool:
    """Whether the next batch is searched while the current one is guarded when ``cfg.prefetch`` is
    None: with a GPU back-end (the device works while the host finishes a batch). Not on the CPU: the
    search already uses every core, and a second search beside it gains nothing (docs/benchmarks.md,
    "Negatives": 0.98x the wall time at 1M x 256 with deepening, 4.5x the deepening passes' time)."""
    return bool(search_meta.get("gpu"))


def _measured(backend) -> dict:
    """A back-end's kernel race and seconds per stage so far ({} for one that does not measure)."""
    return backend.measured() if hasattr(backend, "measured") else {}


def mine_to_file(
    ws: Workspace, split: str, cfg: MineConfig, out: str | Path, overwrite: bool = True, reads: Sequence = (), **kw
) -> MineResult:
    """Mine and write ``out`` atomically, holding the lock of its directory.

    ``out`` is checked first (:func:`cir_mine.data.io.check_output`): never a workspace file or one of
    ``reads`` (other inputs, e.g. a checkpoint), and an existing file only with ``overwrite``. An
    approximate index built for this run is saved beside the table (``{out}.faiss``, its
    fingerprint in the footer), so cir-train's refresh searches exactly the same index."""
    out = check_output(out, reads, overwrite)
    with write_job(out.parent, f"cir-mine negatives -> {out.name}"):
        return write_result(mine_negatives(ws, split, cfg, **kw), out)


def write_result(res: MineResult, out: Path) -> MineResult:
    """Write a mined table to ``out`` (checked, inside the write job of its directory). An approximate
    index built for the run is saved beside it first (``{out}.faiss``, its fingerprint in the footer)."""
    search = res.meta["search"]
    if search.get("source") == "built" and not search.get("exact", True):
        side = saved_index_path(out)
        save_backend_index(res.backend, side)
        search["file"], search["fingerprint"] = side.name, file_digest(side)
    t = time.perf_counter()
    write_negatives(res.table, out, res.meta)
    res.meta["timing"]["write_s"] = seconds(time.perf_counter() - t)  # not in the file: it is being written
    return res
