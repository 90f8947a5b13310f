"""The re-mining hook: ``remine(query_emb) -> MineResult`` for a training loop (cir-train's or yours).

A :class:`Remine` fixes everything but the queries: the workspace split (read once), the FAISS
index (the workspace's saved one, or a flat one built once over the gallery) and the mining
config (given, or read from an earlier negatives table's footer). Each call mines every query of
the split with the model's current query embeddings; with a curriculum, the mix the schedule
names for ``epoch``. cir-train's ``--refresh-every`` calls the same hook (cir_mine.train.refresh).
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np

from cir_mine.data.errors import UsageError
from cir_mine.data.workspace import Workspace
from cir_mine.miner.core.curriculum import Curriculum, mix_spec
from cir_mine.miner.core.mine import MineConfig, MineResult, mine_negatives

log = logging.getLogger(__name__)


class Remine:
    """``remine(query_emb float32[m, d], mining_round=None, epoch=0) -> MineResult`` over ``ws``/``split``.

    Give the mining config either as ``cfg`` or as ``negatives``, a table mined from ``ws`` whose
    footer config is reused. ``schedule`` (default: the config's) picks the mix per epoch.
    ``index``: a FAISS inner-product index over the gallery rows (default: ``index.{split}.faiss``
    when the workspace has one, else an exact flat index built at the first call).
    ``mining_round`` defaults to 1 + the previous call's (1 at the first call).
    """

    def __init__(self, ws: Workspace, split: str = "train", cfg: Optional[MineConfig] = None,
                 negatives: Optional[str | Path] = None, schedule: Optional[str] = None, index=None,
                 device: str = "cpu"):
        from cir_mine.miner.core.tables import read_negatives_meta

        if (cfg is None) == (negatives is None):
            raise UsageError("Remine needs the mining config: pass cfg=MineConfig(...) or negatives=TABLE, not both.")
        self.ws, self.split, self.device = ws.require(), split, device
        base = cfg.to_dict() if cfg is not None else read_negatives_meta(negatives, ws).get("config", {})
        self.base = {**base, "query": "checkpoint"}
        self.schedule = schedule or base.get("schedule")
        MineConfig.from_dict(self.base).validate()
        self._data, self._index, self.mining_round = None, index, 0

    def config(self, epoch: int = 0) -> MineConfig:
        """The config mined at ``epoch``: the base config, with the schedule's mix at that epoch."""
        cfg = MineConfig.from_dict(self.base)
        if self.schedule:
            cfg = replace(cfg, strategy=None, mix=mix_spec(Curriculum.parse(self.schedule).mix_at(epoch)), schedule=None)
        return cfg

    def data(self) -> tuple:
        """(Gallery, Triplets) of the split, read at the first call."""
        if self._data is None:
            self._data = self.ws.load(self.split)
        return self._data

    def index(self):
        if self._index is None:
            from cir_mine.miner.core.search import build_index

            if self.ws.index_path(self.split).exists():
                from cir_mine.miner.encode.index import load_workspace_index

                self._index = load_workspace_index(self.ws, self.split, self.data()[0], device=self.device)
            else:
                self._index = build_index(self.data()[0].embeddings, "flat", device=self.device)
        return self._index

    def __call__(self, query_emb: np.ndarray, mining_round: Optional[int] = None, epoch: int = 0) -> MineResult:
        self.mining_round = self.mining_round + 1 if mining_round is None else int(mining_round)
        res = mine_negatives(self.ws, self.split, self.config(epoch), query_emb=query_emb,
                             mining_round=self.mining_round, index=self.index(), loaded=self.data())
        log.info("re-mined round %d at epoch %d: %d rows", self.mining_round, epoch, res.table.num_rows)
        return res
