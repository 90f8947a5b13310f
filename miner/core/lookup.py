"""From a CLIP4Cir-style dataset item to its mined negatives, found by what the item is.

CLIP4Cir's ``FashionIQDataset(split, dress_types, mode, preprocess)`` concatenates
``cap.{dress_type}.{split}.json`` in the order of ``dress_types`` (``['dress', 'toptee', 'shirt']``
in its training scripts) into ``.triplets``, a list of ``{"candidate", "target", "captions"}``;
its ``CIRRDataset`` reads ``cap.rc2.{split}.json`` into ``.triplets`` (``pairid``, ``reference``,
``target_hard``, ...). cir-mine's query ids are ``{category}-{split}-{index:05d}`` (index into the
category's caption file) and ``cirr-{split}-{pairid}``.

- :class:`NegativesLookup` answers one item at a time: by its triplet (reference, target and, where
  a pair is in two categories, the category), by FashionIQ (category, index) or by CIRR names.
- :class:`Clip4CirNegatives` wraps a whole CLIP4Cir dataset: every item is matched to its query by
  its own triplet, the alignment is checked item by item (a dataset built from other caption files,
  or in another order than the table's ids say, raises), and ``wrapped[i]`` is ``(*dataset[i],
  negatives, mask)``.

A query the guards left without negatives is an empty entry (mask all False) with or without the
workspace: the table's footer lists those queries (``shortfall.without_negatives``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from cir_mine.data import cirr
from cir_mine.data.errors import DataError, UsageError
from cir_mine.data.fashioniq import parse_query_id, query_id
from cir_mine.miner.core.grouped import GroupedNegatives

RETURNS = ("ids", "rows", "features")


class NegativesLookup:
    """Dataset item -> position in ``grouped`` (its rows: neg_ids, delta, mask, gallery_rows, ...).

    grouped: the table per query (``NegativesTable.grouped()``, with or without the workspace);
    meta: the table's footer (its split, and the queries without negatives a table mined without
    its workspace still holds); categories: object[nq] the queries' categories (default: read off
    FashionIQ query ids)."""

    def __init__(
        self,
        grouped: GroupedNegatives,
        source: str = "the negatives table",
        meta: Optional[dict] = None,
        categories: Optional[Sequence[str]] = None,
    ):
        self.grouped, self.source, self.meta = grouped, source, meta or {}
        self.split: Optional[str] = self.meta.get("split")
        self._short = set((self.meta.get("shortfall") or {}).get("query_ids") or ())
        self._fiq: dict = {}
        self._pair: dict = {}
        parsed = [parse_query_id(q) for q in grouped.query_ids.tolist()]
        self.categories = np.asarray(
            list(categories) if categories is not None else [p[0] if p else "" for p in parsed], dtype=object
        )
        for i, (p, r, t) in enumerate(zip(parsed, grouped.ref_ids.tolist(), grouped.target_ids.tolist())):
            if p is not None:
                self._fiq.setdefault((p[0], p[2]), []).append((p[1], i))
            self._pair.setdefault((r, t), []).append(i)
        splits = {p[1] for p in parsed if p is not None}
        if self.split is None and len(splits) == 1:
            self.split = splits.pop()  # a table without its footer: the split its ids name

    @classmethod
    def read(cls, path: str | Path, ws=None) -> "NegativesLookup":
        """The lookup of a negatives table file (with ``ws``: checked against it, every query of the
        split present, gallery rows filled)."""
        from cir_mine.miner.core.tables import read_negatives

        nt = read_negatives(path, ws)
        if ws is None:
            return cls(nt.grouped(), str(path), nt.meta)
        loaded = ws.load(nt.split)
        return cls(nt.grouped(ws, loaded=loaded), str(path), nt.meta, loaded[1].categories)

    # -- positions

    def index_triplet(self, reference: str, target: str, category: Optional[str] = None) -> int:
        """Position of the query with this reference (FashionIQ ``candidate``), target and, when
        given, category. Raises DataError when no query or several match."""
        hits = self._pair.get((reference, target), [])
        cats = sorted({str(self.categories[i]) for i in hits})
        if category is not None:
            hits = [i for i in hits if self.categories[i] in (category, "")]
        what = f"reference '{reference}' and target '{target}'" + (f" in category '{category}'" if category else "")
        if not hits:
            if cats:
                raise DataError(
                    f"{self.source}: no query has {what}: the pair is a query of category "
                    f"{', '.join(cats)}. Pass the item's own category."
                )
            raise DataError(f"{self.source}: no query has {what}{self._split_note()}. {self._absent_fix()}")
        if len(hits) > 1:
            qids = ", ".join(sorted(str(self.grouped.query_ids[i]) for i in hits))
            fix = "look them up by query id" if category or len(set(cats)) < 2 else "pass category="
            raise DataError(f"{self.source}: {what} name {len(hits)} queries ({qids}); {fix}.")
        return hits[0]

    def index_fashioniq(self, category: str, index: int, split: Optional[str] = None) -> int:
        """Position of FashionIQ item (category, index into cap.{category}.{split}.json); ``split``
        defaults to the table's."""
        index, split = int(index), split or self.split
        hits = [(s, i) for s, i in self._fiq.get((category, index), []) if split is None or s == split]
        if len(hits) == 1:
            return hits[0][1]
        if len(hits) > 1:
            raise DataError(
                f"{self.source}: FashionIQ item ({category!r}, {index}) is in splits "
                f"{', '.join(sorted(s for s, _ in hits))}; pass split=."
            )
        raise DataError(self._fiq_absent(category, index, split), params=("dataset",))

    def index_cirr(self, reference: str, target: str) -> int:
        """Position of the CIRR item (reference name, target_hard name)."""
        return self.index_triplet(reference, target)

    # -- negatives

    def negatives(self, position: int) -> list:
        """Negative ids of the query at ``position``, in pick order."""
        g = self.grouped
        return [str(x) for x in g.neg_ids[position][g.mask[position]].tolist()]

    def triplet(self, reference: str, target: str, category: Optional[str] = None) -> list:
        """Negative ids of the query (reference, target[, category]); [] for a query without negatives."""
        return self.negatives(self.index_triplet(reference, target, category))

    def fashioniq(self, category: str, index: int, split: Optional[str] = None) -> list:
        """Negative ids (ASINs) of FashionIQ item (category, index); [] for a query without negatives."""
        return self.negatives(self.index_fashioniq(category, index, split))

    def cirr(self, reference: str, target: str) -> list:
        """Negative ids (CIRR image names) of the item (reference, target)."""
        return self.negatives(self.index_cirr(reference, target))

    # -- messages

    def _split_note(self) -> str:
        return f" (split '{self.split}', {len(self.grouped)} queries)" if self.split else ""

    def _unlisted_short(self) -> int:
        """Short queries the table has no row for and whose footer does not list them (tables mined
        by an earlier cir-mine, without their workspace)."""
        return len(self._short - set(self.grouped.query_ids.tolist()))

    def _absent_fix(self) -> str:
        n = self._unlisted_short()
        if n:
            return (
                f"{n} of its queries got no negatives and the table (mined by an earlier cir-mine) does not "
                f"name them: read it with its workspace, NegativesLookup.read(path, ws), or mine it again."
            )
        return "Mine the split the dataset reads."

    def _fiq_absent(self, category: str, index: int, split: Optional[str]) -> str:
        qid = query_id(category, split, index) if split else None
        item = f"FashionIQ item ({category!r}, {index})" + (f" (query id {qid})" if qid else "")
        if qid is not None and qid in self._short:
            return (
                f"{self.source}: {item} got no negatives, and the table (mined by an earlier cir-mine) does not "
                f"list the queries without negatives. Read it with its workspace, NegativesLookup.read(path, "
                f"ws), where such a query is an empty entry, or mine it again."
            )
        splits = sorted({s for v in self._fiq.values() for s, _ in v})
        cats = sorted({c for (c, _), v in self._fiq.items() for s, _ in v if split is None or s == split})
        if not self._fiq:
            cause, fix = (
                "its query ids are not FashionIQ ids ({category}-{split}-{index})",
                "Mine a workspace embedded with `cir-mine embed dataset=fashioniq`.",
            )
        elif split is not None and split not in splits:
            cause, fix = f"it was mined on split {', '.join(splits)}", "Mine the split the dataset reads."
        elif category not in cats:
            cause, fix = (
                f"it has no queries of category '{category}' (it has {', '.join(cats)})",
                "Mine every category the dataset reads.",
            )
        else:
            last = max(
                i for (c, i), v in self._fiq.items() if c == category for s, _ in v if split is None or s == split
            )
            if index > last:
                cause = f"its last '{category}' query is entry {last} of cap.{category}.{split or '*'}.json"
                fix = "The dataset reads another caption file than the one mined; mine the annotations it reads."
            else:
                cause = (
                    f"entry {index} of cap.{category}.{split or '*'}.json is not one of its queries (an entry whose "
                    f"captions are all empty, or whose image was skipped when embedding, has none)"
                )
                fix = "Leave that item out."
        return f"{self.source}: no negatives for {item}: {cause}. {fix}"


# ------------------------------------------------------------------------------------------------
# A CLIP4Cir dataset with its negatives


class Clip4CirNegatives:
    """A CLIP4Cir ``FashionIQDataset`` or ``CIRRDataset`` whose items also carry their negatives.

    ``wrapped[i]`` is ``(*dataset[i], negatives, mask)`` (None where ``dataset[i]`` is None, which
    CLIP4Cir's ``collate_fn`` drops), with ``negatives`` as ``returns`` says:

    - ``"features"``: float32[k, d] the negatives' cached gallery embeddings (zeros in empty slots);
    - ``"rows"``: int64[k] their gallery rows (-1 empty);
    - ``"ids"``: tuple of k image names ("" empty; torch's default collate turns a batch into k
      tuples of B names, as it does with FashionIQ's caption pairs);

    and ``mask``: bool[k], True where the slot holds a negative. ``rows`` and ``features`` need
    ``ws``, the workspace the table was mined from (checked).

    Each item is matched to its query by its own triplet (``dataset.triplets[i]``): FashionIQ by
    (candidate, target) and the caption file it comes from, CIRR by ``pairid`` with its reference
    and target checked. An item whose triplet is not the table's query raises DataError; an item
    without a query (a FashionIQ entry whose captions are all empty) and a query the guards left
    without negatives are empty entries. ``query_ids`` (object[n], None for an item without a
    query) gives the query id of every item, in the dataset's order: pass it with your model's
    query embeddings to :class:`cir_mine.miner.remine.Remine`.

    negatives: a table path, ``read_negatives(...)``, a MineResult or a pyarrow Table; split:
    default the dataset's ``split``; k: slots (default the table's k).
    """

    def __init__(
        self,
        dataset,
        negatives,
        ws=None,
        returns: str = "features",
        k: Optional[int] = None,
        split: Optional[str] = None,
    ):
        from cir_mine.miner.core.tables import as_negatives_table

        if returns not in RETURNS:
            raise UsageError(f"returns {returns!r}: use {', '.join(RETURNS)}.", params=("returns",))
        if returns != "ids" and ws is None:
            raise UsageError(
                f"returns={returns!r} needs ws=, the workspace the table was mined from "
                f"(returns='ids' works without it).",
                params=("returns",),
            )
        triplets = getattr(dataset, "triplets", None)
        if not isinstance(triplets, list):
            raise UsageError(
                f"Clip4CirNegatives wraps a CLIP4Cir FashionIQDataset or CIRRDataset (items read from "
                f"its .triplets list); got {type(dataset).__name__} without one."
            )
        self.dataset, self.returns, self.k_request, self._ws = dataset, returns, k, ws
        nt = as_negatives_table(negatives, ws, "Clip4CirNegatives")
        self.split = split or getattr(dataset, "split", None) or nt.split
        self.source = str(nt.path) if nt.path else "the negatives table"
        if nt.meta.get("split") and nt.meta["split"] != self.split:
            raise DataError(
                f"{self.source}: mined on split '{nt.meta['split']}', but the dataset reads split "
                f"'{self.split}'. Mine split '{self.split}'."
            )
        self._loaded = ws.load(self.split) if ws is not None else None
        lookup = self._lookup(nt)
        self.query_ids = item_query_ids(triplets, lookup, self.split)
        self._set(lookup.grouped)

    def _lookup(self, nt) -> NegativesLookup:
        if self._ws is None:
            return NegativesLookup(nt.grouped(), self.source, nt.meta)
        return NegativesLookup(
            nt.grouped(self._ws, self.split, loaded=self._loaded), self.source, nt.meta, self._loaded[1].categories
        )

    def set_negatives(self, negatives) -> None:
        """Swap in another table of the same split (e.g. ``Remine``'s re-mined MineResult); DataLoader
        workers started after this call (each epoch, unless ``persistent_workers``) see it."""
        from cir_mine.miner.core.tables import as_negatives_table

        nt = as_negatives_table(negatives, self._ws, "Clip4CirNegatives")
        if nt.meta.get("split") and nt.meta["split"] != self.split:
            raise DataError(
                f"the new negatives table was mined on split '{nt.meta['split']}', this dataset reads "
                f"split '{self.split}'."
            )
        self._set(self._lookup(nt).grouped)

    def _set(self, g: GroupedNegatives) -> None:
        k = self.k_request or g.k
        pos = np.full(len(self.query_ids), -1, np.int64)
        known = {q: i for i, q in enumerate(g.query_ids.tolist())}
        for i, q in enumerate(self.query_ids.tolist()):
            pos[i] = known.get(q, -1) if q is not None else -1
        has = pos >= 0
        kk = min(k, g.k)
        self.mask = np.zeros((len(pos), k), bool)
        self.mask[has, :kk] = g.mask[pos[has], :kk]
        self.neg_ids = np.full((len(pos), k), None, dtype=object)
        self.neg_ids[has, :kk] = g.neg_ids[pos[has], :kk]
        self.neg_ids[~self.mask] = None
        self.rows = None
        if g.gallery_rows is not None:
            self.rows = np.full((len(pos), k), -1, np.int64)
            self.rows[has, :kk] = g.gallery_rows[pos[has], :kk]
            self.rows[~self.mask] = -1
        self.embeddings = self._loaded[0].embeddings if self.returns == "features" else None

    @property
    def k(self) -> int:
        return int(self.mask.shape[1])

    @property
    def has_query(self) -> np.ndarray:
        """bool[n]: the item is a query of the split (its ``query_ids`` entry is not None)."""
        return np.asarray([q is not None for q in self.query_ids.tolist()], bool)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_ws"] = state["_loaded"] = None  # workers get arrays only, never the workspace
        return state

    def __len__(self) -> int:
        return len(self.dataset)

    def negatives_of(self, i: int):
        """(negatives, mask) of item ``i`` as ``returns`` says."""
        mask = self.mask[i].copy()
        if self.returns == "ids":
            return tuple(str(x) if m else "" for x, m in zip(self.neg_ids[i].tolist(), mask)), mask
        rows = self.rows[i].copy()
        if self.returns == "rows":
            return rows, mask
        out = np.zeros((self.k, self.embeddings.shape[1]), np.float32)
        out[mask] = self.embeddings[rows[mask]]
        return out, mask

    def __getitem__(self, i: int):
        item = self.dataset[i]
        if item is None:
            return None
        negs, mask = self.negatives_of(i)
        return (*item, negs, mask) if isinstance(item, tuple) else (item, negs, mask)


def item_query_ids(triplets: list, lookup: NegativesLookup, split: str) -> np.ndarray:
    """The query id of every item of a CLIP4Cir dataset's ``.triplets`` (None: no query), matched
    by the item's own triplet and checked against the table (see :class:`Clip4CirNegatives`)."""
    if triplets and isinstance(triplets[0], dict) and "pairid" in triplets[0]:
        return _cirr_ids(triplets, lookup, split)
    if triplets and not (isinstance(triplets[0], dict) and "candidate" in triplets[0]):
        raise UsageError("the dataset's .triplets entries have neither 'candidate' (FashionIQ) nor 'pairid' (CIRR).")
    return _fashioniq_ids(triplets, lookup, split)


def _entry(triplets: list, i: int, keys: tuple) -> tuple:
    e = triplets[i]
    if not isinstance(e, dict) or any(not isinstance(e.get(k), (str, int)) for k in keys):
        raise DataError(f"the dataset's triplet {i} must be an object with {', '.join(keys)}; found {e!r}.")
    return tuple(e[k] for k in keys)


def _check(lookup: NegativesLookup, i: int, qid: str, pos: int, ref: str, tgt: str, where: str) -> None:
    g = lookup.grouped
    if (g.ref_ids[pos], g.target_ids[pos]) != (ref, tgt):
        raise DataError(
            f"{lookup.source}: item {i} of the dataset is {ref} -> {tgt}, but query {qid} ({where}) is "
            f"{g.ref_ids[pos]} -> {g.target_ids[pos]}. The dataset and the table were built from "
            f"different annotations; mine the annotations the dataset reads."
        )


def _fashioniq_ids(triplets: list, lookup: NegativesLookup, split: str) -> np.ndarray:
    """FashionIQ: each category's items are a run of consecutive items, entry j of the caption file
    at run start + j. Run starts are read off the items whose (candidate, target) is one query;
    every item is then checked against the query its position in its run names."""
    g = lookup.grouped
    pos_of = {q: i for i, q in enumerate(g.query_ids.tolist())}
    names = [_entry(triplets, i, ("candidate", "target")) for i in range(len(triplets))]
    starts: dict = {}
    for i, pair in enumerate(names):
        hits = [parse_query_id(g.query_ids[p]) for p in lookup._pair.get(pair, [])]
        hits = [h for h in hits if h is not None and h[1] == split]
        if len(hits) == 1:
            starts.setdefault(hits[0][0], Counter())[i - hits[0][2]] += 1
    if not starts:
        if names and not lookup._fiq:
            raise DataError(
                f"{lookup.source}: its query ids are not FashionIQ ids ({{category}}-{{split}}-{{index}}); "
                f"mine a workspace embedded with `cir-mine embed dataset=fashioniq`.",
                params=("dataset",),
            )
        if names:
            raise DataError(
                f"{lookup.source}: none of the dataset's {len(names)} items is one of its queries "
                f"(split '{split}'). Mine the split and annotations the dataset reads."
            )
        return np.zeros(0, dtype=object)
    runs = []
    for cat, counts in starts.items():
        (start, _), *others = counts.most_common()
        if others or start < 0:
            bad = others[0][0] if others else start
            i = next(
                i
                for i, pair in enumerate(names)
                if any(parse_query_id(g.query_ids[p]) == (cat, split, i - bad) for p in lookup._pair.get(pair, []))
            )
            raise DataError(
                f"{lookup.source}: item {i} of the dataset ({names[i][0]} -> {names[i][1]}) is entry "
                f"{i - bad} of cap.{cat}.{split}.json, out of step with the dataset's other '{cat}' items. "
                f"The dataset and the table were built from different annotations; mine the "
                f"annotations the dataset reads."
            )
        runs.append((start, cat))
    runs.sort()
    cats = ", ".join(sorted(c for _, c in runs))
    if runs[0][0] > 0:
        raise DataError(
            f"{lookup.source}: the dataset's items 0 to {runs[0][0] - 1} ({names[0][0]} -> {names[0][1]}, "
            f"...) are not queries of the table (its categories: {cats}). Mine every category the "
            f"dataset reads."
        )
    out = np.full(len(names), None, dtype=object)
    for (start, cat), end in zip(runs, [s for s, _ in runs[1:]] + [len(names)]):
        for i in range(start, end):
            qid = query_id(cat, split, i - start)
            p = pos_of.get(qid)
            if p is not None:
                _check(lookup, i, qid, p, *names[i], f"entry {i - start} of cap.{cat}.{split}.json")
                out[i] = qid
            elif qid in lookup._short:
                out[i] = qid  # no negatives, and no row to check against
            elif not any(str(c).strip() for c in (triplets[i].get("captions") or [])):
                out[i] = None  # all captions empty: never a query
            else:
                raise DataError(
                    f"{lookup.source}: item {i} of the dataset ({names[i][0]} -> {names[i][1]}) would be "
                    f"entry {i - start} of cap.{cat}.{split}.json, query {qid}, which the table does not "
                    f"have (its categories: {cats}). Mine the split, categories and annotations the "
                    f"dataset reads."
                )
    return out


def _cirr_ids(triplets: list, lookup: NegativesLookup, split: str) -> np.ndarray:
    """CIRR: the item's pairid names its query; its reference and target are checked."""
    g = lookup.grouped
    pos_of = {q: i for i, q in enumerate(g.query_ids.tolist())}
    out = np.full(len(triplets), None, dtype=object)
    for i in range(len(triplets)):
        pairid, ref, tgt = _entry(triplets, i, ("pairid", "reference", "target_hard"))
        qid = cirr.query_id(split, pairid)
        p = pos_of.get(qid)
        if p is not None:
            _check(lookup, i, qid, p, ref, tgt, f"pairid {pairid}")
        elif qid not in lookup._short:
            raise DataError(
                f"{lookup.source}: item {i} of the dataset (pairid {pairid}, {ref} -> {tgt}) is query "
                f"{qid}, which the table does not have. Mine the split the dataset reads."
            )
        out[i] = qid
    return out
