"""Embed a dataset into a workspace on this machine or on a Ray cluster: the call behind
``cir-mine embed``."""
from __future__ import annotations

from typing import Callable, Optional

from cir_mine.data.errors import UsageError
from cir_mine.miner.distributed.mine import ENGINES
from cir_mine.miner.distributed.ray_embed import RayEmbedRun
from cir_mine.miner.encode.config import EmbedJob


def embed(job: EmbedJob, engine: str = ENGINES[0], ray: RayEmbedRun = RayEmbedRun(),
          progress: Optional[Callable[..., None]] = None, overwrite: bool = False) -> dict:
    """Embed ``job`` with ``engine`` (local: this process; ray: encoder actors on a Ray cluster, set by
    ``ray``); returns the manifest written. Resumable; all or nothing (see embed_workspace)."""
    if engine not in ENGINES:
        raise UsageError(f"engine {engine!r}: use local or ray.", params=("engine",))
    if engine == "ray":
        from cir_mine.miner.distributed.ray_embed import embed_dataset_ray

        return embed_dataset_ray(job, ray, progress=progress, overwrite=overwrite)
    from cir_mine.miner.encode.local import embed_dataset

    return embed_dataset(job, progress=progress, overwrite=overwrite)
