"""What a trained run gets wrong on a synthetic world: the attribute groups of its top-1 mistakes.

    python bench/synth_errors.py --work bench/out/synth-n3 --dev-fraction 0.2 RUN [RUN ...]

For each held-out dev query (the split cir-train used: --dev-fraction, --dev-seed 0) the run's
query embedding ranks the query's category; the top-1 image is a mistake when its attributes
differ from the target's. Prints, per run, the share of dev queries whose top-1 is right (the
target or an exact-attribute twin), and the share whose top-1 differs from the target in exactly
one group, per group ("near misses"), and in two or more groups.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cir_mine.data.workspace import Workspace  # noqa: E402
from cir_mine.train.checkpoint import load_query_encoder  # noqa: E402
from cir_mine.train.data import dev_split  # noqa: E402


def top1_errors(work: Path, run: Path, dev_fraction: float, dev_seed: int = 0) -> dict:
    g, t = Workspace(work).require().load("train")
    cats = np.asarray(t.categories)
    gcat = np.asarray(g.categories)
    ref = g.rows(t.ref_ids.tolist(), t.categories.tolist(), what="reference")
    tgt = g.rows(t.target_ids.tolist(), t.categories.tolist(), what="target")
    _, dev = dev_split(len(ref), dev_fraction, dev_seed)
    q = load_query_encoder(run / "ckpt.pt")(g.embeddings[ref[dev]], t.text_embeddings[dev])
    attrs = [dict(a.split(":", 1) for a in tags) for tags in g.attributes]
    out = Counter()
    for c in np.unique(cats[dev]):
        rows = np.flatnonzero(gcat == c)
        sel = np.flatnonzero(cats[dev] == c)
        top = rows[np.argmax(q[sel] @ g.embeddings[rows].T, axis=1)]
        for i, r in zip(sel, top):
            a, b = attrs[r], attrs[tgt[dev[i]]]
            diff = [k for k in b if a.get(k) != b[k]]
            out["right" if not diff else diff[0] if len(diff) == 1 else "2+ groups"] += 1
    n = sum(out.values())
    return {k: round(100 * v / n, 1) for k, v in out.most_common()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--dev-fraction", type=float, default=0.1)
    ap.add_argument("runs", type=Path, nargs="+")
    a = ap.parse_args(argv)
    for run in a.runs:
        print(run, top1_errors(a.work, run, a.dev_fraction))


if __name__ == "__main__":
    from cir_mine.data.memory import prefer_fast_pool

    prefer_fast_pool()  # Arrow's memory pool, as the command line sets it
    main()
