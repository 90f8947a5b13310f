"""The refresh's miner call: cir-train's adapter over the miner's re-mining hook.

:func:`miner_remine` returns the ``remine(query_emb, mining_round, epoch) -> (table, meta)`` callable
the training loop takes (cir_mine.train.loop.Remine). It wraps :class:`cir_mine.miner.remine.Remine`,
the same hook a user's own loop calls: the mining config comes from the table's footer, the split
is read and the FAISS index opened (or a flat one built) once, so every round uses the exact same
config, data and index; only the queries (and, with a schedule, the mix) change.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from cir_mine.data.workspace import Workspace


def miner_remine(work: str | Path, split: str, negatives: str | Path, schedule: Optional[str] = None):
    """-> remine(query_emb float32[m, d], mining_round, epoch) -> (pa.Table, meta) over ``work``/``split``."""
    from cir_mine.miner.remine import Remine

    hook = Remine(Workspace(work), split, negatives=negatives, schedule=schedule, device="cpu")

    def remine(query_emb, mining_round: int, epoch: int):
        res = hook(query_emb, mining_round=mining_round, epoch=epoch)
        return res.table, res.meta

    return remine
