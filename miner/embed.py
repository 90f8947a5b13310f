"""Embed a dataset into a workspace on this machine or on a Ray cluster, and (re)build a split's index:
the calls behind ``cir-mine embed`` and ``cir-mine index``."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from cir_mine.data.errors import UsageError
from cir_mine.miner.distributed.mine import ENGINES
from cir_mine.miner.encode.config import EmbedJob, RayEmbedRun


def embed(
    job: EmbedJob,
    engine: str = ENGINES[0],
    ray: RayEmbedRun = RayEmbedRun(),
    progress: Optional[Callable[..., None]] = None,
    overwrite: bool = False,
) -> dict:
    """Embed ``job`` with ``engine`` (local: this process; ray: encoder actors on a Ray cluster, set by
    ``ray``); returns the manifest written. Resumable; all or nothing (see embed_workspace)."""
    if engine not in ENGINES:
        raise UsageError(f"engine {engine!r}: use local or ray.", params=("engine",))
    if engine == "ray":
        from cir_mine.miner.distributed.ray_embed import embed_dataset_ray

        return embed_dataset_ray(job, ray, progress=progress, overwrite=overwrite)
    from cir_mine.miner.encode.local import embed_dataset

    return embed_dataset(job, progress=progress, overwrite=overwrite)


def build_index(
    work: str | Path,
    split: str,
    index: str = "flat",
    device: str = "auto",
    fp16: bool = False,
    npy: Optional[str] = None,
    features: Optional[str | Path] = None,
    ids: Optional[str | Path] = None,
    encoder_name: str = "unknown",
    allow_encoder_change: bool = False,
    overwrite: bool = False,
) -> dict:
    """(Re)build the ``index`` of ``work``'s ``split`` (with ``npy``, a dtype, also the memory-mapped
    embeddings ``gallery.{split}.npy``), or with ``features`` import them as the split's gallery first
    (see import_features); returns the index meta."""
    if features is not None:
        from cir_mine.miner.encode.features import import_features

        return import_features(
            work,
            split,
            features,
            ids,
            encoder_name,
            index,
            device,
            fp16,
            allow_encoder_change,
            overwrite=overwrite,
            npy=npy,
        )
    from cir_mine.miner.encode.index import index_workspace

    return index_workspace(work, split, index, device, fp16, npy=npy)
