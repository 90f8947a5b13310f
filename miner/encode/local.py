"""The local executor of the embedding pipeline: image embedding in this process, resumable
through shards.

A DataLoader's workers decode and transform the files (the model's own open_clip eval transform), so
the main process only runs the forward pass. The images are cut into shards of ``shard_size``
(:class:`~cir_mine.miner.encode.pipeline.Units`); each finished shard is written atomically to
``shard-NNNNN.npz`` in the resume folder. Batches never cross a shard boundary, so a resumed run
feeds the model exactly the batches an uninterrupted run does and the tables are identical.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from cir_mine.data.crash import crash_point
from cir_mine.data.errors import UsageError
from cir_mine.data.io import atomic_path
from cir_mine.data.records import image_file
from cir_mine.miner.encode.config import EmbedJob, ImageRun
from cir_mine.miner.encode.images import Embedded, image_loader, launch_images
from cir_mine.miner.encode.model import Encoder, Progress
from cir_mine.miner.encode.pipeline import (
    UNIT_SAVED,
    Executor,
    Plan,
    Units,
    embed_workspace,
    gallery_of,
    key_label,
    open_scratch,
    plan_fingerprint,
    resume,
)

log = logging.getLogger(__name__)


def _shard_batches(units: Units, shards: Sequence[int], batch_size: int):
    for s in shards:
        lo, hi = units.bounds(s)
        for b in range(lo, hi, batch_size):
            yield list(range(b, min(hi, b + batch_size)))


def _write_shard(path: Path, emb: np.ndarray, errors: list[str]) -> None:
    with atomic_path(path, journal=False) as tmp:  # resume scratch: kept when the job fails
        with open(tmp, "wb") as fh:
            np.savez(fh, emb=emb, errors=np.asarray(errors, dtype=str))


def _read_shard(path: Path, n: int, dim: int) -> Optional[tuple[np.ndarray, list[str]]]:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            emb, errors = z["emb"], z["errors"].tolist()
    except Exception:  # noqa: BLE001 - a damaged shard is simply recomputed
        log.warning("%s: unreadable shard; recomputing it", path)
        return None
    if emb.shape != (n, dim) or len(errors) != n:
        return None
    return emb, errors


def check_image_run(run: ImageRun) -> None:
    """Refuse batch and shard sizes below 1 and a negative worker count."""
    if run.batch_size < 1 or run.shard_size < 1 or (run.workers is not None and run.workers < 0):
        raise UsageError(
            "batch_size and shard_size must be >= 1 and workers >= 0.", params=("batch_size", "shard_size", "workers")
        )


def embed_images(
    encoder: Encoder,
    paths: Sequence[Optional[str]],
    keys: Sequence[str],
    shard_dir: str | Path,
    run: ImageRun = ImageRun(),
    progress: Progress = None,
) -> tuple[np.ndarray, list[str]]:
    """Embed image files. Returns (emb float32[n, d], errors list[n] with "" for embedded images).

    ``keys`` identify the items (e.g. "category/image_id/path") for the resume fingerprint. Rows with
    an error are zeros and must be dropped by the caller. Finished shards under ``shard_dir`` are reused.
    """
    check_image_run(run)
    n, dim = len(paths), encoder.dim
    units = Units(Path(shard_dir), n, run.shard_size, "shard", ".npz")
    open_scratch(units, plan_fingerprint(encoder, keys, shard_size=run.shard_size, batch_size=run.batch_size))
    emb = np.zeros((n, dim), dtype=np.float32)
    errors = [""] * n

    def take(s: int) -> bool:
        lo, hi = units.bounds(s)
        got = _read_shard(units.path(s), hi - lo, dim)
        if got is not None:
            emb[lo:hi], errors[lo:hi] = got
        return got is not None

    todo = resume(units, take, progress)
    if todo:
        _embed_shards(encoder, paths, keys, units, todo, run, emb, errors, progress)
    return emb, errors


def _embed_shards(
    encoder: Encoder,
    paths: Sequence[Optional[str]],
    keys: Sequence[str],
    units: Units,
    todo: list[int],
    run: ImageRun,
    emb: np.ndarray,
    errors: list[str],
    progress: Progress,
) -> None:
    """Embed the shards ``todo`` into ``emb``/``errors``, writing each shard as it completes."""
    loader = image_loader(encoder, paths, list(_shard_batches(units, todo, run.batch_size)), run.workers)
    pending = {s: units.bounds(s)[1] - units.bounds(s)[0] for s in todo}

    def finish(idx_np: np.ndarray, ok: np.ndarray, out: Optional[Embedded]) -> None:
        if out is not None:
            emb[idx_np[ok]] = out.numpy()
        s = int(idx_np[0]) // units.size
        pending[s] -= len(idx_np)
        if progress:
            progress(len(idx_np))
        if pending[s] == 0:
            lo, hi = units.bounds(s)
            _write_shard(units.path(s), emb[lo:hi], errors[lo:hi])
            crash_point(UNIT_SAVED)

    previous = None  # the batch whose embeddings are on their way to the host
    for pixels, idx, errs in loader:
        idx_np = idx.numpy()
        ok = np.asarray([not e for e in errs])
        for i, e in zip(idx_np.tolist(), errs):
            if e:
                errors[i] = e
                log.warning("skipped image %s: %s", key_label(keys[i]), e)
        # Only readable images go through the model: batch composition is the same on resume.
        out = launch_images(encoder, pixels[torch.from_numpy(ok)] if not ok.all() else pixels) if ok.any() else None
        if previous is not None:
            finish(*previous)  # this batch is queued on the device before the host waits for the last
        previous = (idx_np, ok, out)
    if previous is not None:
        finish(*previous)


class LocalExecutor(Executor):
    """Embeds in this process: :func:`embed_images` over the dataset's image files."""

    def __init__(self, run: ImageRun):
        self.run = run
        self.unit_size = run.shard_size
        self.batch_size = run.batch_size

    def check(self) -> None:
        check_image_run(self.run)

    def embed(self, plan: Plan, progress: Progress):
        files = [image_file(plan.job.root, im.path) for im in plan.images]
        emb, errors = embed_images(
            plan.encoder, [f and str(f) for f in files], plan.keys, plan.units.scratch, self.run, progress
        )
        return errors, lambda: gallery_of(plan.images, emb, errors, plan.encoder, plan.prompts)


def embed_dataset(job: EmbedJob, progress: Progress = None, overwrite: bool = True) -> dict:
    """Embed ``job`` in this process; returns the manifest written (see
    :func:`~cir_mine.miner.encode.pipeline.embed_workspace`: resumable, all or nothing)."""
    return embed_workspace(job, LocalExecutor(job.run), progress, overwrite)
