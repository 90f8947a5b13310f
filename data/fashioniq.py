"""FashionIQ adapter (Guo et al., 2021): the release's on-disk layout -> typed records.

Layout under ROOT::

    captions/cap.{dress,shirt,toptee}.{split}.json   [{"candidate", "target", "captions": [2 str]}]
    image_splits/split.{cat}.{split}.json            [ASIN, ...]
    images/{ASIN}.png|.jpg                           (optional: feature-only use needs none)

Image paths are relative to ROOT (``images/{ASIN}.png``).
    tags/asin2attr.{cat}.{split}.json                (optional) ASIN -> 6 lists of tag words

Query ids are stable: ``{cat}-{split}-{index:05d}`` with the index into the caption file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Optional, Sequence

from cir_mine.data.errors import DataError
from cir_mine.data.jsonio import load_json, require_str
from cir_mine.data.records import ImageRecord, QueryRecord

log = logging.getLogger(__name__)

CATEGORIES = ("dress", "shirt", "toptee")
# The order CLIP4Cir builds its FashionIQ train and val datasets in (``combiner_train.py``,
# ``clip_fine_tune.py``): item i of ``FashionIQDataset(split, CLIP4CIR_DRESS_TYPES, ...)`` walks the
# caption files in this order.
CLIP4CIR_DRESS_TYPES = ("dress", "toptee", "shirt")
# The six lists in asin2attr are, in order: category words, texture, fabric, shape, part, style.
TAG_GROUPS = ("category", "texture", "fabric", "shape", "part", "style")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def query_id(category: str, split: str, index: int) -> str:
    """The query id of entry ``index`` of ``cap.{category}.{split}.json``: ``{category}-{split}-{index:05d}``."""
    return f"{category}-{split}-{int(index):05d}"


def parse_query_id(qid: str) -> Optional[tuple[str, str, int]]:
    """``dress-train-00012`` -> ("dress", "train", 12); None for an id of another form."""
    cat, sep, rest = str(qid).partition("-")
    split, sep2, index = rest.rpartition("-")
    if cat not in CATEGORIES or not sep or not sep2 or not split or not index.isdigit():
        return None
    return cat, split, int(index)


def clip4cir_fashioniq_items(
    root: str | Path, split: str, dress_types: Sequence[str] = CLIP4CIR_DRESS_TYPES
) -> list[tuple[str, int]]:
    """CLIP4Cir's ``FashionIQDataset(split, dress_types, 'relative')`` item order: item ``i`` ->
    (category, index into cap.{category}.{split}.json), the caption files concatenated in the order
    of ``dress_types`` (default CLIP4Cir's own, dress, toptee, shirt). Reads only the caption files
    under ``root``/captions. An order that differs from the dataset's maps items to other queries
    without an error; :class:`cir_mine.miner.core.lookup.Clip4CirNegatives` finds each item by its
    own triplet instead."""
    root = Path(root)
    cats = check_categories(dress_types, root)
    out = []
    for cat in cats:
        caps = load_json(
            root / "captions" / f"cap.{cat}.{split}.json",
            list,
            hint=f"Is '{split}' a FashionIQ split (train, val, test)?",
        )
        out += [(cat, i) for i in range(len(caps))]
    return out


def check_categories(categories: Optional[Iterable[str]], path_hint: Path) -> tuple[str, ...]:
    cats = tuple(categories) if categories else CATEGORIES
    unknown = [c for c in cats if c not in CATEGORIES]
    if unknown:
        raise DataError(f"{path_hint}: unknown FashionIQ category '{unknown[0]}'; choose from {', '.join(CATEGORIES)}.")
    return cats


def tags_to_attributes(tags, path: Path, asin: str) -> list[str]:
    """asin2attr's 6 lists -> ``group:value`` strings (duplicates dropped, order kept)."""
    if not isinstance(tags, list) or len(tags) != len(TAG_GROUPS):
        raise DataError(f"{path}: entry '{asin}' must be a list of {len(TAG_GROUPS)} tag lists.")
    out, seen = [], set()
    for group, words in zip(TAG_GROUPS, tags):
        for w in words or []:
            a = f"{group}:{str(w).strip().lower()}"
            if a not in seen:
                seen.add(a)
                out.append(a)
    return out


def find_image(root: Path, image_id: str) -> Optional[str]:
    """``images/{image_id}.png|.jpg|.jpeg`` relative to ``root`` when that file exists, else None."""
    for ext in IMAGE_EXTENSIONS:
        rel = f"images/{image_id}{ext}"
        if (root / rel).exists():
            return rel
    return None


def load_fashioniq(
    root: str | Path, split: str, categories: Optional[Sequence[str]] = None, with_tags: bool = True
) -> tuple[list[ImageRecord], list[QueryRecord]]:
    """Read FashionIQ annotations. Returns (gallery images, queries) for ``split``.

    The gallery is each category's image split, plus any reference/target that the category's
    captions name outside it (kept, so every triplet resolves). An image listed under two
    categories (1,180 shirt/toptee ASINs of the real train split) is a row of each, as it is in
    both of CLIP4Cir's per-category galleries; mining treats the two rows as one product.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: FashionIQ root not found. Pass the folder that holds captions/ and image_splits/.")
    cats = check_categories(categories, root)
    images: dict[tuple[str, str], ImageRecord] = {}  # (category, ASIN) -> record
    queries: list[QueryRecord] = []
    for cat in cats:
        split_path = root / "image_splits" / f"split.{cat}.{split}.json"
        cap_path = root / "captions" / f"cap.{cat}.{split}.json"
        asins = load_json(split_path, list, hint=f"Is '{split}' a FashionIQ split (train, val, test)?")
        caps = load_json(cap_path, list, hint=f"Is '{split}' a FashionIQ split (train, val, test)?")
        attrs: dict = {}
        tag_path = root / "tags" / f"asin2attr.{cat}.{split}.json"
        if with_tags and tag_path.exists():
            attrs = load_json(tag_path, dict)

        def add(asin: str) -> None:
            if (cat, asin) in images:
                return
            a = tags_to_attributes(attrs[asin], tag_path, asin) if asin in attrs else []
            images[(cat, asin)] = ImageRecord(asin, cat, tuple(a), find_image(root, asin))

        for i, asin in enumerate(asins):
            add(require_str(asin, split_path, f"entry {i}"))
        for i, entry in enumerate(caps):
            if not isinstance(entry, dict):
                raise DataError(f"{cap_path}: entry {i} must be an object with candidate, target, captions.")
            ref = require_str(entry.get("candidate"), cap_path, f"entry {i} 'candidate'")
            tgt = require_str(entry.get("target"), cap_path, f"entry {i} 'target'")
            texts = entry.get("captions")
            if not isinstance(texts, list) or not texts:
                raise DataError(f"{cap_path}: entry {i} 'captions' must be a non-empty list of strings.")
            for j, c in enumerate(texts):
                if not isinstance(c, str):
                    raise DataError(f"{cap_path}: entry {i} caption {j} must be a string, found {c!r}.")
            # Real FashionIQ files hold some empty captions: keep the non-empty ones, and skip a
            # query only when none is left (logged; the index in the query id stays stable).
            texts = tuple(c.strip() for c in texts if c.strip())
            if not texts:
                log.warning("%s: entry %d has only empty captions; skipped", cap_path, i)
                continue
            add(ref)
            add(tgt)
            queries.append(QueryRecord(query_id(cat, split, i), cat, ref, tgt, texts))
    return list(images.values()), queries
