"""The refresh's miner call: re-mine a split with the config stored in a negatives table.

:func:`miner_remine` returns the ``remine(query_emb, mining_round, epoch) -> (table, meta)`` callable the
training loop takes (cir_mine.train.loop.Remine). It reads the mining config from the table's footer
(``meta["config"]``), reads the split and opens the workspace's FAISS index once (or builds a flat
one over the gallery once) and calls ``cir_mine.miner.core.mine.mine_negatives`` with the current model's query
embeddings, so every round uses the exact same config, data and index; only the queries (and, with
a schedule, the mix) change.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from cir_mine.data.workspace import Workspace

log = logging.getLogger(__name__)


def miner_remine(work: str | Path, split: str, negatives: str | Path, schedule: Optional[str] = None):
    """-> remine(query_emb float32[m, d], mining_round, epoch) -> (pa.Table, meta) over ``work``/``split``."""
    from cir_mine.miner.core.search import build_index
    from cir_mine.miner.encode.index import load_workspace_index
    from cir_mine.miner.core.mine import MineConfig, mine_negatives
    from cir_mine.miner.core.tables import read_negatives_meta

    ws = Workspace(work).require()
    base = read_negatives_meta(negatives, ws).get("config", {})
    state: dict = {}

    def data():
        if "data" not in state:                         # read once, reused by every round
            state["data"] = ws.load(split)
        return state["data"]

    def index():
        if "index" not in state:
            p = ws.index_path(split)
            state["index"] = (load_workspace_index(ws, split, device="cpu") if p.exists()
                              else build_index(data()[0].embeddings, "flat", device="cpu"))
        return state["index"]

    def remine(query_emb: np.ndarray, mining_round: int, epoch: int):
        cfg = MineConfig.from_dict({**base, "query": "checkpoint"})
        sched = schedule or base.get("schedule")
        if sched:
            cfg = _with_mix(cfg, sched, epoch)
        res = mine_negatives(ws, split, cfg, query_emb=query_emb, mining_round=mining_round, index=index(), loaded=data())
        log.info("re-mined round %d at epoch %d: %d rows", mining_round, epoch, res.table.num_rows)
        return res.table, res.meta

    return remine


def _with_mix(cfg, schedule: str, epoch: int):
    """The mining config with the mix the schedule names for ``epoch`` (query embeddings given)."""
    from dataclasses import replace

    from cir_mine.miner.core.curriculum import Curriculum, mix_spec

    return replace(cfg, strategy=None, mix=mix_spec(Curriculum.parse(schedule).mix_at(epoch)), schedule=None)
