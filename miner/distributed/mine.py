"""Mining through an engine: the gallery's shards searched in process or by Ray actors.

``mine_with_engine`` reads the split once, opens the engine's index over its gallery, and runs the
mining core (``mine_negatives``) through it: the same guards, strategies and writer as the
single-process path; only the search differs. The engine and its shard settings are recorded in
the table's metadata (``meta["engine"]``) so cir-train's refresh searches the same way.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Optional

from cir_mine.data.errors import UsageError
from cir_mine.data.io import check_output, write_job
from cir_mine.data.workspace import Workspace
from cir_mine.miner.core.mine import MineConfig, MineResult, mine_negatives
from cir_mine.miner.core.tables import write_negatives
from cir_mine.miner.distributed.shards import ShardConfig, ShardedIndex

ENGINES = ("local", "ray")


def open_index(engine: str, xb, shard_cfg: ShardConfig, ray_cfg=None):
    """A context manager giving the engine's index over ``xb`` (float32[n, d]); None means the core's
    own exact flat index (engine 'local' with one flat shard)."""
    if engine not in ENGINES:
        raise UsageError(f"engine {engine!r}: use local or ray.", params=("engine",))
    if engine == "local":
        if shard_cfg.shards == 1 and shard_cfg.exact:
            return contextlib.nullcontext(None)
        return contextlib.nullcontext(ShardedIndex(xb, shard_cfg))
    from cir_mine.miner.distributed.ray_shards import RayConfig, RayShardedIndex

    return RayShardedIndex(xb, shard_cfg, ray_cfg or RayConfig())


def engine_meta(engine: str, shard_cfg: ShardConfig, ray_cfg=None) -> dict:
    d = {"name": engine, "shard": dataclasses.asdict(shard_cfg)}
    if engine == "ray" and ray_cfg is not None:
        d["ray"] = ray_cfg.recorded()
    return d


def mine_with_engine(ws: Workspace, split: str, cfg: MineConfig, engine: str = "local",
                     shard_cfg: ShardConfig = ShardConfig(shards=1), ray_cfg=None, loaded: Optional[tuple] = None,
                     **kw) -> MineResult:
    """``mine_negatives`` through ``engine``'s index (keyword arguments pass through)."""
    if engine == "ray":
        from cir_mine.miner.distributed.ray_shards import require_ray

        require_ray()                                   # fail before reading anything
    cfg.validate(kw.get("mining_round", 0))
    ws.require()
    g, t = loaded if loaded is not None else ws.load(split)
    with open_index(engine, g.embeddings, shard_cfg.validate(len(g)), ray_cfg) as index:
        res = mine_negatives(ws, split, cfg, index=index, loaded=(g, t), **kw)
        if index is not None:
            res.meta["engine"] = {**engine_meta(engine, shard_cfg, ray_cfg), "index": index.describe()}
    return res


def mine_with_engine_to_file(ws: Workspace, split: str, cfg: MineConfig, out: str | Path, overwrite: bool = True,
                             reads=(), **kw) -> MineResult:
    """Mine through the engine and write ``out`` atomically, holding the lock of its directory
    (``out`` checked first, as :func:`cir_mine.miner.core.mine.mine_to_file` does)."""
    out = check_output(out, reads, overwrite)
    with write_job(out.parent, f"cir-mine negatives -> {out.name}"):
        res = mine_with_engine(ws, split, cfg, **kw)
        write_negatives(res.table, out, res.meta)
    return res
