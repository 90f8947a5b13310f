"""Typed records yielded by the dataset adapters (ids are strings at every boundary)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ImageRecord:
    # fmt: off
    image_id: str                      # dataset image id (FashionIQ ASIN, CIRR name, file stem)
    category: str                      # garment category or "" when the dataset has none
    attributes: tuple[str, ...] = ()   # "group:value" entries; a bare value belongs to group "tag"
    path: Optional[str] = None         # image file path, relative to the dataset root (or absolute)
    # fmt: on


@dataclass(frozen=True)
class QueryRecord:
    # fmt: off
    query_id: str                      # stable id, e.g. "dress-train-00012" or "cirr-val-12060"
    category: str                      # category of the reference image
    ref_id: str                        # reference image id
    target_id: str                     # target image id
    captions: tuple[str, ...]          # modification texts (FashionIQ has two, CIRR one)
    extra_positive_ids: tuple[str, ...] = ()     # other correct targets (CIRR target_soft >= 0.5)
    verified_negative_ids: tuple[str, ...] = ()  # annotator-verified negatives (CIRR target_soft == -1)
    img_set: tuple[str, ...] = ()                # CIRR subset members (for Recall_subset)
    # fmt: on

    @property
    def text(self) -> str:
        """The text that is embedded for the query: captions joined FashionIQ-style."""
        return join_captions(self.captions)


def image_file(root, path: Optional[str]):
    """The file of an image ``path`` (relative to the dataset ``root``, or absolute); None without a path."""
    from pathlib import Path

    if not path:
        return None
    p = Path(path)
    return p if p.is_absolute() or root is None else Path(root) / p


def join_captions(captions) -> str:
    """FashionIQ's query text: non-empty captions joined with " and " (CLIP4Cir's convention)."""
    return " and ".join(c.strip().rstrip(".") for c in captions if c and c.strip())
