"""The re-mining protocol: ``remine(query_emb) -> MineResult`` for a training loop (cir-train's or yours).

A :class:`Remine` fixes everything but the queries: the workspace split (read once), the search
back-end (the one an earlier negatives table was mined with, reopened from its footer, or the one
the first call opens from the config) and the mining config (given, or read from an earlier
negatives table's footer). Each call mines every query of the split with the model's current query
embeddings; with a curriculum, the mix the schedule names for ``epoch``. It is a context manager:
closing it releases what it opened (the back-end, Ray shard actors included). cir-train's
``refresh_every`` re-mines through it (:func:`cir_mine.train.loop.train`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from cir_mine.data.errors import UsageError
from cir_mine.data.workspace import Workspace
from cir_mine.miner.core.curriculum import Curriculum, mix_spec
from cir_mine.miner.core.mine import MineConfig, MineResult, mine_negatives

log = logging.getLogger(__name__)


class Remine:
    """``remine(query_emb float32[m, d], mining_round=None, epoch=0, query_ids=None) -> MineResult`` over
    ``ws``/``split``.

    Give the mining config either as ``cfg`` or as ``negatives``, a table mined from ``ws`` whose
    footer config is reused: a path, ``read_negatives(...)``, a MineResult or a pyarrow Table with
    its footer (any form NegativesDataset takes). ``schedule`` (default: the config's) picks the mix
    per epoch. ``query_ids``: the query id of each row of ``query_emb`` when the rows are in your
    own order (e.g. ``Clip4CirNegatives.query_ids``); without it the rows must be in the triplets'
    order. A round that comes back without a single negative logs a warning and lists it in
    ``meta["warnings"]``, with the shortfall hints.
    ``index``: a FAISS inner-product index or search back-end over the gallery rows (default: with
    ``negatives``, the back-end of its footer's ``search`` record, reopened exactly, never re-tuned;
    with ``cfg``, the one the config names, opened (and tuned) at the first call and reused; exact
    search runs on the GPU the one device rule picks for the config's ``device``).
    ``mining_round`` defaults to 1 + the previous call's (1 at the first call). A ``negatives``
    table mined through an engine (``meta["engine"]``: gallery shards in process or on Ray actors)
    is re-mined through the same engine and shard settings; ``ray_address`` is the Ray cluster to
    join then (None: a local one). A MineResult given as ``negatives`` lends its open back-end.

    ``close()`` (or leaving ``with Remine(...) as remine:``) releases the back-end this hook opened
    (a Ray engine's shard actors included); a back-end given to it (``index``, a MineResult's) stays
    open, its owner's to close. A closed hook opens its back-end again at its next call.
    """

    def __init__(
        self,
        ws: Workspace,
        split: str = "train",
        cfg: Optional[MineConfig] = None,
        negatives=None,
        schedule: Optional[str] = None,
        index=None,
        device: str = "cpu",
        ray_address: Optional[str] = None,
    ):
        from cir_mine.miner.core.tables import as_negatives_table, read_negatives_meta

        if (cfg is None) == (negatives is None):
            raise UsageError("Remine needs the mining config: pass cfg=MineConfig(...) or negatives=TABLE, not both.")
        self.ws, self.split, self.device = ws.require(), split, device
        if isinstance(negatives, (str, Path)):
            meta, table_path = read_negatives_meta(negatives, ws), negatives
        elif negatives is not None:
            nt = as_negatives_table(negatives, ws, "Remine")
            meta, table_path = nt.meta, nt.path
            if not meta.get("config"):
                raise UsageError(
                    "Remine: the negatives table given has no footer to read the mining config from "
                    "(a bare pyarrow Table); pass cfg=MineConfig(...) instead."
                )
            from cir_mine.miner.core.tables import _check_workspace

            _check_workspace(table_path or Path("the negatives table"), meta, ws)
            if index is None and getattr(negatives, "backend", None) is not None:
                index = negatives.backend  # the MineResult's own back-end, already open
        else:
            meta, table_path = {}, None
        base = cfg.to_dict() if cfg is not None else meta.get("config", {})
        self.engine, self.ray_address = meta.get("engine"), ray_address
        # round 0's search record (a table mined before search records is exact)
        self.search = (meta.get("search") or {"index": "flat", "exact": True}) if negatives is not None else None
        self.table_path = table_path
        self.base = {**base, "query": "checkpoint"}
        self.schedule = schedule or base.get("schedule")
        MineConfig.from_dict(self.base).validate()
        self._data, self._index, self.mining_round = None, index, 0
        self._opened = None  # the back-end this hook opened (closed by close())

    def config(self, epoch: int = 0) -> MineConfig:
        """The config mined at ``epoch``: the base config, with the schedule's mix at that epoch."""
        cfg = MineConfig.from_dict(self.base)
        if self.schedule:
            cfg = replace(
                cfg, strategy=None, mix=mix_spec(Curriculum.parse(self.schedule).mix_at(epoch)), schedule=None
            )
        return cfg

    def data(self) -> tuple:
        """(Gallery, Triplets) of the split, read at the first call."""
        if self._data is None:
            self._data = self.ws.load(self.split)
        return self._data

    def index(self):
        """The search back-end every call uses (None before the first call of a ``cfg`` hook)."""
        if self._index is None and self.engine:
            self._index = self._opened = _engine_index(self.engine, self.data()[0].embeddings, self.ray_address)
        if self._index is None and self.search is not None:
            from cir_mine.miner.accel.open import device_search
            from cir_mine.miner.core.search.persist import reopen

            xb = self.data()[0].embeddings
            if self.search.get("exact", True):  # exact search: on the GPU the device rule picks
                self._index = self._opened = device_search(
                    xb, self.config().replace(index="flat", device=self._device())
                )
            if self._index is None:
                self._index = self._opened = reopen(
                    self.search,
                    xb,
                    self.ws.index_path(self.split),
                    self.table_path,
                    device=self._device(),
                    fp16=self.base.get("fp16", False),
                )
        return self._index

    def _device(self) -> str:
        """The device the base config names (the hook's ``device`` when it names none)."""
        return self.base.get("device", self.device)

    def close(self) -> None:
        """Release the back-end this hook opened (a Ray engine's shard actors included)."""
        opened, self._opened = self._opened, None
        if opened is not None:
            if self._index is opened:
                self._index = None
            if hasattr(opened, "close"):
                opened.close()

    def __enter__(self) -> "Remine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(
        self,
        query_emb: np.ndarray,
        mining_round: Optional[int] = None,
        epoch: int = 0,
        query_ids: Optional[Sequence[str]] = None,
    ) -> MineResult:
        from cir_mine.miner.accel.open import device_search

        self.mining_round = self.mining_round + 1 if mining_round is None else int(mining_round)
        res = mine_negatives(
            self.ws,
            self.split,
            self.config(epoch),
            query_emb=query_emb,
            mining_round=self.mining_round,
            index=self.index() or device_search,
            loaded=self.data(),
            query_ids=query_ids,
        )
        if self._index is None and res.backend is not None:
            self._index = self._opened = res.backend  # the first call's back-end, for every later call
        if self.engine:
            res.meta["engine"] = self.engine
        log.info("re-mined round %d at epoch %d: %d rows", self.mining_round, epoch, res.table.num_rows)
        if res.table.num_rows == 0 and res.meta.get("k_mined", 0) > 0:
            hints = res.meta["shortfall"].get("hints") or []
            msg = (
                f"re-mining round {self.mining_round} (epoch {epoch}) gave no negatives to any of the "
                f"{res.meta['n_queries']} queries: this round trains on in-batch negatives only"
                + (f"; to loosen: {'; '.join(hints)}" if hints else "")
                + "."
            )
            log.warning("%s", msg)
            res.meta.setdefault("warnings", []).append(msg)
        return res


def _engine_index(engine: dict, xb: np.ndarray, ray_address: Optional[str]):
    """The index of the engine a table was mined with (open until the hook is closed)."""
    from cir_mine.miner.distributed.mine import open_index
    from cir_mine.miner.distributed.ray_shards import RayConfig
    from cir_mine.miner.distributed.shards import ShardConfig

    shard_cfg = ShardConfig(**engine["shard"])
    ray_cfg = RayConfig(address=ray_address, **engine.get("ray", {}))
    index = open_index(engine["name"], xb, shard_cfg, ray_cfg).__enter__()
    log.info(
        "re-mining searches through the %s engine (%d shards, %s)", engine["name"], shard_cfg.shards, shard_cfg.index
    )
    return index
