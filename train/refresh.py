"""The refresh's miner call: cir-train's adapter over the miner's re-mining hook.

:func:`miner_remine` returns the ``remine(query_emb, mining_round, epoch) -> (table, meta)`` callable
the training loop takes (cir_mine.train.loop.Remine). It wraps :class:`cir_mine.miner.remine.Remine`,
the same hook a user's own loop calls: the mining config (``meta["config"]``) and the search
back-end (``meta["search"]``) come from the table's footer; the split is read once and round 0's
very back-end reopened once (exact, or the same index file checked by fingerprint, with the same
nprobe / efSearch and over-fetch; nothing is re-tuned), so every round uses the exact same config,
data and search; only the queries (and, with a schedule, the mix) change. A table mined
through an engine (``meta["engine"]``: gallery shards in process or on Ray actors) is re-mined
through the same engine and shard settings, opened once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from cir_mine.data.workspace import Workspace


def miner_remine(work: str | Path, split: str, negatives: str | Path, schedule: Optional[str] = None,
                 ray_address: Optional[str] = None):
    """-> remine(query_emb float32[m, d], mining_round, epoch) -> (pa.Table, meta) over ``work``/``split``.

    ray_address: the Ray cluster to join when the table was mined with ``--engine ray`` (None: a
    local cluster)."""
    from cir_mine.miner.remine import Remine

    hook = Remine(Workspace(work), split, negatives=negatives, schedule=schedule, device="cpu",
                  ray_address=ray_address)

    def remine(query_emb, mining_round: int, epoch: int):
        res = hook(query_emb, mining_round=mining_round, epoch=epoch)
        return res.table, res.meta

    return remine
