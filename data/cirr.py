"""CIRR adapter (Liu et al., 2021), release rc2 -> typed records.

Layout under ROOT::

    captions/cap.rc2.{split}.json     [{"pairid", "reference", "target_hard", "target_soft",
                                        "caption", "img_set": {"id", "members", ...}}]
    image_splits/split.rc2.{split}.json   {name: "./dev/name.png"}  (paths relative to ROOT)

``target_soft`` >= 0.5 (other than the hard target) become ``extra_positive_ids``; -1 entries
become ``verified_negative_ids``. Query ids are ``cirr-{split}-{pairid}``. Image paths are those of the
split file, relative to ROOT (``dev/name.png``); the split file lists them whether or not the images
are there.
"""

from __future__ import annotations

from pathlib import Path

from cir_mine.data.errors import DataError
from cir_mine.data.jsonio import load_json, require_str
from cir_mine.data.records import ImageRecord, QueryRecord

EXTRA_POSITIVE_MIN = 0.5


def query_id(split: str, pairid) -> str:
    """The query id of the caption entry with ``pairid``: ``cirr-{split}-{pairid}``."""
    return f"cirr-{split}-{pairid}"


def load_cirr(root: str | Path, split: str) -> tuple[list[ImageRecord], list[QueryRecord]]:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: CIRR root not found. Pass the folder that holds captions/ and image_splits/.")
    split_path = root / "image_splits" / f"split.rc2.{split}.json"
    cap_path = root / "captions" / f"cap.rc2.{split}.json"
    hint = f"Is '{split}' a CIRR split (train, val, test1)?"
    names = load_json(split_path, dict, hint=hint)
    caps = load_json(cap_path, list, hint=hint)
    images = []
    for name, rel in names.items():
        rel = require_str(rel, split_path, f"entry '{name}'")
        images.append(ImageRecord(name, "", (), Path(rel).as_posix()))
    known = set(names)
    queries = []
    for i, e in enumerate(caps):
        if not isinstance(e, dict):
            raise DataError(f"{cap_path}: entry {i} must be an object.")
        if "pairid" not in e:
            raise DataError(f"{cap_path}: entry {i} has no 'pairid'.")
        ref = require_str(e.get("reference"), cap_path, f"entry {i} 'reference'")
        if e.get("target_hard") is None:
            raise DataError(f"{cap_path}: entry {i} has no 'target_hard' (test splits have no targets).")
        tgt = require_str(e.get("target_hard"), cap_path, f"entry {i} 'target_hard'")
        cap = require_str(e.get("caption"), cap_path, f"entry {i} 'caption'")
        for who in (ref, tgt):
            if who not in known:
                raise DataError(f"{cap_path}: entry {i} names image '{who}' that is not in {split_path}.")
        soft = e.get("target_soft") or {}
        if not isinstance(soft, dict):
            raise DataError(f"{cap_path}: entry {i} 'target_soft' must be an object.")
        extra = tuple(k for k, v in soft.items() if k != tgt and float(v) >= EXTRA_POSITIVE_MIN)
        verified = tuple(k for k, v in soft.items() if float(v) == -1.0)
        members = tuple((e.get("img_set") or {}).get("members") or ())
        queries.append(QueryRecord(query_id(split, e["pairid"]), "", ref, tgt, (cap,), extra, verified, members))
    return images, queries
