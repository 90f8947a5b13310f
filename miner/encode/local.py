"""Image embedding in this process, resumable through shards.

A DataLoader's workers decode and transform the files (the model's own open_clip eval transform), so
the main process only runs the forward pass. Images are cut into shards of ``shard_size`` in a fixed
order; each finished shard is written atomically to ``WORK/.embed-{split}/shard-NNNNN.npz`` beside a
``plan.json`` fingerprint. A rerun with the same plan loads the finished shards and embeds the rest.
Batches never cross a shard boundary, so a resumed run feeds the model exactly the batches an
uninterrupted run does and the tables are identical.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from cir_mine.data.errors import UsageError
from cir_mine.data.io import atomic_path, write_json_atomic
from cir_mine.miner.encode.config import ImageRun
from cir_mine.miner.encode.images import Embedded, image_loader, launch_images
from cir_mine.miner.encode.model import Encoder, Progress

log = logging.getLogger(__name__)

# Test hook: SIGKILL this process right after writing this many shards (resume tests).
KILL_AFTER_ENV = "CIR_MINE_EMBED_KILL_AFTER_SHARDS"


def _shard_batches(shards: Sequence[int], shard_size: int, n: int, batch_size: int):
    for s in shards:
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        for b in range(lo, hi, batch_size):
            yield list(range(b, min(hi, b + batch_size)))


def key_label(key: str) -> str:
    """A resume key ``category\0image_id\0path`` as it reads in a message: ``image_id (path)``."""
    parts = key.split("\0")
    if len(parts) != 3:
        return key.replace("\0", " ")
    cat, image_id, path = parts
    return f"{image_id} ({path})" if path and path != "None" else image_id


def plan_fingerprint(encoder: Encoder, keys: Sequence[str], shard_size: int, batch_size: int) -> dict:
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode())
        h.update(b"\0")
    plan = {"encoder": encoder.describe(), "device": encoder.device.type, "autocast": str(encoder.amp_dtype),
            "items": len(keys), "keys_sha256": h.hexdigest(), "shard_size": shard_size, "batch_size": batch_size}
    if encoder.channels_last:
        plan["channels_last"] = True
    return plan


def _write_shard(path: Path, emb: np.ndarray, errors: list[str]) -> None:
    with atomic_path(path, journal=False) as tmp:     # resume scratch: kept when the job fails
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


def embed_images(encoder: Encoder, paths: Sequence[Optional[str]], keys: Sequence[str],
                 shard_dir: str | Path, run: ImageRun = ImageRun(), progress: Progress = None
                 ) -> tuple[np.ndarray, list[str]]:
    """Embed image files. Returns (emb float32[n, d], errors list[n] with "" for embedded images).

    ``keys`` identify the items (e.g. "category/image_id/path") for the resume fingerprint. Rows with
    an error are zeros and must be dropped by the caller. Finished shards under ``shard_dir`` are reused.
    """
    if run.batch_size < 1 or run.shard_size < 1 or (run.workers is not None and run.workers < 0):
        raise UsageError("batch_size and shard_size must be >= 1 and workers >= 0.",
                         params=("batch_size", "shard_size", "workers"))
    n, dim = len(paths), encoder.dim
    shard_dir = Path(shard_dir)
    plan = plan_fingerprint(encoder, keys, run.shard_size, run.batch_size)
    plan_path = shard_dir / "plan.json"
    if plan_path.exists():
        try:
            old = json.loads(plan_path.read_text())
        except ValueError:
            old = None
        if old != plan:
            log.info("%s: shards from a different run; starting over", shard_dir)
            shutil.rmtree(shard_dir)
    created = not shard_dir.exists()
    shard_dir.mkdir(parents=True, exist_ok=True)
    if not plan_path.exists():
        try:
            write_json_atomic(plan_path, plan, journal=False)
        except BaseException:
            if created:                 # nothing to resume from: leave no scratch folder behind
                shutil.rmtree(shard_dir, ignore_errors=True)
            raise

    n_shards = (n + run.shard_size - 1) // run.shard_size
    emb = np.zeros((n, dim), dtype=np.float32)
    errors = [""] * n
    todo = []
    for s in range(n_shards):
        lo, hi = s * run.shard_size, min(n, (s + 1) * run.shard_size)
        got = _read_shard(shard_dir / f"shard-{s:05d}.npz", hi - lo, dim)
        if got is None:
            todo.append(s)
            continue
        emb[lo:hi], errors[lo:hi] = got
        if progress:
            progress(hi - lo)
    if todo and n_shards - len(todo):
        log.info("resuming: %d of %d shards already done", n_shards - len(todo), n_shards)
    if not todo:
        return emb, errors

    loader = image_loader(encoder, paths, list(_shard_batches(todo, run.shard_size, n, run.batch_size)), run.workers)
    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
    pending = {s: min(n, (s + 1) * run.shard_size) - s * run.shard_size for s in todo}
    written = 0

    def finish(idx_np: np.ndarray, ok: np.ndarray, out: Optional[Embedded]) -> None:
        nonlocal written
        if out is not None:
            emb[idx_np[ok]] = out.numpy()
        s = int(idx_np[0]) // run.shard_size
        pending[s] -= len(idx_np)
        if progress:
            progress(len(idx_np))
        if pending[s] == 0:
            lo, hi = s * run.shard_size, min(n, (s + 1) * run.shard_size)
            _write_shard(shard_dir / f"shard-{s:05d}.npz", emb[lo:hi], errors[lo:hi])
            written += 1
            if kill_after and written >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

    previous = None              # the batch whose embeddings are on their way to the host
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
            finish(*previous)    # this batch is queued on the device before the host waits for the last
        previous = (idx_np, ok, out)
    if previous is not None:
        finish(*previous)
    return emb, errors
