"""The embedding pipeline every executor runs: what to embed, the resume folder, the workspace.

:func:`embed_workspace` reads and checks the dataset (fashioniq | cirr | folder | webdataset), loads
the encoder, lets an :class:`Executor` embed the images, then embeds the query captions, optionally
adds zero-shot attributes, and writes ``gallery.{split}``, ``triplets.{split}.parquet``,
``index.{split}.faiss`` and the manifest: all or nothing, under the workspace lock.

Resume: the images (the dataset adapter's order) are cut into units of a fixed size (:class:`Units`:
the local executor's shards, the Ray executor's parts), each written atomically when finished to
``WORK/.embed-{split}/`` beside a ``plan.json`` fingerprint (:func:`open_scratch`). A rerun with the
same plan takes the finished units (:func:`resume`) and embeds the rest. The executors:
:mod:`cir_mine.miner.encode.local` (this process, DataLoader workers) and
:mod:`cir_mine.miner.distributed.ray_embed` (an actor pool on a Ray cluster).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import pyarrow as pa

from cir_mine.data.adapters import count_image_files, load_dataset
from cir_mine.data.errors import DataError
from cir_mine.data.io import check_output_dir, write_job, write_json_atomic
from cir_mine.data.records import ImageRecord, QueryRecord
from cir_mine.data.workspace import Workspace, check_split, gallery_table, triplets_table, write_table
from cir_mine.miner.core.search.build import check_spec
from cir_mine.miner.encode.attributes import AttributePrompts, load_prompts, zero_shot_attributes
from cir_mine.miner.encode.config import EmbedJob
from cir_mine.miner.encode.index import index_workspace
from cir_mine.miner.encode.model import Encoder, embed_texts, load_encoder, warn_random_weights

log = logging.getLogger(__name__)

# progress(n, total=None): n more items done; ``total`` is set once, when it is known.
Progress = Optional[Callable[..., None]]
MAX_SKIPPED_LISTED = 100
# The crash point each executor arrives at right after writing a finished unit (cir_mine.data.crash).
UNIT_SAVED = "embed-saved"


# ----------------------------------------------------------------------------------------------
# Units and the resume folder


@dataclass(frozen=True)
class Units:
    # fmt: off
    scratch: Path                # the resume folder, WORK/.embed-{split}
    n: int                       # rows (images) in all
    size: int                    # rows per unit (the last one may hold fewer)
    name: str                    # what a unit is called: its files are NAME-NNNNN{suffix}
    suffix: str                  # .npz (shards) | .parquet (parts)
    # fmt: on

    @property
    def count(self) -> int:
        return (self.n + self.size - 1) // self.size

    @property
    def pattern(self) -> str:
        return f"{self.name}-*{self.suffix}"

    def bounds(self, i: int) -> tuple[int, int]:
        return i * self.size, min(self.n, (i + 1) * self.size)

    def path(self, i: int) -> Path:
        return self.scratch / f"{self.name}-{i:05d}{self.suffix}"


def plan_fingerprint(encoder: Encoder, keys: Sequence[str], **sizes) -> dict:
    """What decides the bits of every unit: the encoder, its device and precision, the items (their
    keys) and ``sizes`` (the unit and batch sizes, the executor)."""
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode())
        h.update(b"\0")
    plan = {
        "encoder": encoder.describe(),
        "device": encoder.device.type,
        "autocast": str(encoder.amp_dtype),
        "items": len(keys),
        "keys_sha256": h.hexdigest(),
        **sizes,
    }
    if encoder.channels_last:
        plan["channels_last"] = True
    return plan


def open_scratch(units: Units, plan: dict) -> None:
    """Make ``units.scratch`` hold ``plan.json`` = ``plan``: units of another plan are removed first."""
    plan_path = units.scratch / "plan.json"
    if plan_path.exists():
        try:
            old = json.loads(plan_path.read_text())
        except ValueError:
            old = None
        if old != plan:
            log.info("%s: %ss from a different run; starting over", units.scratch, units.name)
            shutil.rmtree(units.scratch)
    created = not units.scratch.exists()
    units.scratch.mkdir(parents=True, exist_ok=True)
    if not plan_path.exists():
        try:
            write_json_atomic(plan_path, plan, journal=False)
        except BaseException:
            if created:  # nothing to resume from: leave no scratch folder behind
                shutil.rmtree(units.scratch, ignore_errors=True)
            raise


def resume(units: Units, take: Callable[[int], bool], progress: Progress = None) -> list[int]:
    """The units still to embed: ``take(i)`` loads finished unit i (False when it is missing or
    damaged); each finished unit counts as progress."""
    todo = []
    for i in range(units.count):
        if not take(i):
            todo.append(i)
        elif progress:
            lo, hi = units.bounds(i)
            progress(hi - lo)
    if todo and len(todo) < units.count:
        log.info("resuming: %d of %d %ss already done", units.count - len(todo), units.count, units.name)
    return todo


def resume_note(scratch: Path, pattern: str, unit: str) -> str:
    """What an interrupted embedding leaves: nothing, or finished ``unit``s in ``scratch`` a rerun resumes from."""
    done = len(list(scratch.glob(pattern))) if scratch.is_dir() else 0
    if not done:
        return "nothing was changed"
    return (
        f"the workspace is as it was; {done} finished {unit}(s) are kept in {scratch}: rerun the same command to resume"
    )


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


def key_label(key: str) -> str:
    """A resume key ``category\\0image_id\\0path`` as it reads in a message: ``image_id (path)``."""
    parts = key.split("\0")
    if len(parts) != 3:
        return key.replace("\0", " ")
    cat, image_id, path = parts
    return f"{image_id} ({path})" if path and path != "None" else image_id


def image_keys(images: Sequence[ImageRecord]) -> list[str]:
    """The resume keys of ``images``: ``category\\0image_id\\0path``."""
    return [f"{im.category}\0{im.image_id}\0{im.path}" for im in images]


# ----------------------------------------------------------------------------------------------
# The plan: dataset, encoder


@dataclass
class Plan:
    # fmt: off
    job: EmbedJob                            # what to embed where
    images: list[ImageRecord]                # the gallery, in the dataset adapter's order
    queries: list[QueryRecord]               # the triplets
    keys: list[str]                          # image_keys(images)
    encoder: Encoder                         # the loaded model (captions, zero-shot attributes)
    prompts: Optional[AttributePrompts]      # zero-shot attribute prompts (None: none)
    units: Units                             # the cut of the images the executor resumes by
    # fmt: on


def load_images(job: EmbedJob) -> tuple[list[ImageRecord], list[QueryRecord]]:
    """The dataset's images and queries; a split without images or without any image file raises."""
    kw = {"triplets": job.triplets_file} if job.dataset in ("folder", "webdataset") and job.triplets_file else {}
    images, queries = load_dataset(job.dataset, job.root, job.split, **kw)
    if not images:
        raise DataError(f"{job.root}: the {job.dataset} split '{job.split}' has no images.")
    if not count_image_files(images, job.root):
        first = next((im.path for im in images if im.path), None)
        where = {
            "cirr": f"CIRR: the paths of image_splits/split.rc2.{job.split}.json under ROOT, first {first}",
            "fashioniq": "FashionIQ: ROOT/images/ID.png|.jpg",
            "webdataset": f"webdataset: the tar shards named by `root`, first {first}",
        }.get(job.dataset, f"the image paths under ROOT, first {first}")
        raise DataError(
            f"{job.root}: none of the {len(images)} {job.dataset} images of split '{job.split}' has an "
            f"image file (annotations only?). Put the images where the dataset layout expects them "
            f"({where}), or import features with `cir-mine index from_features`.",
            params=("from_features",) + (("root",) if job.dataset == "webdataset" else ()),
        )
    return images, queries


def check_encoder_matches(ws: Workspace, split: str, encoder: dict) -> None:
    """The workspace's other splits were embedded with the same encoder (name, weights, preprocessing)."""
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
            f"Embed into a new `work` directory, or use the same `model` and `pretrained`"
            + (" and `preprocess`." if pp(old) else "."),
            params=("work", "model", "pretrained") + (("preprocess",) if pp(old) else ()),
        )


def open_split(ws: Workspace, job: EmbedJob, n: int, overwrite: bool) -> Encoder:
    """Check that ``job.split`` may be written to ``ws`` with ``n`` images, then load its encoder."""
    ws.check_new_split(job.split, None, overwrite)
    encoder = load_encoder(job.encoder)
    check_encoder_matches(ws, job.split, encoder.describe())
    if encoder.describe().get("dim"):
        ws.check_new_split(job.split, int(encoder.describe()["dim"]), overwrite=True)
        if job.index != "none":
            check_spec(job.index, n, int(encoder.describe()["dim"]))
    return encoder


# ----------------------------------------------------------------------------------------------
# Executors and the run


class Executor:
    """How the images are embedded; :func:`embed_workspace` does the rest. Subclasses set the fields
    and :meth:`embed`."""

    purpose: str = "cir-mine embed"  # the write job's name (the workspace lock says it)
    unit: str = "shard"  # what a resume unit is called
    suffix: str = ".npz"  # a unit's file suffix
    unit_size: int = 4096  # images per unit
    batch_size: int = 64  # images per forward pass (captions: at least 64)
    meta: dict = {}  # added to the tables' metadata
    engine: Optional[dict] = None  # the manifest's ``engine`` entry of the split (None: none)

    def check(self) -> None:
        """Refuse bad settings before anything is read or written."""

    def embed(self, plan: Plan, progress: Progress) -> tuple[list[str], Callable[[], pa.Table | Iterable[pa.Table]]]:
        """Embed ``plan.images`` (resuming from ``plan.units``) -> (errors: "" per embedded image, the
        gallery: a function giving its table or its part tables)."""
        raise NotImplementedError


def embed_workspace(job: EmbedJob, executor: Executor, progress: Progress = None, overwrite: bool = True) -> dict:
    """Embed ``job.dataset`` into ``job.work`` with ``executor``; returns the manifest written.

    All or nothing: the split's tables, index and the manifest appear together or not at all (a
    failure restores the workspace; the finished units stay for a rerun). An existing split is
    replaced only with ``overwrite``.
    """
    check_split(job.split)
    check_output_dir(job.work, flag="work")
    warn_random_weights(job.encoder)
    executor.check()
    advance = progress or (lambda n=1, total=None: None)
    images, queries = load_images(job)
    prompts = load_prompts(job.attribute_prompts) if job.attribute_prompts else None
    ws = Workspace(job.work)
    units = Units(ws.root / f".embed-{job.split}", len(images), executor.unit_size, executor.unit, executor.suffix)
    with (
        write_job(ws.root, executor.purpose, interrupted=lambda: resume_note(units.scratch, units.pattern, units.name)),
        keep_scratch_if_resumable(units.scratch, units.pattern),
    ):
        encoder = open_split(ws, job, len(images), overwrite)
        advance(0, total=len(images))  # the bar counts images; captions are fast
        plan = Plan(job, images, queries, image_keys(images), encoder, prompts, units)
        errors, gallery = executor.embed(plan, advance)
        return finish_workspace(ws, plan, errors, gallery, executor)


# ----------------------------------------------------------------------------------------------
# Finishing the workspace


def skipped_summary(images: list[ImageRecord], errors: list[str]) -> dict:
    """The manifest's record of the images that were not embedded (the first MAX_SKIPPED_LISTED named)."""
    bad = [(im, e) for im, e in zip(images, errors) if e]
    return {
        "count": len(bad),
        "missing": sum(1 for _, e in bad if e.startswith("missing")),
        "unreadable": sum(1 for _, e in bad if not e.startswith("missing")),
        "images": [
            {"image_id": im.image_id, "category": im.category, "path": im.path, "reason": e}
            for im, e in bad[:MAX_SKIPPED_LISTED]
        ],
    }


def keep_queries(queries: list[QueryRecord], ok_ids: set) -> tuple[list[QueryRecord], int]:
    """The queries whose reference and target were embedded, and how many were dropped."""
    kept = [q for q in queries if q.ref_id in ok_ids and q.target_id in ok_ids]
    return kept, len(queries) - len(kept)


def gallery_of(
    images: Sequence[ImageRecord],
    emb: np.ndarray,
    errors: Sequence[str],
    encoder: Encoder,
    prompts: Optional[AttributePrompts],
) -> pa.Table:
    """The gallery table of the embedded rows of ``images`` (emb float32[n, d], errors "" per embedded
    row), with zero-shot attributes and their scores when ``prompts`` are given."""
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
    table = gallery_table(
        [im.image_id for im in rows], [im.category for im in rows], attrs, emb, paths=[im.path or "" for im in rows]
    )
    if scores is not None:
        table = table.append_column(
            pa.field("attribute_scores", pa.list_(pa.float32())), pa.array(scores, pa.list_(pa.float32()))
        )
    return table


def triplets_of(queries: list[QueryRecord], text_emb: np.ndarray, ok_ids: set) -> pa.Table:
    """The triplets table of ``queries`` (text_emb float32[m, d]), their id lists cut to embedded images."""

    def ids(get):
        vals = [[i for i in get(q) if i in ok_ids] for q in queries]
        return vals if any(vals) else None

    return triplets_table(
        [q.query_id for q in queries],
        [q.category for q in queries],
        [q.ref_id for q in queries],
        [q.target_id for q in queries],
        [list(q.captions) for q in queries],
        text_emb,
        extra_positive_ids=ids(lambda q: q.extra_positive_ids),
        verified_negative_ids=ids(lambda q: q.verified_negative_ids),
        img_set=ids(lambda q: q.img_set),
    )


def finish_workspace(ws: Workspace, plan: Plan, errors: list[str], gallery: Callable, executor: Executor) -> dict:
    """Write the split's gallery (``gallery()``), triplets, index and the manifest; remove the resume
    folder. Returns the manifest."""
    job, images = plan.job, plan.images
    skipped = skipped_summary(images, errors)
    if skipped["count"] == len(images):
        shutil.rmtree(plan.units.scratch, ignore_errors=True)  # nothing worth resuming: leave no scratch behind
        raise DataError(
            f"{job.root}: none of the {len(images)} images could be read "
            f"(first: {skipped['images'][0]['reason']}). Check `root` and the image files.",
            params=("root",),
        )
    ok_ids = {im.image_id for im, e in zip(images, errors) if not e}
    kept, dropped = keep_queries(plan.queries, ok_ids)
    if skipped["count"]:
        log.warning(
            "skipped %d unreadable or missing image(s); dropped %d triplet(s) that name them", skipped["count"], dropped
        )
    text_emb = embed_texts(plan.encoder, [q.text for q in kept], batch_size=max(executor.batch_size, 64))
    root = str(Path(job.root).resolve())  # gallery paths are relative to it (webdataset: absolute)
    run_meta = {"encoder": plan.encoder.describe(), "dataset": job.dataset, "root": root, **executor.meta}
    ws.write_gallery(job.split, gallery(), metadata=run_meta)
    write_table(triplets_of(kept, text_emb, ok_ids), ws.triplets_path(job.split), metadata=run_meta)
    index_meta = None
    if job.index != "none":
        index_meta = index_workspace(ws.root, job.split, job.index, device=job.encoder.device, lock=False)
    old = ws.manifest().get("embed", {}) if ws.manifest_path.exists() else {}
    split_info = {
        "dataset": job.dataset,
        "root": root,
        "images": len(images),
        "skipped_images": skipped,
        "queries": len(plan.queries),
        "dropped_triplets": dropped,
        "batch_size": executor.batch_size,
        "attribute_prompts": str(job.attribute_prompts) if plan.prompts else None,
        "index": index_meta and index_meta["factory"],
    }
    if executor.engine is not None:
        split_info["engine"] = {**executor.engine, "parts": plan.units.count}
    manifest = ws.write_manifest(
        source=job.dataset, encoder=plan.encoder.describe(), embed={**old, job.split: split_info}
    )
    shutil.rmtree(plan.units.scratch, ignore_errors=True)
    return manifest
