"""``cir-mine embed --engine ray``: Ray Data reads the images, an actor pool of open_clip encoders
embeds them, and the driver writes gallery parts, resumable per part.

The images of a split (the dataset adapter's order) are cut into parts of ``part_size`` rows. Ray
Data reads the image list (``from_items`` of file paths) or the webdataset tar shards
(``read_webdataset``, raw bytes, matched to rows by sample key); ``map_batches`` runs
:class:`EncoderActor`, one model load per actor (one actor per GPU with ``--device cuda``, CPU
actors otherwise), which decodes with the model's own eval transform (the same
:func:`~cir_mine.miner.encode.clip.load_pixels` as the single-process path) and returns unit
embeddings. Results stream back in row order; each finished part is written atomically to
``WORK/.embed-{split}/part-NNNNN.parquet`` (the gallery table of its readable images, its skipped
images in the footer) beside ``plan.json``. A rerun with the same plan embeds only the missing
parts. At the end the parts become the gallery folder ``gallery.{split}/``, the captions are
embedded on the driver, and the triplets, index and manifest are written as ``embed`` does.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cir_mine.data.adapters import count_image_files, load_dataset
from cir_mine.data.errors import DataError, UsageError
from cir_mine.data.io import write_job, write_json_atomic
from cir_mine.data.workspace import Workspace, check_split, read_metadata, write_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayEmbedRun:
    actors: int = 1                 # open_clip encoder actors (with device cuda at most one per GPU)
    part_size: int = 4096           # images per gallery part (the unit of resume)
    batch_size: int = 64            # images per forward pass inside an actor
    cpus_per_actor: Optional[float] = None  # CPUs each CPU encoder actor reserves, its torch threads max(1, floor)
                                            # (None: 1, or a fraction so that every actor fits the cluster)
    address: Optional[str] = None   # the cluster to join: auto or HOST:PORT (None: start a local one)


class EncoderActor:
    """One open_clip model per actor: batch {row, source} -> {row, emb float32[b, d], error str[b]}."""

    def __init__(self, encoder_cfg, threads: int = 1):
        import torch

        from cir_mine.miner.encode.clip import input_shape, load_encoder

        if encoder_cfg.device != "cuda":
            torch.set_num_threads(max(1, int(threads)))
        self.encoder = load_encoder(encoder_cfg)
        self.shape = input_shape(self.encoder)
        self.uint8 = self.encoder.pil_transform is not None
        self.transform = self.encoder.pil_transform if self.uint8 else self.encoder.preprocess

    def __call__(self, batch: dict) -> dict:
        import torch

        from cir_mine.miner.encode.clip import forward_images, load_pixels

        got = [load_pixels(s, self.transform, self.shape, self.uint8) for s in batch["source"]]
        ok = np.array([not e for _, e in got], dtype=bool)
        emb = np.zeros((len(got), self.encoder.dim), np.float32)
        if ok.any():
            emb[ok] = forward_images(self.encoder, torch.stack([x for (x, _), g in zip(got, ok) if g]))
        return {"row": np.asarray(batch["row"], np.int64), "emb": emb, "error": np.array([e for _, e in got], dtype=object)}


def plan(encoder, keys: list[str], part_size: int) -> dict:
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode())
        h.update(b"\0")
    return {"encoder": encoder.describe(), "device": encoder.device.type, "autocast": str(encoder.amp_dtype),
            "items": len(keys), "keys_sha256": h.hexdigest(), "part_size": part_size, "engine": "ray"}


def _part_path(scratch: Path, p: int) -> Path:
    return scratch / f"part-{p:05d}.parquet"


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
        return ray.data.from_items([{"row": int(r), "source": str(f) if f else ""} for r, f in zip(rows.tolist(), files)])
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

    ds = ray.data.read_webdataset([str(p) for p in shard_paths(job.root)], decoder=None,
                                  suffixes=[*exts, "json"])
    return ds.map_batches(to_rows, batch_format="numpy")


def embed_dataset_ray(job, run: RayEmbedRun = RayEmbedRun(), progress=None, _stop_after_parts: Optional[int] = None,
                      overwrite: bool = True) -> dict:
    """Embed ``job`` (an :class:`~cir_mine.miner.encode.dataset.EmbedJob`) on Ray; returns the manifest.

    _stop_after_parts: test hook, raise after writing that many parts (a crash, for resume tests)."""
    from cir_mine.miner.encode.clip import embed_texts, load_encoder, load_prompts, warn_random_weights
    from cir_mine.miner.encode.dataset import (_check_encoder_matches, _keep_queries, _skipped_summary, _triplets,
                                               keep_scratch_if_resumable, resume_note)
    from cir_mine.miner.encode.index import index_workspace
    from cir_mine.miner.distributed.ray_shards import require_ray

    require_ray()
    check_split(job.split)
    warn_random_weights(job.encoder)
    if run.actors < 1 or run.part_size < 1 or run.batch_size < 1 or (run.cpus_per_actor is not None and
                                                                      run.cpus_per_actor <= 0):
        raise UsageError("--actors, --part-size and --batch-size must be at least 1, --cpus-per-actor above 0.")
    advance = progress or (lambda n=1, total=None: None)
    kw = {"triplets": job.triplets_file} if job.dataset in ("folder", "webdataset") and job.triplets_file else {}
    images, queries = load_dataset(job.dataset, job.root, job.split, **kw)
    if not images:
        raise DataError(f"{job.root}: the {job.dataset} split '{job.split}' has no images.")
    if not count_image_files(images, job.root):
        raise DataError(f"{job.root}: none of the {len(images)} {job.dataset} images of split '{job.split}' has an "
                        f"image file (annotations only?). Put the images where the dataset layout expects them, "
                        f"or import features with `cir-mine index --from-features`.")
    prompts = load_prompts(job.attribute_prompts) if job.attribute_prompts else None
    ws = Workspace(job.work)
    scratch = ws.root / f".embed-{job.split}"
    with write_job(ws.root, "cir-mine embed --engine ray",
                   interrupted=lambda: resume_note(scratch, "part-*.parquet", "part")), \
            keep_scratch_if_resumable(scratch, "part-*.parquet"):
        ws.check_new_split(job.split, None, overwrite)
        encoder = load_encoder(job.encoder)             # the driver's copy: captions and zero-shot attributes
        _check_encoder_matches(ws, job.split, encoder.describe())
        n = len(images)
        advance(0, total=n)
        keys = [f"{im.category}\0{im.image_id}\0{im.path}" for im in images]
        p = plan(encoder, keys, run.part_size)
        plan_path = scratch / "plan.json"
        if plan_path.exists():
            try:
                old = json.loads(plan_path.read_text())
            except ValueError:
                old = None
            if old != p:
                log.info("%s: parts from a different run; starting over", scratch)
                shutil.rmtree(scratch)
        created = not scratch.exists()
        scratch.mkdir(parents=True, exist_ok=True)
        if not plan_path.exists():
            try:
                write_json_atomic(plan_path, p, journal=False)
            except BaseException:
                if created:             # nothing to resume from: leave no scratch folder behind
                    shutil.rmtree(scratch, ignore_errors=True)
                raise

        n_parts = (n + run.part_size - 1) // run.part_size
        bounds = [(i * run.part_size, min(n, (i + 1) * run.part_size)) for i in range(n_parts)]
        errors: list[str] = [""] * n
        todo = []
        for i, (lo, hi) in enumerate(bounds):
            got = _read_part_errors(_part_path(scratch, i), hi - lo) if _part_path(scratch, i).exists() else None
            if got is None:
                todo.append(i)
            else:
                errors[lo:hi] = got
                advance(hi - lo)
        if todo and len(todo) < n_parts:
            log.info("resuming: %d of %d parts already done", n_parts - len(todo), n_parts)
        if todo:
            _embed_parts(job, run, images, bounds, todo, scratch, errors, encoder, prompts, advance, _stop_after_parts)

        skipped = _skipped_summary(images, errors)
        if skipped["count"] == n:
            shutil.rmtree(scratch, ignore_errors=True)
            raise DataError(f"{job.root}: none of the {n} images could be read "
                            f"(first: {skipped['images'][0]['reason']}). Check --root and the image files.")
        ok_ids = {im.image_id for im, e in zip(images, errors) if not e}
        kept, dropped = _keep_queries(queries, ok_ids)
        text_emb = embed_texts(encoder, [q.text for q in kept], batch_size=max(run.batch_size, 64))
        root = str(Path(job.root).resolve())       # gallery paths are relative to it (webdataset: absolute)
        run_meta = {"encoder": encoder.describe(), "dataset": job.dataset, "root": root, "engine": "ray"}
        ws.write_gallery(job.split, (pq.read_table(_part_path(scratch, i)).replace_schema_metadata(None)
                                     for i in range(n_parts)), metadata=run_meta)
        write_table(_triplets(kept, text_emb, ok_ids) if kept else _triplets([], np.zeros((0, encoder.dim), np.float32), ok_ids),
                    ws.triplets_path(job.split), metadata=run_meta)
        index_meta = None
        if job.index != "none":
            index_meta = index_workspace(ws.root, job.split, job.index, device=job.encoder.device, lock=False)
        old = ws.manifest().get("embed", {}) if ws.manifest_path.exists() else {}
        split_info = {
            "dataset": job.dataset, "root": root, "images": n, "skipped_images": skipped,
            "queries": len(queries), "dropped_triplets": dropped, "batch_size": run.batch_size,
            "attribute_prompts": str(job.attribute_prompts) if prompts else None,
            "index": index_meta and index_meta["factory"],
            "engine": {"name": "ray", "actors": run.actors, "part_size": run.part_size, "parts": n_parts},
        }
        manifest = ws.write_manifest(source=job.dataset, encoder=encoder.describe(), embed={**old, job.split: split_info})
        shutil.rmtree(scratch, ignore_errors=True)
        return manifest


def _embed_parts(job, run: RayEmbedRun, images, bounds, todo, scratch: Path, errors, encoder, prompts, advance,
                 stop_after: Optional[int]) -> None:
    """Run the Ray pipeline over the rows of the ``todo`` parts; write each part as it completes."""
    from cir_mine.miner.encode.dataset import _gallery
    from cir_mine.miner.distributed.ray_shards import connect, shard_cpus

    connect(run.address)
    import ray
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    if logging.getLogger("ray").getEffectiveLevel() >= logging.ERROR:    # -q: no Ray Data progress bars
        ray.data.DataContext.get_current().enable_progress_bars = False
    rows = np.concatenate([np.arange(*bounds[i], dtype=np.int64) for i in todo])
    gpu = encoder.device.type == "cuda"
    actors = run.actors
    if gpu:
        actors = max(1, min(actors, int(ray.cluster_resources().get("GPU", 0)) or 1))
    cpus = None if gpu else shard_cpus(actors, run.cpus_per_actor, float(ray.cluster_resources().get("CPU", 0)),
                                       "cpus_per_actor", "actors")
    ds = _source_dataset(ray, job, images, rows).map_batches(
        EncoderActor, fn_constructor_args=(job.encoder, cpus or 1), batch_size=run.batch_size,
        batch_format="numpy", concurrency=actors, num_gpus=1 if gpu else 0, num_cpus=cpus)
    part_of = {}
    for i in todo:
        part_of.update({r: i for r in range(*bounds[i])})
    buf = {i: (np.zeros((bounds[i][1] - bounds[i][0], encoder.dim), np.float32), [None] * (bounds[i][1] - bounds[i][0]))
           for i in todo}
    left = {i: bounds[i][1] - bounds[i][0] for i in todo}
    written = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for r, e, err in zip(batch["row"].tolist(), batch["emb"], batch["error"].tolist()):
            i = part_of[r]
            lo = bounds[i][0]
            emb, errs = buf[i]
            if errs[r - lo] is None:
                left[i] -= 1
            emb[r - lo], errs[r - lo] = e, str(err)
            if err:
                log.warning("skipped image %s: %s", images[r].image_id, err)
            errors[r] = str(err)
        advance(len(batch["row"]))
        for i in [i for i in list(left) if left[i] == 0]:
            lo, hi = bounds[i]
            emb, errs = buf.pop(i)
            del left[i]
            if any(not e for e in errs):
                table = _gallery(images[lo:hi], emb, errs, encoder, prompts)
            else:                                       # no readable image: an empty part, same columns
                table = _gallery(images[lo:lo], emb[:0], [], encoder, None)
                if prompts is not None:
                    table = table.append_column(pa.field("attribute_scores", pa.list_(pa.float32())),
                                                pa.array([], pa.list_(pa.float32())))
            write_table(table, _part_path(scratch, i),             # resume scratch: kept when the job fails
                        metadata={"skipped": {str(j): e for j, e in enumerate(errs) if e}}, journal=False)
            written += 1
            if stop_after and written >= stop_after:
                raise RuntimeError(f"test hook: stopped after {written} part(s)")
    if left:
        raise DataError(f"Ray returned no result for {sum(left.values())} image(s) of {len(left)} part(s); rerun to resume.")
