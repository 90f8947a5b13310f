"""Negatives tables in the shapes other trainers read (``cir-mine export``).

- ``ntuple``: sentence-transformers' n-tuple layout, which it reads by column position: ``anchor``
  (the query's caption text), ``positive`` (the target) and ``negative_1`` ... ``negative_k`` (the
  negatives in pick order), images as gallery ids or image file paths (``images``). One row per
  query with k negatives; queries with fewer are left out (counted). Needs the workspace (captions,
  paths). HF ``datasets`` reads it with ``load_dataset("parquet", data_files=OUT, split="train")``.
- ``wide``: one Parquet row per query with its ids and lists: ``query_id``, ``ref_id``,
  ``target_id``, ``negatives`` (list of k ids, pick order), ``delta``, ``neg_category`` and the
  ``negative_1`` ... ``negative_k`` columns (null past a short query's last negative).
- ``jsonl``: one JSON object per query (query_id, ref_id, target_id, negatives, delta); with the
  dataset ``root``, instead CLIP4Cir-style caption files: every entry of each
  ``captions/cap.{category}.{split}.json`` (FashionIQ) or ``cap.rc2.{split}.json`` (CIRR) the
  table covers, unchanged, with a ``negatives`` list added (empty for a query without negatives).

Every output is computed and checked before the first write; each file is written atomically; an
output that is one of the inputs is refused, and an existing one unless ``overwrite``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from cir_mine.data.errors import DataError, UsageError
from cir_mine.data import cirr, fashioniq
from cir_mine.data.fashioniq import parse_query_id
from cir_mine.data.io import atomic_path, check_output, check_output_dir, write_job
from cir_mine.data.jsonio import load_json
from cir_mine.data.workspace import now_iso, write_table
from cir_mine.miner.core.grouped import GroupedNegatives
from cir_mine.miner.core.tables import read_negatives

FORMATS = ("ntuple", "wide", "jsonl")
IMAGES = ("id", "path")


@dataclass
class Export:
    # fmt: off
    out: Path                 # the file or folder written
    files: list               # every file written
    queries: int              # queries exported
    k: int                    # negatives slots per query
    left_out: int = 0         # ntuple: queries left out for having fewer than k negatives
    # fmt: on


def ntuple_table(g: GroupedNegatives, captions: list, images) -> tuple[pa.Table, int]:
    """GroupedNegatives of a split (one row per query in the triplets' order, gallery rows filled)
    -> (the positional n-tuple table, queries left out). ``captions``: the anchor text per query;
    ``images``: gallery row -> the string written for that image (its id or path)."""
    full = g.mask.all(axis=1) & (g.k > 0)
    rows = np.flatnonzero(full)
    cols = {
        "anchor": pa.array([captions[i] for i in rows.tolist()], pa.string()),
        "positive": pa.array(images(g.target_rows[rows]), pa.string()),
    }
    for j in range(g.k):
        cols[f"negative_{j + 1}"] = pa.array(images(g.gallery_rows[rows, j]), pa.string())
    return pa.table(cols), int(len(g) - rows.size)


def wide_table(g: GroupedNegatives) -> pa.Table:
    """GroupedNegatives -> the wide table (schema in docs/formats.md)."""
    negs = [[str(x) for x in row[m]] for row, m in zip(g.neg_ids, g.mask)]
    deltas = [d[m].astype(np.float32) for d, m in zip(g.delta, g.mask)]
    cols = {
        "query_id": pa.array(g.query_ids.tolist(), pa.string()),
        "ref_id": pa.array(g.ref_ids.tolist(), pa.string()),
        "target_id": pa.array(g.target_ids.tolist(), pa.string()),
        "negatives": pa.array(negs, pa.list_(pa.string())),
        "delta": pa.array(deltas, pa.list_(pa.float32())),
    }
    if g.neg_category is not None:
        cols["neg_category"] = pa.array([list(row[m]) for row, m in zip(g.neg_category, g.mask)], pa.list_(pa.string()))
    for j in range(g.k):
        cols[f"negative_{j + 1}"] = pa.array(g.neg_ids[:, j].tolist(), pa.string())
    return pa.table(cols)


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def _caption_files(g: GroupedNegatives, root: Path, source: Path) -> list:
    """[(caption file, entries with negatives)] for every caption file the table's queries cover."""
    ids = g.query_ids.tolist()
    pos = {q: i for i, q in enumerate(ids)}
    negs = lambda i: [str(x) for x in g.neg_ids[i][g.mask[i]].tolist()]
    fiq = [parse_query_id(q) for q in ids]
    if ids and all(p is not None for p in fiq):
        files = sorted({(c, s) for c, s, _ in fiq})
        out = []
        for cat, split in files:
            path = root / "captions" / f"cap.{cat}.{split}.json"
            entries = load_json(path, list, hint="Pass the FashionIQ root the table was mined from.")
            rows = []
            for i, e in enumerate(entries):
                if not isinstance(e, dict):
                    raise DataError(f"{path}: entry {i} must be an object with candidate, target, captions.")
                j = pos.get(fashioniq.query_id(cat, split, i))
                if j is not None and (e.get("candidate"), e.get("target")) != (g.ref_ids[j], g.target_ids[j]):
                    raise DataError(
                        f"{path}: entry {i} is {e.get('candidate')} -> {e.get('target')} but {source} "
                        f"has {g.ref_ids[j]} -> {g.target_ids[j]} for query {ids[j]}. Pass the "
                        f"FashionIQ root the table was mined from."
                    )
                rows.append({**e, "negatives": negs(j) if j is not None else []})
            out.append((path, rows))
        return out
    splits = {q.split("-")[1] for q in ids if q.startswith("cirr-") and q.count("-") >= 2}
    if ids and all(q.startswith("cirr-") for q in ids) and len(splits) == 1:
        split = splits.pop()
        path = root / "captions" / f"cap.rc2.{split}.json"
        entries = load_json(path, list, hint="Pass the CIRR root the table was mined from.")
        rows = []
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or "pairid" not in e:
                raise DataError(f"{path}: entry {i} has no 'pairid'.")
            j = pos.get(cirr.query_id(split, e["pairid"]))
            rows.append({**e, "negatives": negs(j) if j is not None else []})
        return [(path, rows)]
    raise UsageError(
        f"root: the query ids of {source} are not FashionIQ ({{category}}-{{split}}-{{index}}) "
        f"or CIRR (cirr-{{split}}-{{pairid}}) ids, so there are no caption files to extend; "
        f"export without root.",
        params=("root",),
    )


def _image_strings(gallery, images: str, root: Optional[Path]):
    """gallery row -> id or file path (relative paths joined to ``root``)."""
    if images == "id":
        return lambda rows: [str(gallery.image_ids[r]) for r in rows.tolist()]
    if gallery.paths is None or not all(gallery.paths):
        raise DataError(
            f"{gallery.path}: the gallery has no image paths (column 'path'): export ids with images id, "
            f"or embed the files with `cir-mine embed`.",
            params=("images",),
        )
    from cir_mine.data.records import image_file

    return lambda rows: [str(image_file(root, gallery.paths[r])) for r in rows.tolist()]


def export_negatives(
    negs: str | Path,
    fmt: str,
    out: str | Path,
    root: Optional[str | Path] = None,
    overwrite: bool = False,
    ws=None,
    images: str = "id",
) -> Export:
    """Write the negatives table ``negs`` as ``fmt`` (ntuple | wide | jsonl) to ``out`` (see the
    module doc). ``ws``: the workspace the table was mined from (ntuple needs it for the captions
    and image paths); ``images``: ntuple's image columns as gallery ids (``id``) or file paths
    (``path``, relative ones joined to ``root``, default the dataset root the workspace records)."""
    negs, out = Path(negs), Path(out)
    if fmt not in FORMATS:
        raise UsageError(f"format {fmt!r}: use {', '.join(FORMATS)}.", params=("format",))
    if images not in IMAGES:
        raise UsageError(f"images {images!r}: use id or path.", params=("images",))
    if fmt == "ntuple":
        return _export_ntuple(negs, out, ws, images, root, overwrite)
    if root is not None and fmt != "jsonl":
        raise UsageError(
            "root goes with format jsonl (CLIP4Cir caption files) or ntuple (image paths).", params=("root", "format")
        )
    nt = read_negatives(negs)
    g = nt.grouped()
    if root is None:
        out = check_output(out, [negs], overwrite)
        with write_job(out.parent, f"cir-mine export -> {out.name}"):
            _write_one(g, nt, negs, fmt, out)
        return Export(out, [out], len(g), g.k)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found. Pass the folder that holds captions/.")
    files = _caption_files(g, root, negs)
    inputs = [negs] + [path for path, _ in files]
    check_output_dir(out, inputs)
    targets = [(check_output(out / path.name, inputs, overwrite), rows) for path, rows in files]
    with write_job(out, "cir-mine export --root"):  # all files or none
        for dest, rows in targets:
            with atomic_path(dest) as tmp:
                tmp.write_bytes(_json_bytes(rows))
    return Export(out, [d for d, _ in targets], len(g), g.k)


def _meta(nt, negs: Path, kind: str, k: int, **extra) -> dict:
    return {
        "table": kind,
        "created": now_iso(),
        "source": str(negs),
        "k": k,
        "split": nt.meta.get("split"),
        "data_hash": nt.meta.get("data_hash"),
        "manifest_hash": nt.meta.get("manifest_hash"),
        **extra,
    }


def _export_ntuple(negs: Path, out: Path, ws, images: str, root, overwrite: bool) -> Export:
    from cir_mine.data.records import join_captions

    if ws is None:
        raise UsageError(
            "the ntuple format needs ws, the workspace the table was mined from: its captions are the "
            "anchors, its gallery the image ids and paths.",
            params=("ws",),
        )
    out = check_output(out, [negs], overwrite)
    nt = read_negatives(negs, ws)
    g_all, t = ws.load(nt.split)
    g = nt.grouped(ws, loaded=(g_all, t))
    root = Path(root) if root is not None else ws.image_root(nt.split)
    table, left_out = ntuple_table(g, [join_captions(c) for c in t.captions], _image_strings(g_all, images, root))
    meta = _meta(
        nt,
        negs,
        "negatives-ntuple",
        g.k,
        images=images,
        left_out=left_out,
        columns=["anchor: caption text", "positive: target", "negative_1..k: negatives in pick order"],
    )
    with write_job(out.parent, f"cir-mine export -> {out.name}"):
        write_table(table, out, metadata={"cir_mine": meta})
    return Export(out, [out], table.num_rows, g.k, left_out)


def _write_one(g: GroupedNegatives, nt, negs: Path, fmt: str, out: Path) -> None:
    if fmt == "wide":
        write_table(wide_table(g), out, metadata={"cir_mine": _meta(nt, negs, "negatives-wide", g.k)})
    else:
        lines = [
            _json_bytes(
                {
                    "query_id": q,
                    "ref_id": r,
                    "target_id": t,
                    "negatives": [str(x) for x in n[m]],
                    "delta": [float(x) for x in d[m]],
                }
            )
            for q, r, t, n, d, m in zip(
                g.query_ids.tolist(), g.ref_ids.tolist(), g.target_ids.tolist(), g.neg_ids, g.delta, g.mask
            )
        ]
        with atomic_path(out) as tmp:
            tmp.write_bytes(b"".join(x + b"\n" for x in lines))
