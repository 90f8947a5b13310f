"""Two experimental negative tables for fiq-proxy that the miner's strategies do not make.

    python bench/proxy_tables.py --work ../shared/fiq-proxy --kind reference-side --out bench/out/px/negs.refside.parquet
    python bench/proxy_tables.py --work ../shared/fiq-proxy --kind caption --out bench/out/px/negs.caption.parquet

- ``reference-side``: per query the gallery images of its category nearest the *reference*
  (the "modification ignored" failure: 17% of the images an in-batch model ranks above the target
  in its top 10 are the reference or exact copies of it), kept when they sit closer to the
  reference than to the target, s(c, r) > s(c, t).
- ``caption``: near the zero-shot query normalize(r + t), and missing a tag word that the caption
  names and the target carries: the caption itself rules these out (a text-verified negative).

Both keep the miner's guards: never the reference, the target or an extra positive, never a
near-duplicate of the target (s(c, t) >= 0.98). The table has the negatives schema (strategy
"hardest", rank -1, scores 0) and carries a hardest table's footer, so `cir-train --negatives`
reads it; it is not meant for --refresh-every (the footer's config would re-mine hardest).
Prints the rows and the queries covered.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cir_mine.data.workspace import Workspace, l2_normalize  # noqa: E402
from cir_mine.miner.core.mine import MineConfig, mine_negatives  # noqa: E402
from cir_mine.miner.core.tables import write_negatives  # noqa: E402

POOL = 512  # candidates looked at per query


def tag_words(attributes) -> list[set]:
    """Per image, its tag words without the group prefix (category tags left out)."""
    return [{a.split(":", 1)[1] for a in tags if not a.startswith("category:")} for tags in attributes]


def caption_words(captions) -> str:
    return " " + re.sub(r"[^a-z0-9\- ]", " ", " ".join(c for c in captions if c).lower()) + " "


def build(work: Path, kind: str, k: int) -> tuple[pa.Table, dict]:
    g, t = Workspace(work).require().load("train")
    G = g.embeddings
    cats, gcat, gid = np.asarray(t.categories), np.asarray(g.categories), np.asarray(g.image_ids)
    ref = g.rows(t.ref_ids.tolist(), t.categories.tolist(), what="reference")
    tgt = g.rows(t.target_ids.tolist(), t.categories.tolist(), what="target")
    words = tag_words(g.attributes)
    probe = G[ref] if kind == "reference-side" else l2_normalize(G[ref] + t.text_embeddings)
    extra = t.extra_positive_ids
    out = {"query_id": [], "ref_id": [], "target_id": [], "neg_id": [], "neg_category": []}
    for c in np.unique(cats):
        crow, qi = np.flatnonzero(gcat == c), np.flatnonzero(cats == c)
        for s0 in range(0, len(qi), 1024):
            qq = qi[s0 : s0 + 1024]
            top = np.argsort(-(probe[qq] @ G[crow].T), axis=1)[:, :POOL]
            for a, j in enumerate(qq):
                cand = crow[top[a]]
                st = G[cand] @ G[tgt[j]]
                ok = (gid[cand] != gid[ref[j]]) & (gid[cand] != gid[tgt[j]]) & (st < 0.98)
                if extra is not None and len(extra[j]):
                    ok &= ~np.isin(gid[cand], np.asarray(extra[j]))
                if kind == "reference-side":
                    ok &= (G[cand] @ G[ref[j]]) > st
                else:
                    cap = caption_words(t.captions[j])
                    named = {w for w in words[tgt[j]] if f" {w} " in cap}
                    if not named:
                        continue
                    ok &= np.array([not named <= words[x] for x in cand])
                for x in cand[ok][:k]:
                    out["query_id"].append(t.query_ids[j])
                    out["ref_id"].append(gid[ref[j]])
                    out["target_id"].append(gid[tgt[j]])
                    out["neg_id"].append(gid[x])
                    out["neg_category"].append(gcat[x])
    return out, {"queries": len(set(out["query_id"])), "of": len(t.query_ids)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "fiq-proxy")
    ap.add_argument("--kind", choices=("reference-side", "caption"), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("-k", type=int, default=8)
    args = ap.parse_args(argv)
    cols, cover = build(args.work, args.kind, args.k)
    # the footer (config, gallery fingerprint) of a one-query hardest table of this workspace
    res = mine_negatives(
        Workspace(args.work), "train", MineConfig.of(strategy="hardest", k=1, device="cpu", max_candidates=None)
    )
    n = len(cols["neg_id"])
    schema = res.table.schema
    full = {
        **cols,
        "strategy": ["hardest"] * n,
        "rank": np.full(n, -1, np.int32),
        "score": np.zeros(n, np.float32),
        "target_score": np.zeros(n, np.float32),
        "delta": np.zeros(n, np.float32),
        "round": np.zeros(n, np.int32),
        "category_match": np.ones(n, bool),
        "attr_overlap": np.zeros(n, np.float32),
        "seed": np.zeros(n, np.int64),
    }
    table = pa.table({f.name: pa.array(full[f.name], type=f.type) for f in schema})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_negatives(table, args.out, res.meta)
    print(f"{args.kind}: {n} rows for {cover['queries']} of {cover['of']} queries -> {args.out}")


if __name__ == "__main__":
    from cir_mine.data.memory import prefer_fast_pool

    prefer_fast_pool()  # Arrow's memory pool, as the command line sets it
    main()
