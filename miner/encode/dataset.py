"""Make a workspace from a dataset embedded with open_clip.

``embed_dataset`` reads a dataset (fashioniq | cirr | folder), embeds the gallery images and the
query captions, optionally adds zero-shot attributes, and writes ``gallery.{split}.parquet``,
``triplets.{split}.parquet``, ``index.{split}.faiss`` and the manifest (atomically, under the
workspace lock, resumable through the shards of :func:`cir_mine.miner.encode.clip.embed_images`).
"""
from __future__ import annotations

import contextlib

import logging
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow as pa

from cir_mine.data.adapters import count_image_files, load_dataset
from cir_mine.data.errors import DataError
from cir_mine.data.io import check_output_dir, write_job
from cir_mine.data.records import ImageRecord, QueryRecord, image_file
from cir_mine.data.workspace import (Workspace, check_split, gallery_table, triplets_table,
                                     write_table)

from cir_mine.miner.encode.clip import (AttributePrompts, embed_images, embed_texts, load_encoder, load_prompts,
                                        warn_random_weights, zero_shot_attributes)
from cir_mine.miner.encode.config import EmbedJob
from cir_mine.miner.core.search.build import check_spec
from cir_mine.miner.encode.index import index_workspace

log = logging.getLogger(__name__)


# progress(n, total=None): n more items done; ``total`` is set once, when it is known.
Progress = Optional[Callable[..., None]]



MAX_SKIPPED_LISTED = 100




def _check_encoder_matches(ws: Workspace, split: str, encoder: dict) -> None:
    if not ws.manifest_path.exists():
        return
    m = ws.manifest()
    others = [s for s in ws.splits() if s != split]
    old = {k: m.get("encoder", {}).get(k) for k in ("name", "pretrained", "dim", "preprocess")}
    new = {k: encoder.get(k) for k in ("name", "pretrained", "dim", "preprocess")}
    if others and old != new:
        pp = lambda e: f", preprocess {e['preprocess'] or 'clip'}" if old["preprocess"] != new["preprocess"] else ""
        raise DataError(
            f"{ws.manifest_path}: splits {', '.join(others)} were embedded with {old['name']} "
            f"(pretrained {old['pretrained']}{pp(old)}), not {new['name']} (pretrained {new['pretrained']}{pp(new)}). "
            f"Embed into a new --work directory, or use the same --model and --pretrained"
            + (" and --preprocess." if pp(old) else ".")
        )



def _skipped_summary(images: list[ImageRecord], errors: list[str]) -> dict:
    bad = [(im, e) for im, e in zip(images, errors) if e]
    return {
        "count": len(bad),
        "missing": sum(1 for _, e in bad if e.startswith("missing")),
        "unreadable": sum(1 for _, e in bad if not e.startswith("missing")),
        "images": [{"image_id": im.image_id, "category": im.category, "path": im.path, "reason": e}
                   for im, e in bad[:MAX_SKIPPED_LISTED]],
    }



def _keep_queries(queries: list[QueryRecord], ok_ids: set) -> tuple[list[QueryRecord], int]:
    kept = [q for q in queries if q.ref_id in ok_ids and q.target_id in ok_ids]
    return kept, len(queries) - len(kept)



def _gallery(images, emb, errors, encoder, prompts: Optional[AttributePrompts]) -> pa.Table:
    ok = np.asarray([not e for e in errors], dtype=bool)
    rows = [im for im, good in zip(images, ok) if good]
    emb = emb[ok]
    attrs = [list(im.attributes) for im in rows]
    scores = None
    if prompts is not None:
        zs_attrs, zs_scores = zero_shot_attributes(encoder, emb, [im.category for im in rows], prompts)
        # Given tags keep NaN as their score; zero-shot entries carry their probability.
        scores = [[float("nan")] * len(a) + s for a, s in zip(attrs, zs_scores)]
        attrs = [a + z for a, z in zip(attrs, zs_attrs)]
    table = gallery_table([im.image_id for im in rows], [im.category for im in rows], attrs, emb,
                          paths=[im.path or "" for im in rows])
    if scores is not None:
        table = table.append_column(pa.field("attribute_scores", pa.list_(pa.float32())),
                                    pa.array(scores, pa.list_(pa.float32())))
    return table



def _triplets(queries: list[QueryRecord], text_emb: np.ndarray, ok_ids: set) -> pa.Table:
    def ids(get):
        vals = [[i for i in get(q) if i in ok_ids] for q in queries]
        return vals if any(vals) else None

    return triplets_table(
        [q.query_id for q in queries], [q.category for q in queries], [q.ref_id for q in queries],
        [q.target_id for q in queries], [list(q.captions) for q in queries], text_emb,
        extra_positive_ids=ids(lambda q: q.extra_positive_ids),
        verified_negative_ids=ids(lambda q: q.verified_negative_ids),
        img_set=ids(lambda q: q.img_set),
    )



def resume_note(scratch: Path, pattern: str, unit: str) -> str:
    """What an interrupted embedding leaves: nothing, or finished ``unit``s in ``scratch`` a rerun resumes from."""
    done = len(list(scratch.glob(pattern))) if scratch.is_dir() else 0
    if not done:
        return "nothing was changed"
    return (f"the workspace is as it was; {done} finished {unit}(s) are kept in {scratch}: rerun the same command "
            f"to resume")


@contextlib.contextmanager
def keep_scratch_if_resumable(scratch: Path, pattern: str):
    """On a failure or interruption, remove the resume folder ``scratch`` unless it holds a finished
    ``pattern`` file: a folder with nothing to resume from is never left behind."""
    try:
        yield
    except BaseException:
        if scratch.is_dir() and not any(scratch.glob(pattern)):
            shutil.rmtree(scratch, ignore_errors=True)
        raise


def embed_dataset(job: EmbedJob, progress: Progress = None, overwrite: bool = True) -> dict:
    """Embed ``job.dataset`` into ``job.work``; returns the manifest written.

    All or nothing: the split's tables, index and the manifest appear together or not at all (a
    failure restores the workspace; the resumable shards stay). An existing split is replaced only
    with ``overwrite``.
    """
    check_split(job.split)
    check_output_dir(job.work, flag="--work")
    warn_random_weights(job.encoder)
    advance = progress or (lambda n=1, total=None: None)
    kw = {"triplets": job.triplets_file} if job.dataset in ("folder", "webdataset") and job.triplets_file else {}
    images, queries = load_dataset(job.dataset, job.root, job.split, **kw)
    if not images:
        raise DataError(f"{job.root}: the {job.dataset} split '{job.split}' has no images.")
    if not count_image_files(images, job.root):
        first = next((im.path for im in images if im.path), None)
        where = {"cirr": f"CIRR: the paths of image_splits/split.rc2.{job.split}.json under ROOT, first {first}",
                 "fashioniq": "FashionIQ: ROOT/images/ID.png|.jpg",
                 "webdataset": f"webdataset: the tar shards named by --root, first {first}"}.get(
                     job.dataset, f"the image paths under ROOT, first {first}")
        raise DataError(f"{job.root}: none of the {len(images)} {job.dataset} images of split '{job.split}' has an "
                        f"image file (annotations only?). Put the images where the dataset layout expects them "
                        f"({where}), or import features with `cir-mine index --from-features`.")
    prompts = load_prompts(job.attribute_prompts) if job.attribute_prompts else None
    ws = Workspace(job.work)
    shard_dir = ws.root / f".embed-{job.split}"
    with write_job(ws.root, "cir-mine embed", interrupted=lambda: resume_note(shard_dir, "shard-*.npz", "shard")), \
            keep_scratch_if_resumable(shard_dir, "shard-*.npz"):
        ws.check_new_split(job.split, None, overwrite)
        encoder = load_encoder(job.encoder)
        _check_encoder_matches(ws, job.split, encoder.describe())
        if encoder.describe().get("dim"):
            ws.check_new_split(job.split, int(encoder.describe()["dim"]), overwrite=True)
            if job.index != "none":
                check_spec(job.index, len(images), int(encoder.describe()["dim"]))
        advance(0, total=len(images))  # the bar counts images; captions are fast
        keys = [f"{im.category}\0{im.image_id}\0{im.path}" for im in images]
        files = [image_file(job.root, im.path) for im in images]
        emb, errors = embed_images(encoder, [f and str(f) for f in files], keys, shard_dir, job.run, advance)
        skipped = _skipped_summary(images, errors)
        if skipped["count"] == len(images):
            shutil.rmtree(shard_dir, ignore_errors=True)  # nothing worth resuming: leave no scratch behind
            raise DataError(f"{job.root}: none of the {len(images)} images could be read "
                            f"(first: {skipped['images'][0]['reason']}). Check --root and the image files.")
        ok_ids = {im.image_id for im, e in zip(images, errors) if not e}
        kept, dropped = _keep_queries(queries, ok_ids)
        if skipped["count"]:
            log.warning("skipped %d unreadable or missing image(s); dropped %d triplet(s) that name them",
                        skipped["count"], dropped)
        text_emb = embed_texts(encoder, [q.text for q in kept], batch_size=max(job.run.batch_size, 64))
        root = str(Path(job.root).resolve())   # gallery paths are relative to it
        run_meta = {"encoder": encoder.describe(), "dataset": job.dataset, "root": root}
        ws.write_gallery(job.split, _gallery(images, emb, errors, encoder, prompts), metadata=run_meta)
        write_table(_triplets(kept, text_emb, ok_ids), ws.triplets_path(job.split), metadata=run_meta)
        index_meta = None
        if job.index != "none":
            index_meta = index_workspace(ws.root, job.split, job.index, device=job.encoder.device, lock=False)
        old = ws.manifest().get("embed", {}) if ws.manifest_path.exists() else {}
        split_info = {
            "dataset": job.dataset, "root": root, "images": len(images),
            "skipped_images": skipped, "queries": len(queries), "dropped_triplets": dropped,
            "batch_size": job.run.batch_size, "attribute_prompts": str(job.attribute_prompts) if prompts else None,
            "index": index_meta and index_meta["factory"],
        }
        manifest = ws.write_manifest(source=job.dataset, encoder=encoder.describe(),
                                     embed={**old, job.split: split_info})
        shutil.rmtree(shard_dir, ignore_errors=True)
        return manifest

