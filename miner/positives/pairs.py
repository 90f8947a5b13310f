"""Scaled positives, pair finding: near neighbours whose attributes differ in 1..G groups.

For gallery images, near neighbours (FAISS, same category) whose attributes differ in 1..G groups
become (reference, target) pairs with the list of their attribute changes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cir_mine.data.checks import check_numbers
from cir_mine.data.errors import UsageError
from cir_mine.data.workspace import Gallery

from cir_mine.miner.core.attributes import group_values
from cir_mine.miner.core.guards import NEAR_DUPLICATE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Change:
    # fmt: off
    group: str
    removed: tuple[str, ...]     # values the reference has and the target lacks
    added: tuple[str, ...]       # values the target has and the reference lacks
    # fmt: on


@dataclass(frozen=True)
class PairDiff:
    # fmt: off
    ref_id: str
    target_id: str
    category: str
    similarity: float            # s(ref, target)
    changes: tuple[Change, ...]
    # fmt: on


@dataclass(frozen=True)
class PositivesConfig:
    # fmt: off
    per_image: int = 2               # new triplets per reference image at most
    max_diff: int = 2                # attribute groups that may differ (1..the number of groups)
    max_values: int = 3              # attribute values that may differ in all (short, FashionIQ-like captions)
    neighbors: int = 32              # FAISS neighbours searched per image
    dup_threshold: float = NEAR_DUPLICATE  # skip pairs with s(ref, target) >= this: near-duplicates, nothing to
                                           # describe
    max_images: int = 0              # references considered (0 = the whole gallery); seeded sample
    ignore_groups: tuple[str, ...] = ()  # groups never described (e.g. "category" on fiq-proxy)
    seed: int = 0                    # sampling and caption-template seed
    # fmt: on

    def validate(self) -> "PositivesConfig":
        check_numbers(self)
        if self.max_images < 0 or self.max_values < 1:
            raise UsageError("max_images must be >= 0 and max_values >= 1.", params=("max_images", "max_values"))
        if self.per_image < 1 or self.max_diff < 1 or self.neighbors < 2:
            raise UsageError(
                "per_image and max_diff must be >= 1, neighbors >= 2.", params=("per_image", "max_diff", "neighbors")
            )
        return self


def attribute_changes(
    ref_attrs: Sequence[str], tgt_attrs: Sequence[str], ignore: Sequence[str] = ()
) -> tuple[Change, ...]:
    """Groups whose value sets differ between reference and target, in sorted group order."""
    a, b = group_values(ref_attrs), group_values(tgt_attrs)
    out = []
    for g in sorted(set(a) | set(b)):
        if g in ignore:
            continue
        va, vb = a.get(g, set()), b.get(g, set())
        if va != vb:
            out.append(Change(g, tuple(sorted(va - vb)), tuple(sorted(vb - va))))
    return tuple(out)


def find_pairs(gallery: Gallery, cfg: PositivesConfig, existing: set, index=None) -> list[PairDiff]:
    """Near-neighbour pairs that differ in 1..max_diff attribute groups (same category)."""
    from cir_mine.miner.core.search import build_index, search_batched

    cfg.validate()
    n = len(gallery)
    rows = np.arange(n)
    if cfg.max_images and cfg.max_images < n:
        rows = np.sort(np.random.default_rng(cfg.seed).choice(n, size=cfg.max_images, replace=False))
    if index is None or index.ntotal != n:
        index = build_index(gallery.embeddings, "flat", device="auto")
    D, I = search_batched(index, gallery.embeddings[rows], cfg.neighbors + 1)
    ids, cats = gallery.image_ids, gallery.categories
    pairs: list[PairDiff] = []
    for qi, r in enumerate(rows.tolist()):
        taken = 0
        for s, c in zip(D[qi].tolist(), I[qi].tolist()):
            if taken >= cfg.per_image:
                break
            if c < 0 or ids[c] == ids[r] or cats[c] != cats[r] or s >= cfg.dup_threshold:
                continue
            if (ids[r], ids[c]) in existing:
                continue
            ch = attribute_changes(gallery.attributes[r], gallery.attributes[c], cfg.ignore_groups)
            n_values = sum(len(x.added) + len(x.removed) for x in ch)
            if not 1 <= len(ch) <= cfg.max_diff or not 1 <= n_values <= cfg.max_values:
                continue
            pairs.append(PairDiff(ids[r], ids[c], cats[r], float(s), ch))
            taken += 1
    return pairs
