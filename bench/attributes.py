"""Caption attribute extraction on the real FashionIQ captions: coverage, and a sample to hand-check.

    python bench/attributes.py [--root ../shared/fashion-iq] [--split train] [--vocabulary FILE]
                               [--sample 100] [--seed 1] [--markdown] [--proxy ../shared/fiq-proxy]

Prints coverage (share of captions with at least one extracted attribute) per category and overall,
the share of captions per group, then a seeded random sample of captions with their extraction (as
Markdown table rows with --markdown, ready to judge in docs/attribute-sample.md). With --proxy WORK
(a workspace with FashionIQ tags, e.g. fiq-proxy) it also checks ``requested_status`` of each
query's request against its true target (and reference, for comparatives): how often the tags can
tell, and how often they agree with the caption.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cir_mine.data.fashioniq import load_fashioniq  # noqa: E402
from cir_mine.miner.core.attributes import load_vocabulary, requested_status  # noqa: E402


def captions(root: Path, split: str) -> list[tuple[str, str, str]]:
    """(query_id, category, caption) for every non-empty caption, in file order."""
    _, queries = load_fashioniq(root, split, with_tags=False)
    return [(q.query_id, q.category, c) for q in queries for c in q.captions]


def proxy_check(work: Path, split: str, vocab) -> None:
    """requested_status of each triplet's request on its true target: known share and agreement."""
    import pyarrow.parquet as pq

    g = pq.read_table(work / f"gallery.{split}.parquet", columns=["image_id", "attributes"]).to_pydict()
    attrs = dict(zip(g["image_id"], g["attributes"]))
    t = pq.read_table(work / f"triplets.{split}.parquet", columns=["ref_id", "target_id", "captions"]).to_pydict()
    told = collections.Counter()
    total = collections.Counter()
    for ref, tgt, caps in zip(t["ref_id"], t["target_id"], t["captions"]):
        req = vocab.extract(" and ".join(caps))
        for group, s in requested_status(attrs[tgt], req, vocab, ref_attrs=attrs[ref]).items():
            total[group] += 1
            told[(group, s)] += 1
    n = sum(total.values())
    known = sum(k for (_, s), k in told.items() if s is not None)
    true = sum(k for (_, s), k in told.items() if s is True)
    print(
        f"requested_status on true targets ({work}, {len(t['target_id'])} triplets, {n} requested groups): "
        f"known {known / n:.1%}, True among known {true / max(known, 1):.1%}"
    )
    for group, k in total.most_common():
        kn = told[(group, True)] + told[(group, False)]
        if kn:
            print(
                f"  {group:13s} requested {k:6d}  known {kn / k:6.1%}  True among known {told[(group, True)] / kn:6.1%}"
            )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=REPO.parent / "shared" / "fashion-iq")
    ap.add_argument("--split", default="train")
    ap.add_argument("--vocabulary", type=Path, default=None)
    ap.add_argument("--sample", type=int, default=100)
    ap.add_argument(
        "--seed",
        type=int,
        default=1,
        help="sample seed (1: the held-out sample in docs/attribute-sample.md; 0: the development sample)",
    )
    ap.add_argument("--markdown", action="store_true", help="print the sample as Markdown table rows")
    ap.add_argument("--proxy", type=Path, default=None, help="workspace with FashionIQ tags (fiq-proxy)")
    args = ap.parse_args(argv)
    vocab = load_vocabulary(args.vocabulary)
    rows = captions(args.root, args.split)
    found = [vocab.extract(c) for _, _, c in rows]
    per_cat = collections.defaultdict(lambda: [0, 0])
    per_group = collections.Counter()
    n_attrs = 0
    for (_, cat, _), req in zip(rows, found):
        per_cat[cat][0] += bool(req)
        per_cat[cat][1] += 1
        per_group.update(req.groups)
        n_attrs += len(req.as_strings())
    hit = sum(h for h, _ in per_cat.values())
    print(f"vocabulary: {vocab.source}")
    print(f"captions: {len(rows)} ({args.root}, split {args.split})")
    for cat in sorted(per_cat):
        h, t = per_cat[cat]
        print(f"  coverage {cat:7s} {h / t:6.1%}  ({h}/{t})")
    print(
        f"  coverage overall {hit / len(rows):6.1%}  ({hit}/{len(rows)}); "
        f"{n_attrs / len(rows):.2f} attributes per caption"
    )
    print("captions naming each group:")
    for g, k in per_group.most_common():
        print(f"  {g:13s} {k / len(rows):6.1%}")
    if args.proxy:
        proxy_check(args.proxy, args.split, vocab)
    picked = sorted(random.Random(args.seed).sample(range(len(rows)), min(args.sample, len(rows))))
    print(f"\nsample: {len(picked)} captions (seed {args.seed})")
    for j, i in enumerate(picked, 1):
        qid, _, cap = rows[i]
        got = " ".join(found[i].as_strings()) or "(none)"
        if args.markdown:
            print(f"| {j} | {qid} | {cap.replace('|', '/')} | {got} | |")
        else:
            print(f"{j:3d} {qid}  {cap!r}\n      {got}")


if __name__ == "__main__":
    from cir_mine.data.memory import prefer_fast_pool

    prefer_fast_pool()  # Arrow's memory pool, as the command line sets it
    main()
