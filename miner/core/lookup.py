"""From a CLIP4Cir-style dataset item to its mined negatives.

CLIP4Cir's ``FashionIQDataset`` concatenates ``cap.{dress_type}.{split}.json`` in the order of
``dress_types``; an item is (category, index into that category's caption file), which is exactly
the query id ``{category}-{split}-{index:05d}`` cir-mine gives it
(:func:`cir_mine.data.fashioniq.query_id`; :func:`cir_mine.data.fashioniq.clip4cir_fashioniq_items` maps
CLIP4Cir's global index to that pair). Its ``CIRRDataset`` items name the reference and the target
(``reference``, ``target_hard``), one pair per query.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from cir_mine.data.errors import DataError
from cir_mine.data.fashioniq import parse_query_id, query_id
from cir_mine.miner.core.grouped import GroupedNegatives


class NegativesLookup:
    """Dataset item -> position in ``grouped`` (its rows: neg_ids, delta, mask, gallery_rows, ...)."""

    def __init__(self, grouped: GroupedNegatives, source: str = "the negatives table"):
        self.grouped, self.source = grouped, source
        self._fiq: dict = {}
        self._pair: dict = {}
        for i, (q, r, t) in enumerate(zip(grouped.query_ids.tolist(), grouped.ref_ids.tolist(),
                                          grouped.target_ids.tolist())):
            parsed = parse_query_id(q)
            if parsed is not None:
                self._fiq.setdefault((parsed[0], parsed[2]), []).append((parsed[1], i))
            self._pair.setdefault((r, t), []).append(i)

    @classmethod
    def read(cls, path: str | Path, ws=None) -> "NegativesLookup":
        """The lookup of a negatives table file (with ``ws``: checked against it, gallery rows filled)."""
        from cir_mine.miner.core.tables import read_negatives

        return cls(read_negatives(path, ws).grouped(ws), str(path))

    def index_fashioniq(self, category: str, index: int, split: Optional[str] = None) -> int:
        """Position of FashionIQ item (category, index into cap.{category}.{split}.json)."""
        hits = [(s, i) for s, i in self._fiq.get((category, int(index)), []) if split is None or s == split]
        if not hits:
            qid = query_id(category, split or "SPLIT", index)
            raise DataError(f"{self.source}: no negatives for FashionIQ item ({category!r}, {int(index)}) "
                            f"(query id {qid}). Mine the split the dataset reads, with every category "
                            f"(an entry whose captions are all empty has no query).")
        if len(hits) > 1:
            raise DataError(f"{self.source}: FashionIQ item ({category!r}, {int(index)}) is in splits "
                            f"{', '.join(sorted(s for s, _ in hits))}; pass split=.")
        return hits[0][1]

    def index_cirr(self, reference: str, target: str) -> int:
        """Position of the CIRR item (reference name, target_hard name)."""
        hits = self._pair.get((reference, target), [])
        if not hits:
            raise DataError(f"{self.source}: no negatives for the item with reference '{reference}' and target "
                            f"'{target}'. Mine the split the dataset reads.")
        if len(hits) > 1:
            qids = ", ".join(self.grouped.query_ids[i] for i in hits)
            raise DataError(f"{self.source}: reference '{reference}' and target '{target}' name {len(hits)} "
                            f"queries ({qids}); look them up by query id.")
        return hits[0]

    def negatives(self, position: int) -> list:
        """Negative ids of the query at ``position``, in pick order."""
        g = self.grouped
        return [str(x) for x in g.neg_ids[position][g.mask[position]].tolist()]

    def fashioniq(self, category: str, index: int, split: Optional[str] = None) -> list:
        """Negative ids (ASINs) of FashionIQ item (category, index)."""
        return self.negatives(self.index_fashioniq(category, index, split))

    def cirr(self, reference: str, target: str) -> list:
        """Negative ids (CIRR image names) of the item (reference, target)."""
        return self.negatives(self.index_cirr(reference, target))
