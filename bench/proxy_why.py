"""Why mined negatives barely pay on the FashionIQ-tags proxy: caption/stand-in mismatch and false negatives.

    python bench/proxy_why.py --work ../shared/fiq-proxy [--negatives OUT/negs.hardest...parquet ...]

Prints (one run, no training):
- the share of queries whose captions name a colour (the stand-ins carry no colour), and the share whose
  captions name any tag word of the target's stand-in at all;
- per query, how many same-category gallery images have the target's exact tag set (indistinguishable
  from the target in the proxy: at evaluation they are ranked like the target but count as misses);
- with --positives: the same caption statistics of generated triplets, and how close their
  reference and target are (real FashionIQ pairs are far apart);
- the share of random in-category images that carry every target tag word the caption names (the
  caption gives no evidence against them: in the proxy they are as good an answer as the target);
- for each negatives table: the share of mined negatives with the target's exact tag set (true positives
  of the proxy mined as negatives), the share within cosine 0.95 of the target, and the mean tag Jaccard
  with the target (random in-category images for comparison).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cir_mine.data.workspace import Workspace  # noqa: E402

COLOURS = (
    "black white red blue green yellow pink purple orange brown grey gray beige navy maroon teal "
    "tan gold silver cream ivory olive khaki burgundy coral turquoise lavender violet magenta "
    "colorful colourful color colour darker lighter dark light bright pastel neon"
).split()


def tagset(attrs) -> frozenset:
    return frozenset(a for a in attrs if not a.startswith("category:"))


def tag_words(attrs) -> set:
    return {w for a in attrs for w in re.split(r"[\s\-]+", a.split(":", 1)[1].lower()) if len(w) > 2}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "fiq-proxy")
    ap.add_argument("--negatives", type=Path, nargs="*", default=[])
    ap.add_argument("--positives", type=Path, default=None, help="generated triplets (cir-mine positives)")
    args = ap.parse_args(argv)
    g, t = Workspace(args.work).load("train")
    attrs = [list(a) for a in g.attributes]
    sets = [tagset(a) for a in attrs]
    cats = g.categories.tolist()
    words_re = re.compile(r"\b(" + "|".join(COLOURS) + r")\b")
    caps = [" ".join(c).lower() for c in t.captions]
    colour = np.array([bool(words_re.search(c)) for c in caps])
    trow = g.rows(t.target_ids.tolist(), t.categories.tolist(), what="target")
    rrow = g.rows(t.ref_ids.tolist(), t.categories.tolist(), what="reference")
    names_tag = np.array([bool(tag_words(attrs[r]) & set(re.findall(r"[a-z]+", c))) for r, c in zip(trow, caps)])
    print(
        f"queries: {len(t)}; captions naming a colour: {colour.mean():.1%}; "
        f"captions naming any tag word of the target: {names_tag.mean():.1%}; "
        f"colour but no target tag word: {(colour & ~names_tag).mean():.1%}"
    )
    emb = g.embeddings
    print(f"cos(reference, target): median {np.median((emb[rrow] * emb[trow]).sum(1)):.3f}")
    if args.positives:
        from cir_mine.data.workspace import read_triplets

        p = read_triplets(args.positives, dim=g.dim)
        pc = [" ".join(c).lower() for c in p.captions]
        pr = g.rows(p.ref_ids.tolist(), p.categories.tolist(), what="reference")
        pt = g.rows(p.target_ids.tolist(), p.categories.tolist(), what="target")
        share = Counter(p.categories.tolist())
        print(
            f"generated ({args.positives.name}): {len(p)} triplets {dict(share)}; captions naming a colour: "
            f"{np.mean([bool(words_re.search(c)) for c in pc]):.1%}; cos(reference, target): median "
            f"{np.median((emb[pr] * emb[pt]).sum(1)):.3f}; cos(caption embedding, real caption centroid): "
            f"{float(_unit(p.text_embeddings.mean(0)) @ _unit(t.text_embeddings.mean(0))):.3f}"
        )
    same_ref = np.array([sets[a] == sets[b] for a, b in zip(rrow, trow)])
    print(f"reference and target with the same tag set (the query's change is invisible): {same_ref.mean():.1%}")
    twins = Counter((c, s) for c, s in zip(cats, sets))
    n_twins = np.array([twins[(cats[r], sets[r])] - 1 for r in trow])
    print(
        f"same-category images with the target's exact tag set, per query: median {np.median(n_twins):.0f}, "
        f"mean {n_twins.mean():.1f}, share of queries with >= 1: {(n_twins >= 1).mean():.1%}, >= 10: "
        f"{(n_twins >= 10).mean():.1%}"
    )
    rng = np.random.default_rng(0)
    by_cat = {c: np.flatnonzero(g.categories == c) for c in set(cats)}
    rnd = np.array([rng.choice(by_cat[cats[r]]) for r in trow])
    print(
        f"random in-category image: same tag set as the target {np.mean([sets[a] == sets[b] for a, b in zip(rnd, trow)]):.1%}, "
        f"mean tag Jaccard {np.mean([jac(sets[a], sets[b]) for a, b in zip(rnd, trow)]):.3f}"
    )
    cap_words = [set(re.findall(r"[a-z]+", c)) for c in caps]
    named = [tag_words(attrs[r]) & w for r, w in zip(trow, cap_words)]  # target tag words the caption names

    def caption_blind(neg_rows, qi) -> np.ndarray:
        """bool: the negative also has every target tag word the caption names (no caption evidence against it)."""
        return np.array([named[i] <= tag_words(attrs[n]) for n, i in zip(neg_rows, qi)])

    has_named = np.array([bool(x) for x in named])
    blind = caption_blind(rnd, np.arange(len(t)))
    print(
        f"random in-category image with every target tag word the caption names: {blind.mean():.1%} "
        f"({blind[has_named].mean():.1%} of the queries whose caption names one)"
    )
    qpos = {q: i for i, q in enumerate(t.query_ids.tolist())}
    import pyarrow.parquet as pq

    for path in args.negatives:
        tab = pq.read_table(path, columns=["query_id", "neg_id", "strategy"])
        qi = np.array([qpos[q] for q in tab.column("query_id").to_pylist()])
        nrow = g.rows(tab.column("neg_id").to_pylist(), [cats[trow[i]] for i in qi], what="negative")
        tr = trow[qi]
        same = np.array([sets[a] == sets[b] for a, b in zip(nrow, tr)])
        cos = (emb[nrow] * emb[tr]).sum(1)
        j = np.array([jac(sets[a], sets[b]) for a, b in zip(nrow, tr)])
        print(
            f"{path.name}: {tab.num_rows} negatives for {len(set(qi.tolist()))} queries; same tag set as the "
            f"target {same.mean():.1%}; cos(neg, target) >= 0.95 {(cos >= 0.95).mean():.1%}, median cos "
            f"{np.median(cos):.3f}; mean tag Jaccard {j.mean():.3f}; with every target tag word the caption "
            f"names {caption_blind(nrow, qi).mean():.1%} ({caption_blind(nrow, qi)[has_named[qi]].mean():.1%} "
            f"where the caption names one)"
        )


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x)


def jac(a: frozenset, b: frozenset) -> float:
    return len(a & b) / max(1, len(a | b))


if __name__ == "__main__":
    from cir_mine.data.memory import prefer_fast_pool

    prefer_fast_pool()  # Arrow's memory pool, as the command line sets it
    main()
