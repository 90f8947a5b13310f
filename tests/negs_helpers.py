"""Build valid negatives tables from a workspace without the miner (for stats/sql/inspect/report tests).

Scores come from the zero-shot query ``normalize(ref_emb + text_emb)``; ``strategy="random"`` picks
uniform gallery items, ``strategy="hardest"`` the top of the ranking; target, reference and extra
positives are never picked. ``drop`` queries get fewer than k rows and are recorded as shortfall.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from cir_mine.data.workspace import Workspace, gallery_table, l2_normalize, triplets_table, write_table
from cir_mine.miner.core.attributes import attr_overlap
from cir_mine.miner.core.tables import write_negatives
from tests.fixtures import COLORS, write_png


def make_negatives(work: Path, out: Path, split: str = "train", k: int = 5, strategy: str = "random",
                   seed: int = 0, round: int = 0, n_queries: int | None = None, drop: int = 0,
                   guards: dict | None = None, guards_per_query: dict | None = None) -> Path:
    ws = Workspace(work)
    g, t = ws.load(split)
    rng = np.random.default_rng(seed)
    nq = len(t) if n_queries is None else min(n_queries, len(t))
    ref_rows = g.rows(t.ref_ids[:nq], t.categories[:nq])
    tgt_rows = g.rows(t.target_ids[:nq], t.categories[:nq])
    q = l2_normalize(g.embeddings[ref_rows] + t.text_embeddings[:nq])
    scores = q @ g.embeddings.T                                         # float32[nq, n]
    order = np.argsort(-scores, axis=1, kind="stable")
    rank_of = np.empty_like(order)
    np.put_along_axis(rank_of, order, np.arange(order.shape[1])[None, :], axis=1)
    cols = {c: [] for c in ("query_id", "ref_id", "target_id", "neg_id", "neg_category", "strategy", "rank", "score",
                            "target_score", "delta", "round", "category_match", "attr_overlap", "seed")}
    short = []
    for i in range(nq):
        banned = {t.ref_ids[i], t.target_ids[i], *t.extra_positive_ids[i]}
        if strategy == "hardest":
            cand = [r for r in order[i, : k + len(banned) + 5] if g.image_ids[r] not in banned]
        else:
            cand = [r for r in rng.permutation(len(g))[: k + len(banned) + 5] if g.image_ids[r] not in banned]
        kk = k - 1 if i < drop else k
        if kk < k:
            short.append(str(t.query_ids[i]))
        ts = float(scores[i, tgt_rows[i]])
        for r in cand[:kk]:
            cols["query_id"].append(t.query_ids[i]); cols["ref_id"].append(t.ref_ids[i])
            cols["target_id"].append(t.target_ids[i]); cols["neg_id"].append(g.image_ids[r])
            cols["neg_category"].append(g.categories[r])
            cols["strategy"].append(strategy); cols["rank"].append(int(rank_of[i, r]))
            cols["score"].append(float(scores[i, r])); cols["target_score"].append(ts)
            cols["delta"].append(ts - float(scores[i, r])); cols["round"].append(round)
            cols["category_match"].append(bool(g.categories[r] == g.categories[tgt_rows[i]]))
            cols["attr_overlap"].append(attr_overlap(g.attributes[r], g.attributes[tgt_rows[i]]))
            cols["seed"].append(seed)
    meta = {"manifest_hash": ws.manifest_hash(), "split": split, "round": round,
            "config": {"strategy": strategy, "k": k, "seed": seed},
            "shortfall": {"count": len(short), "query_ids": short},
            "guards": guards if guards is not None else {"target": nq, "reference": nq, "extra_positive": 3}}
    if guards_per_query is not None:
        meta["guards_per_query"] = guards_per_query
    write_negatives(pa.table(cols), out, meta)
    return Path(out)


def make_image_work(root: Path, n: int = 24, n_queries: int = 6, dim: int = 16, seed: int = 0,
                    absolute: bool = False) -> tuple[Path, Path]:
    """A workspace whose gallery has a ``path`` column pointing at real PNGs.

    Returns (work, images_root); paths are relative to images_root unless ``absolute``.
    """
    root = Path(root)
    images, work = root / "images", root / "work"
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colors = list(COLORS)
    ids = [f"img{i:03d}" for i in range(n)]
    cats = [("dress", "shirt")[i % 2] for i in range(n)]
    attrs = [[f"color:{colors[i % 4]}", f"sleeve:{('short', 'long')[(i // 4) % 2]}"] for i in range(n)]
    rel = [f"{cats[i]}/{ids[i]}.png" for i in range(n)]
    for i in range(n):
        write_png(images / rel[i], COLORS[colors[i % 4]], size=48, seed=i)
    paths = [str(images / p) for p in rel] if absolute else rel
    emb = l2_normalize(rng.normal(size=(n, dim)).astype(np.float32))
    write_table(gallery_table(ids, cats, attrs, emb, paths=paths), work / "gallery.train.parquet")
    qi = np.arange(n_queries)
    text = l2_normalize(rng.normal(size=(n_queries, dim)).astype(np.float32))
    write_table(triplets_table([f"q{i}" for i in qi], [cats[2 * i] for i in qi], [ids[2 * i] for i in qi],
                               [ids[2 * i + 2] for i in qi], [[f"is {colors[(2 * i + 2) % 4]}"] for i in qi], text),
                work / "triplets.train.parquet")
    return work, images
