"""Retrieval metrics for composed image retrieval, chunked so memory stays bounded.

The core is :func:`target_ranks`: for each query, the number of allowed gallery items that score
strictly higher than the query's target (0 = the target is first). Recall@K = mean(rank < K).
Scores are computed block by block (``chunk`` queries x ``chunk`` gallery items), so a 100k x 100k
evaluation never holds the full matrix. ``tests/test_train_metrics.py`` checks it against a
full-matrix argsort.

Protocols (chosen by :func:`evaluate` from the triplets), those of CLIP4Cir's ``validate.py``:

- **FashionIQ**: per category the gallery is that category's images (the reference among them:
  CLIP4Cir's validation keeps it, and so does this unless ``exclude_reference``); R@10 and R@50 per
  category, their average over categories, and ``avg`` = (R@10 + R@50) / 2 of those averages
  (CLIP4Cir's ``average_recall``).
- **CIRR**: one gallery, the reference always removed; R@1/5/10/50, and Recall_subset@1/2/3 where
  the gallery is the query's ``img_set`` members minus the reference. ``avg`` = (R@5 + Rs@1) / 2.

A target ranks below every item that scores strictly higher (ties count in its favour; CLIP4Cir's
argsort breaks them in index order). :func:`evaluate_queries` evaluates a model's own query
embeddings over a workspace split (``cir-mine eval``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from cir_mine.data.errors import DataError

FIQ_KS = (10, 50)
CIRR_KS = (1, 5, 10, 50)
SUBSET_KS = (1, 2, 3)


def target_ranks(
    query_emb: np.ndarray,
    gallery_emb: np.ndarray,
    target_rows: np.ndarray,
    exclude_rows: Optional[np.ndarray] = None,
    chunk: int = 2048,
) -> np.ndarray:
    """Rank of each query's target in the gallery.

    query_emb: float32[m, d]; gallery_emb: float32[n, d]; target_rows: int64[m] (rows of gallery_emb);
    exclude_rows: int64[m, e] gallery rows not counted for that query (-1 = padding), e.g. the
    reference. Returns int64[m]: how many non-excluded gallery items score strictly higher than the
    target. A NaN score ranks last: a NaN candidate is never above the target, and a NaN target is
    below every candidate (so NaN never scores a hit). Memory: one float32[chunk, chunk] block at a time.
    """
    query_emb = np.asarray(query_emb, dtype=np.float32)
    gallery_emb = np.asarray(gallery_emb, dtype=np.float32)
    target_rows = np.asarray(target_rows, dtype=np.int64)
    m, n = query_emb.shape[0], gallery_emb.shape[0]
    target_score = np.einsum("ij,ij->i", query_emb, gallery_emb[target_rows])
    nan_target = np.isnan(target_score)
    # Columns never counted per query: the target itself and the excluded rows, each once.
    skip = target_rows[:, None]
    if exclude_rows is not None:
        skip = np.concatenate([skip, np.asarray(exclude_rows, dtype=np.int64).reshape(m, -1)], axis=1)
    skip = skip.copy()
    for j in range(1, skip.shape[1]):
        skip[(skip[:, :j] == skip[:, j : j + 1]).any(axis=1), j] = -1
    ranks = np.zeros(m, dtype=np.int64)
    for qs in range(0, m, chunk):
        qe = min(m, qs + chunk)
        thr = target_score[qs:qe, None]
        for gs in range(0, n, chunk):
            ge = min(n, gs + chunk)
            above = _above(query_emb[qs:qe] @ gallery_emb[gs:ge].T, thr, nan_target[qs:qe, None])
            ranks[qs:qe] += above.sum(axis=1)
            for j in range(skip.shape[1]):
                col = skip[qs:qe, j]
                hit = np.flatnonzero((col >= gs) & (col < ge))
                ranks[qs + hit] -= above[hit, col[hit] - gs]
    return ranks


def _above(scores: np.ndarray, target: np.ndarray, nan_target: np.ndarray) -> np.ndarray:
    """scores > target, with NaN ranked last: a NaN score is below everything, a NaN target below all."""
    with np.errstate(invalid="ignore"):
        return (scores > target) | nan_target


def recalls(ranks: np.ndarray, ks: Sequence[int], prefix: str = "R@") -> dict:
    """Percentages (0-100): {f"{prefix}{k}": 100 * mean(rank < k)}."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        return {f"{prefix}{k}": float("nan") for k in ks}
    return {f"{prefix}{k}": float(100.0 * np.mean(ranks < k)) for k in ks}


def is_cirr(categories: Sequence[str], img_set: Sequence[Sequence[str]]) -> bool:
    """The CIRR protocol applies when no query has a category or any query has an img_set."""
    return all(not c for c in categories) or any(len(s) for s in img_set)


def fashioniq_metrics(
    query_emb: np.ndarray,
    query_categories: np.ndarray,
    ref_ids: np.ndarray,
    target_ids: np.ndarray,
    gallery_emb: np.ndarray,
    gallery_ids: np.ndarray,
    gallery_categories: np.ndarray,
    exclude_reference: bool = False,
    chunk: int = 2048,
) -> dict:
    """FashionIQ protocol -> {"R@10", "R@50", "per_category": {cat: {"R@10", "R@50", "n"}}}.

    query_emb: float32[m, d]; ids/categories: object[m] / object[n] of str.
    """
    per_cat = {}
    for cat in sorted(set(np.asarray(query_categories).tolist())):
        gmask = np.asarray(gallery_categories) == cat
        grows = np.flatnonzero(gmask)
        row = {k: i for i, k in enumerate(np.asarray(gallery_ids)[grows].tolist())}
        qsel = np.flatnonzero(np.asarray(query_categories) == cat)
        try:
            tr = np.asarray([row[t] for t in np.asarray(target_ids)[qsel].tolist()], dtype=np.int64)
        except KeyError as e:
            raise DataError(
                f"target {e.args[0]} is not in the '{cat}' gallery; the FashionIQ protocol "
                f"retrieves within the query's category."
            ) from None
        ex = None
        if exclude_reference:
            ex = np.asarray([row.get(r, -1) for r in np.asarray(ref_ids)[qsel].tolist()], dtype=np.int64)
        ranks = target_ranks(query_emb[qsel], gallery_emb[grows], tr, ex, chunk=chunk)
        per_cat[cat] = {**recalls(ranks, FIQ_KS), "n": int(qsel.size)}
    out = {
        f"R@{k}": float(np.mean([v[f"R@{k}"] for v in per_cat.values()])) if per_cat else float("nan") for k in FIQ_KS
    }
    out["avg"] = (out["R@10"] + out["R@50"]) / 2
    out["per_category"] = per_cat
    out["protocol"] = "fashioniq"
    out["reference"] = "removed" if exclude_reference else "kept"
    out["n_queries"] = int(len(query_emb))
    return out


def cirr_metrics(
    query_emb: np.ndarray,
    ref_ids: np.ndarray,
    target_ids: np.ndarray,
    img_set: Sequence[Sequence[str]],
    gallery_emb: np.ndarray,
    gallery_ids: np.ndarray,
    chunk: int = 2048,
) -> dict:
    """CIRR protocol -> {"R@1","R@5","R@10","R@50","Rs@1","Rs@2","Rs@3","avg"} (reference excluded)."""
    row = {}
    for i, k in enumerate(np.asarray(gallery_ids).tolist()):
        row.setdefault(k, i)
    tr = np.asarray([row[t] for t in np.asarray(target_ids).tolist()], dtype=np.int64)
    rr = np.asarray([row.get(r, -1) for r in np.asarray(ref_ids).tolist()], dtype=np.int64)
    out = recalls(target_ranks(query_emb, gallery_emb, tr, rr, chunk=chunk), CIRR_KS)
    # Recall_subset: rank among the img_set members other than the reference.
    has = [i for i, s in enumerate(img_set) if len(s)]
    sub_ranks = []
    for i in has:
        members = [row[x] for x in dict.fromkeys(img_set[i]) if x in row and row[x] != rr[i]]
        if tr[i] not in members:
            members.append(int(tr[i]))
        s = gallery_emb[members] @ query_emb[i]
        t = float(gallery_emb[tr[i]] @ query_emb[i])
        # the target itself is among the members; NaN ranks last (see target_ranks)
        sub_ranks.append(int(_above(s, np.float32(t), np.bool_(t != t)).sum()) - (1 if t != t else 0))
    out.update(
        recalls(np.asarray(sub_ranks), SUBSET_KS, prefix="Rs@") if has else {f"Rs@{k}": float("nan") for k in SUBSET_KS}
    )
    out["avg"] = (out["R@5"] + out["Rs@1"]) / 2 if has else out["R@5"]
    out["protocol"] = "cirr"
    out["reference"] = "removed"
    out["n_queries"] = int(len(query_emb))
    return out


def evaluate(query_emb: np.ndarray, triplets, gallery, exclude_reference: bool = False, chunk: int = 2048) -> dict:
    """Pick the protocol from the triplets (see module doc) and compute it.

    query_emb: float32[m, d] for ``triplets`` (a data.workspace.Triplets); gallery: data.workspace.Gallery.
    """
    if is_cirr(triplets.categories.tolist(), triplets.img_set):
        return cirr_metrics(
            query_emb,
            triplets.ref_ids,
            triplets.target_ids,
            triplets.img_set,
            gallery.embeddings,
            gallery.image_ids,
            chunk=chunk,
        )
    return fashioniq_metrics(
        query_emb,
        triplets.categories,
        triplets.ref_ids,
        triplets.target_ids,
        gallery.embeddings,
        gallery.image_ids,
        gallery.categories,
        exclude_reference=exclude_reference,
        chunk=chunk,
    )


def evaluate_queries(
    ws,
    split: str,
    query_emb: np.ndarray,
    query_ids: Optional[Sequence[str]] = None,
    exclude_reference: bool = False,
    chunk: int = 2048,
) -> dict:
    """Your model's query embeddings for the queries of ``ws``/``split``, by the dataset's protocol.

    query_emb: float[m, d], one row per query of the split, in the triplets' row order or in any
    order named by ``query_ids`` (checked: unknown, repeated or missing ids, shape, NaN and zero rows
    raise DataError). The gallery is the workspace's (its cached image embeddings). Returns
    :func:`evaluate`'s dict: FashionIQ ``R@10``, ``R@50`` (averages over categories), ``avg``,
    ``per_category``; CIRR ``R@1`` ... ``R@50``, ``Rs@1`` ... ``Rs@3``, ``avg``; both ``protocol``,
    ``reference`` (kept or removed), ``n_queries``. ``exclude_reference`` removes the reference
    from FashionIQ's gallery too (CIRR always removes it)."""
    from cir_mine.miner.core.query_emb import align_query_embeddings, check_query_embeddings

    g, t = ws.require().load(split)
    where = "query_emb"
    if query_ids is not None:
        query_emb = align_query_embeddings(query_emb, query_ids, t.query_ids, where)
    emb = check_query_embeddings(np.asarray(query_emb), t.query_ids.tolist(), g.dim, where)
    return evaluate(emb, t, g, exclude_reference=exclude_reference, chunk=chunk)


def evaluate_file(ws, split: str, queries, exclude_reference: bool = False, chunk: int = 2048) -> dict:
    """:func:`evaluate_queries` for embeddings in files (``cir-mine eval``): ``queries`` is a query
    source such as :class:`cir_mine.miner.negatives.QueryFile` (a .npy, and optionally its ids)."""
    from cir_mine.data.workspace import Workspace

    ws = (ws if isinstance(ws, Workspace) else Workspace(ws)).require()
    g, t = ws.load(split)
    emb = queries.embeddings(ws, split, lambda: (g, t))
    return evaluate(emb, t, g, exclude_reference=exclude_reference, chunk=chunk)


def format_metrics(split: str, m: dict) -> str:
    """The metrics of :func:`evaluate_queries` as lines of text (``cir-mine eval``)."""
    ref = "reference kept in the gallery" if m["reference"] == "kept" else "reference removed from the gallery"
    head = f"{m['protocol']} {split}: {m['n_queries']:,} queries, {ref}"
    if m["protocol"] == "cirr":
        keys = ("R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3")
        return head + "\n" + "  ".join(f"{k} {m[k]:.2f}" for k in keys) + f"  avg (R@5 + Rs@1) / 2 {m['avg']:.2f}"
    lines = [head]
    for cat, v in m["per_category"].items():
        lines.append(f"  {cat}: R@10 {v['R@10']:.2f}  R@50 {v['R@50']:.2f}  ({v['n']:,} queries)")
    lines.append(f"  average: R@10 {m['R@10']:.2f}  R@50 {m['R@50']:.2f}  avg (R@10 + R@50) / 2 {m['avg']:.2f}")
    return "\n".join(lines)
