"""The Ray executor of the embedding pipeline (``cir-mine embed --engine ray``): Ray Data reads the
images, an actor pool of open_clip encoders embeds them, and the driver writes gallery parts.

The pipeline (:mod:`cir_mine.miner.encode.pipeline`) cuts the images of a split (the dataset
adapter's order) into parts of ``part_size`` rows. Ray Data reads the image list (``from_items`` of
file paths) or the webdataset tar shards (``read_webdataset``, raw bytes, matched to rows by sample
key); ``map_batches`` runs :class:`EncoderActor`, one model load per actor (one actor per GPU with
device cuda, CPU actors otherwise), which decodes with the model's own eval transform (the same
:func:`~cir_mine.miner.encode.images.load_pixels` as the local executor) and returns unit
embeddings. Results stream back in row order; each finished part is written atomically to
``part-NNNNN.parquet`` in the resume folder (the gallery table of its readable images, its skipped
images in the footer). At the end the parts become the gallery folder ``gallery.{split}/``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.parquet as pq

from cir_mine.data.crash import crash_point
from cir_mine.data.errors import DataError, UsageError
from cir_mine.data.workspace import read_metadata, write_table
from cir_mine.miner.encode.config import RayEmbedRun
from cir_mine.miner.encode.pipeline import (
    UNIT_SAVED,
    Executor,
    Plan,
    Progress,
    embed_workspace,
    gallery_of,
    open_scratch,
    plan_fingerprint,
    resume,
)

log = logging.getLogger(__name__)


class EncoderActor:
    """One open_clip model per actor: batch {row, source} -> {row, emb float32[b, d], error str[b]}."""

    def __init__(self, encoder_cfg, threads: int = 1):
        import torch

        from cir_mine.miner.encode.images import input_shape
        from cir_mine.miner.encode.model import load_encoder

        if encoder_cfg.device != "cuda":
            torch.set_num_threads(max(1, int(threads)))
        self.encoder = load_encoder(encoder_cfg)
        self.shape = input_shape(self.encoder)
        self.uint8 = self.encoder.pil_transform is not None
        self.transform = self.encoder.pil_transform if self.uint8 else self.encoder.preprocess

    def __call__(self, batch: dict) -> dict:
        import torch

        from cir_mine.miner.encode.images import forward_images, load_pixels

        got = [load_pixels(s, self.transform, self.shape, self.uint8) for s in batch["source"]]
        ok = np.array([not e for _, e in got], dtype=bool)
        emb = np.zeros((len(got), self.encoder.dim), np.float32)
        if ok.any():
            emb[ok] = forward_images(self.encoder, torch.stack([x for (x, _), g in zip(got, ok) if g]))
        return {
            "row": np.asarray(batch["row"], np.int64),
            "emb": emb,
            "error": np.array([e for _, e in got], dtype=object),
        }


def _read_part_errors(path: Path, n: int) -> Optional[list[str]]:
    """The skipped-image reasons (one per row of the part, "" for embedded) of a finished part, or None."""
    try:
        skipped = read_metadata(path).get("skipped")
    except Exception:  # noqa: BLE001 - a damaged part is recomputed
        return None
    if not isinstance(skipped, dict):
        return None
    errors = [""] * n
    for i, e in skipped.items():
        errors[int(i)] = e
    return errors


def _source_dataset(ray, job, images: list, rows: np.ndarray):
    """A Ray dataset of {row, source} for ``rows``: file paths, or tar-member bytes read by Ray Data."""
    if job.dataset != "webdataset":
        from cir_mine.data.records import image_file

        files = [image_file(job.root, images[r].path) for r in rows.tolist()]
        return ray.data.from_items(
            [{"row": int(r), "source": str(f) if f else ""} for r, f in zip(rows.tolist(), files)]
        )
    from cir_mine.data.webdataset import IMAGE_EXTENSIONS, shard_paths

    wanted = {images[r].image_id: int(r) for r in rows.tolist()}
    exts = [e.lstrip(".") for e in IMAGE_EXTENSIONS]
    wanted_ref = ray.put(wanted)

    def to_rows(batch: dict) -> dict:
        keys = list(batch["__key__"])
        row_of = ray.get(wanted_ref)
        out_rows, out_src = [], []
        for j, k in enumerate(keys):
            r = row_of.get(k)
            if r is None:
                continue
            src = next((batch[e][j] for e in exts if e in batch and batch[e][j] is not None), b"")
            out_rows.append(r)
            out_src.append(bytes(src))
        return {"row": np.asarray(out_rows, np.int64), "source": np.array(out_src, dtype=object)}

    ds = ray.data.read_webdataset([str(p) for p in shard_paths(job.root)], decoder=None, suffixes=[*exts, "json"])
    return ds.map_batches(to_rows, batch_format="numpy")


class RayExecutor(Executor):
    """Embeds on a Ray cluster: an actor pool of encoders, parts written by the driver."""

    purpose = "cir-mine embed --engine ray"
    unit = "part"
    suffix = ".parquet"
    meta = {"engine": "ray"}

    def __init__(self, run: RayEmbedRun):
        self.run = run
        self.unit_size = run.part_size
        self.batch_size = run.batch_size
        self.engine = {"name": "ray", "actors": run.actors, "part_size": run.part_size}

    def check(self) -> None:
        run = self.run
        if (
            run.actors < 1
            or run.part_size < 1
            or run.batch_size < 1
            or (run.cpus_per_actor is not None and run.cpus_per_actor <= 0)
        ):
            raise UsageError(
                "actors, part_size and batch_size must be at least 1, cpus_per_actor above 0.",
                params=("actors", "part_size", "batch_size", "cpus_per_actor"),
            )

    def embed(self, plan: Plan, progress: Progress):
        units = plan.units
        open_scratch(units, plan_fingerprint(plan.encoder, plan.keys, part_size=units.size, engine="ray"))
        errors: list[str] = [""] * units.n

        def take(i: int) -> bool:
            lo, hi = units.bounds(i)
            got = _read_part_errors(units.path(i), hi - lo)
            if got is not None:
                errors[lo:hi] = got
            return got is not None

        todo = resume(units, take, progress)
        if todo:
            _embed_parts(plan, self.run, todo, errors, progress)
        return errors, lambda: (pq.read_table(units.path(i)).replace_schema_metadata(None) for i in range(units.count))


def embed_dataset_ray(job, run: RayEmbedRun = RayEmbedRun(), progress: Progress = None, overwrite: bool = True) -> dict:
    """Embed ``job`` (an :class:`~cir_mine.miner.encode.config.EmbedJob`) on Ray; returns the manifest
    (see :func:`~cir_mine.miner.encode.pipeline.embed_workspace`: resumable per part, all or nothing)."""
    from cir_mine.miner.distributed.ray_shards import require_ray

    require_ray()
    return embed_workspace(job, RayExecutor(run), progress, overwrite)


def _pool(ray, plan: Plan, run: RayEmbedRun, rows: np.ndarray):
    """The Ray dataset of {row, emb, error} for ``rows``: the source read by Ray Data, mapped by the actor pool."""
    from cir_mine.miner.distributed.ray_shards import shard_cpus

    gpu = plan.encoder.device.type == "cuda"
    actors = run.actors
    if gpu:
        actors = max(1, min(actors, int(ray.cluster_resources().get("GPU", 0)) or 1))
    cpus = (
        None
        if gpu
        else shard_cpus(
            actors, run.cpus_per_actor, float(ray.cluster_resources().get("CPU", 0)), "cpus_per_actor", "actors"
        )
    )
    return _source_dataset(ray, plan.job, plan.images, rows).map_batches(
        EncoderActor,
        fn_constructor_args=(plan.job.encoder, cpus or 1),
        batch_size=run.batch_size,
        batch_format="numpy",
        concurrency=actors,
        num_gpus=1 if gpu else 0,
        num_cpus=cpus,
    )


def _embed_parts(plan: Plan, run: RayEmbedRun, todo: list[int], errors: list[str], advance: Progress) -> None:
    """Run the Ray pipeline over the rows of the ``todo`` parts; write each part as it completes."""
    from cir_mine.miner.distributed.ray_shards import connect

    connect(run.address)
    import ray
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    if logging.getLogger("ray").getEffectiveLevel() >= logging.ERROR:  # -q: no Ray Data progress bars
        ray.data.DataContext.get_current().enable_progress_bars = False
    units, images = plan.units, plan.images
    rows = np.concatenate([np.arange(*units.bounds(i), dtype=np.int64) for i in todo])
    ds = _pool(ray, plan, run, rows)
    part_of = {r: i for i in todo for r in range(*units.bounds(i))}
    size = {i: units.bounds(i)[1] - units.bounds(i)[0] for i in todo}
    buf = {i: (np.zeros((size[i], plan.encoder.dim), np.float32), [None] * size[i]) for i in todo}
    left = dict(size)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for r, e, err in zip(batch["row"].tolist(), batch["emb"], batch["error"].tolist()):
            i = part_of[r]
            lo = units.bounds(i)[0]
            emb, errs = buf[i]
            if errs[r - lo] is None:
                left[i] -= 1
            emb[r - lo], errs[r - lo] = e, str(err)
            if err:
                log.warning("skipped image %s: %s", images[r].image_id, err)
            errors[r] = str(err)
        if advance:
            advance(len(batch["row"]))
        for i in [i for i in list(left) if left[i] == 0]:
            del left[i]
            _write_part(plan, i, *buf.pop(i))
    if left:
        raise DataError(
            f"Ray returned no result for {sum(left.values())} image(s) of {len(left)} part(s); rerun to resume."
        )


def _write_part(plan: Plan, i: int, emb: np.ndarray, errs: list[str]) -> None:
    """Write part ``i`` (emb float32[rows, d], errs "" per embedded row): its gallery table, its
    skipped images in the footer."""
    lo, hi = plan.units.bounds(i)
    table = gallery_of(plan.images[lo:hi], emb, errs, plan.encoder, plan.prompts)
    write_table(
        table,
        plan.units.path(i),  # resume scratch: kept when the job fails
        metadata={"skipped": {str(j): e for j, e in enumerate(errs) if e}},
        journal=False,
    )
    crash_point(UNIT_SAVED)
