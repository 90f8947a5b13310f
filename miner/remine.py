"""The re-mining hook: ``remine(query_emb) -> MineResult`` for a training loop (cir-train's or yours).

A :class:`Remine` fixes everything but the queries: the workspace split (read once), the search
back-end (the one an earlier negatives table was mined with, reopened from its footer, or the one
the first call opens from the config) and the mining config (given, or read from an earlier
negatives table's footer). Each call mines every query of
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
    ``index``: a FAISS inner-product index or search back-end over the gallery rows (default: with
    ``negatives``, the back-end of its footer's ``search`` record, reopened exactly, never re-tuned;
    with ``cfg``, the one the config names, opened (and tuned) at the first call and reused; exact
    search runs on the GPU the one device rule picks for the config's ``device``).
    ``mining_round`` defaults to 1 + the previous call's (1 at the first call). A ``negatives``
    table mined through an engine (``meta["engine"]``: gallery shards in process or on Ray actors)
    is re-mined through the same engine and shard settings; ``ray_address`` is the Ray cluster to
    join then (None: a local one).
    """

    def __init__(self, ws: Workspace, split: str = "train", cfg: Optional[MineConfig] = None,
                 negatives: Optional[str | Path] = None, schedule: Optional[str] = None, index=None,
                 device: str = "cpu", ray_address: Optional[str] = None):
        from cir_mine.miner.core.tables import read_negatives_meta

        if (cfg is None) == (negatives is None):
            raise UsageError("Remine needs the mining config: pass cfg=MineConfig(...) or negatives=TABLE, not both.")
        self.ws, self.split, self.device = ws.require(), split, device
        meta = read_negatives_meta(negatives, ws) if negatives is not None else {}
        base = cfg.to_dict() if cfg is not None else meta.get("config", {})
        self.engine, self.ray_address = meta.get("engine"), ray_address
        # round 0's search record (a table mined before search records is exact)
        self.search = (meta.get("search") or {"index": "flat", "exact": True}) if negatives is not None else None
        self.table_path = negatives
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
        """The search back-end every call uses (None before the first call of a ``cfg`` hook)."""
        if self._index is None and self.engine:
            self._index = _engine_index(self.engine, self.data()[0].embeddings, self.ray_address)
        if self._index is None and self.search is not None:
            from cir_mine.miner.accel.open import device_search
            from cir_mine.miner.core.search.persist import reopen

            xb = self.data()[0].embeddings
            if self.search.get("exact", True):          # exact search: on the GPU the device rule picks
                self._index = device_search(xb, self.config().replace(index="flat", device=self._device()))
            if self._index is None:
                self._index = reopen(self.search, xb, self.ws.index_path(self.split), self.table_path,
                                     device=self._device(), fp16=self.base.get("fp16", False))
        return self._index

    def _device(self) -> str:
        """The device the base config names (the hook's ``device`` when it names none)."""
        return self.base.get("device", self.device)

    def __call__(self, query_emb: np.ndarray, mining_round: Optional[int] = None, epoch: int = 0) -> MineResult:
        from cir_mine.miner.accel.open import device_search

        self.mining_round = self.mining_round + 1 if mining_round is None else int(mining_round)
        res = mine_negatives(self.ws, self.split, self.config(epoch), query_emb=query_emb,
                             mining_round=self.mining_round, index=self.index() or device_search, loaded=self.data())
        if self._index is None and res.backend is not None:
            self._index = res.backend                   # the first call's back-end, for every later call
        if self.engine:
            res.meta["engine"] = self.engine
        log.info("re-mined round %d at epoch %d: %d rows", self.mining_round, epoch, res.table.num_rows)
        return res


def _engine_index(engine: dict, xb: np.ndarray, ray_address: Optional[str]):
    """The index of the engine a table was mined with (kept open for every round)."""
    from cir_mine.miner.distributed.mine import open_index
    from cir_mine.miner.distributed.ray_shards import RayConfig
    from cir_mine.miner.distributed.shards import ShardConfig

    shard_cfg = ShardConfig(**engine["shard"])
    ray_cfg = RayConfig(address=ray_address, **engine.get("ray", {}))
    index = open_index(engine["name"], xb, shard_cfg, ray_cfg).__enter__()
    log.info("re-mining searches through the %s engine (%d shards, %s)", engine["name"], shard_cfg.shards, shard_cfg.index)
    return index
