"""Mining through an engine: the gallery's shards searched in process or by Ray actors.

:class:`EngineConfig` names the engine and its shards. ``mine_with_engine`` reads the split once,
opens the engine's index over its gallery, and runs the mining core (``mine_negatives``) through
it: the same guards, strategies and writer as the single-process path; only the search differs.
The engine and its shard settings are recorded in the table's metadata (``meta["engine"]``) so
cir-train's refresh searches the same way. cir_mine.miner.negatives.mine_file writes the table.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from cir_mine.data.errors import UsageError
from cir_mine.data.workspace import Workspace
from cir_mine.miner.core.mine import MineConfig, MineResult, mine_negatives
from cir_mine.miner.distributed.ray_shards import RayConfig
from cir_mine.miner.distributed.shards import ShardConfig, ShardedIndex

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class EngineConfig:
    """Which engine searches the gallery, and how it is sharded."""

    # fmt: off
    name: str = "local"          # local (this process) or ray (a Ray cluster; the 'ray' extra)
    shard: ShardConfig = field(default_factory=ShardConfig)  # gallery shards (one flat shard: the core's own search)
    ray: RayConfig = field(default_factory=RayConfig)        # the Ray cluster and its shard actors (name ray)
    # fmt: on

    @property
    def in_process(self) -> bool:
        """The mining core searches itself (MineConfig.index): one flat shard in this process."""
        return self.name == "local" and self.shard.shards == 1 and self.shard.exact

    def validate(self, cfg: MineConfig) -> "EngineConfig":
        """Check the engine against the mining config (errors name the parameters)."""
        if self.name not in ENGINES:
            raise UsageError(f"engine {self.name!r}: use local or ray.", params=("engine",))
        if not self.in_process and cfg.index != "flat":
            raise UsageError(
                f"index {cfg.index} searches in one process; with engine or shards, choose each "
                f"shard's search with shard_index.",
                params=("index", "engine", "shards", "shard_index"),
            )
        if self.name == "ray":
            from cir_mine.miner.distributed.ray_shards import require_ray

            require_ray()  # fail before reading anything
        return self


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


def mine_with_engine(
    ws: Workspace,
    split: str,
    cfg: MineConfig,
    engine: str = "local",
    shard_cfg: ShardConfig = ShardConfig(shards=1),
    ray_cfg=None,
    loaded: Optional[tuple] = None,
    **kw,
) -> MineResult:
    """``mine_negatives`` through ``engine``'s index (keyword arguments pass through)."""
    if engine == "ray":
        from cir_mine.miner.distributed.ray_shards import require_ray

        require_ray()  # fail before reading anything
    cfg.validate(kw.get("mining_round", 0))
    ws.require()
    g, t = loaded if loaded is not None else ws.load(split)
    with open_index(engine, g.embeddings, shard_cfg.validate(len(g)), ray_cfg) as index:
        res = mine_negatives(ws, split, cfg, index=index, loaded=(g, t), **kw)
        if index is not None:
            res.meta["engine"] = {**engine_meta(engine, shard_cfg, ray_cfg), "index": index.describe()}
    return res
