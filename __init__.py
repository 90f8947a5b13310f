"""cir-mine: offline hard-negative mining for composed image retrieval (CIR) training.

The public API (see docs/api.md) is importable from here; names load lazily, so
``import cir_mine`` stays cheap and the mining core never pulls in torch::

    from cir_mine import Workspace, MineConfig, mine_negatives, read_negatives, NegativesDataset

(``NegativesDataset``, ``collate_negatives``, ``run_training``, ``CheckpointQueries``, ``device_search``
and ``TorchSearch`` need torch; every other name works without it.)
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

# public name -> module that defines it
_API = {
    "Workspace": "cir_mine.data.workspace",
    "ArrayWorkspace": "cir_mine.data.arrays",
    "CirMineError": "cir_mine.data.errors",
    "DataError": "cir_mine.data.errors",
    "UsageError": "cir_mine.data.errors",
    "clip4cir_fashioniq_items": "cir_mine.data.fashioniq",
    "MineConfig": "cir_mine.miner.core.mine",
    "MineResult": "cir_mine.miner.core.mine",
    "mine_negatives": "cir_mine.miner.core.mine",
    "mine_to_file": "cir_mine.miner.core.mine",
    "mine_file": "cir_mine.miner.negatives",
    "QueryFile": "cir_mine.miner.negatives",
    "EngineConfig": "cir_mine.miner.distributed.mine",
    "ShardConfig": "cir_mine.miner.distributed.shards",
    "RayConfig": "cir_mine.miner.distributed.ray_shards",
    "GuardConfig": "cir_mine.miner.core.guards",
    "read_negatives": "cir_mine.miner.core.tables",
    "NegativesTable": "cir_mine.miner.core.tables",
    "GroupedNegatives": "cir_mine.miner.core.grouped",
    "group_negatives_table": "cir_mine.miner.core.grouped",
    "NegativesLookup": "cir_mine.miner.core.lookup",
    "Clip4CirNegatives": "cir_mine.miner.core.lookup",
    "export_negatives": "cir_mine.miner.core.export",
    "read_query_embeddings": "cir_mine.miner.core.query_emb",
    "check_query_embeddings": "cir_mine.miner.core.query_emb",
    "Remine": "cir_mine.miner.remine",
    "evaluate_queries": "cir_mine.train.metrics",
    "TrainConfig": "cir_mine.train.config",
    "run_training": "cir_mine.train.session",
    "CheckpointQueries": "cir_mine.train.checkpoint",
    "device_search": "cir_mine.miner.accel.open",
    "TorchSearch": "cir_mine.miner.accel.search",
    "NegativesDataset": "cir_mine.train.datasets",
    "collate_negatives": "cir_mine.train.datasets",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'cir_mine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
