"""Folder adapter: your own images plus a CSV or JSONL of triplets -> typed records.

Layout under ROOT::

    ROOT/**/*.png|.jpg|.jpeg|.webp|.bmp     the gallery (every image file under ROOT)
    ROOT/triplets.{split}.csv | .jsonl       one triplet per row (or ``triplets.csv`` / ``.jsonl``)

Triplet columns (CSV header or JSONL keys): ``ref``, ``target``, ``caption`` and optional
``category`` and ``query_id``. ``ref``/``target`` name an image by its id: the file path relative
to ROOT without the extension (``img001`` or ``dress/img001``); a name with an extension is
accepted too. In JSONL, ``caption`` may be a string or a list of strings (``captions`` works as
well). An image takes the category of the first triplet that names it, else ``""``. Query ids
default to ``folder-{split}-{row:05d}`` (row = 0-based data row in the file).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Optional

from cir_mine.data.errors import DataError
from cir_mine.data.records import ImageRecord, QueryRecord

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TRIPLET_COLUMNS = ("ref", "target", "caption")


def find_triplets_file(root: Path, split: str) -> Path:
    """ROOT/triplets.{split}.csv|jsonl, else ROOT/triplets.csv|jsonl."""
    for stem in (f"triplets.{split}", "triplets"):
        for ext in (".csv", ".jsonl"):
            p = root / f"{stem}{ext}"
            if p.exists():
                return p
    raise DataError(
        f"{root}: no triplets file (looked for triplets.{split}.csv, triplets.{split}.jsonl, "
        f"triplets.csv, triplets.jsonl). Write one with columns ref, target, caption[, category]."
    )


def image_id_of(rel: Path) -> str:
    """Relative image path -> id (``dress/img001.png`` -> ``dress/img001``)."""
    return rel.with_suffix("").as_posix()


def scan_images(root: Path) -> dict[str, str]:
    """id -> path relative to ``root`` of every image file under ``root`` (sorted, deterministic)."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            key = image_id_of(p.relative_to(root))
            if key in out:
                raise DataError(f"{p}: two image files share the id '{key}' ({root / out[key]}). Rename one of them.")
            out[key] = p.relative_to(root).as_posix()
    return out


def read_rows(path: Path) -> list[dict]:
    """CSV (with a header) or JSONL rows as dicts."""
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n} is not valid JSON ({e.msg}).") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: line {n} must be a JSON object with ref, target, caption.")
            rows.append(obj)
        return rows
    with open(path, newline="", encoding="utf-8-sig") as fh:  # utf-8-sig: a BOM (Excel) is not part of a column name
        reader = csv.DictReader(fh)
        missing = [c for c in TRIPLET_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(
                f"{path}: missing column(s) {', '.join(missing)}; the header needs ref, target, caption[, category]."
            )
        return list(reader)


def _captions(row: dict, path: Path, n: int) -> tuple[str, ...]:
    cap = row.get("caption", row.get("captions"))
    caps = cap if isinstance(cap, list) else [cap]
    if not all(isinstance(c, str) for c in caps):
        raise DataError(f"{path}: row {n} 'caption' must be a string or a list of strings.")
    return tuple(c.strip() for c in caps if c.strip())


def load_folder(
    root: str | Path, split: str, triplets: Optional[str | Path] = None
) -> tuple[list[ImageRecord], list[QueryRecord]]:
    """Read a folder dataset. Returns (gallery images, queries) for ``split``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found. Pass the folder that holds the images and triplets.csv.")
    path = Path(triplets) if triplets is not None else find_triplets_file(root, split)
    if not path.exists():
        raise DataError(f"{path}: triplets file not found.")
    files = scan_images(root)
    by_name = {Path(p).name: k for k, p in files.items()}
    category: dict[str, str] = {}
    queries: list[QueryRecord] = []

    def resolve(name, n: int, col: str) -> str:
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{path}: row {n} '{col}' must be a non-empty image name.")
        name = name.strip()
        for key in (name, image_id_of(Path(name)), by_name.get(name)):
            if key in files:
                return key
        raise DataError(f"{path}: row {n} '{col}' names image '{name}' that is not under {root}.")

    for n, row in enumerate(read_rows(path)):
        ref, tgt = resolve(row.get("ref"), n, "ref"), resolve(row.get("target"), n, "target")
        caps = _captions(row, path, n)
        if not caps:
            log.warning("%s: row %d has no non-empty caption; skipped", path, n)
            continue
        cat = str(row.get("category") or "").strip()
        for key in (ref, tgt):
            if category.setdefault(key, cat) != cat and cat:
                log.warning(
                    "%s: image '%s' named with categories '%s' and '%s'; keeping the first",
                    path,
                    key,
                    category[key],
                    cat,
                )
        qid = str(row.get("query_id") or f"folder-{split}-{n:05d}")
        queries.append(QueryRecord(qid, category.get(ref, cat), ref, tgt, caps))
    images = [ImageRecord(k, category.get(k, ""), (), p) for k, p in files.items()]
    return images, queries
