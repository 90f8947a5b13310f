"""How good can a query encoder be on a synthetic world? R@10 ceilings from the ground truth.

    python bench/synth_ceiling.py                       # the synthetic default (cir-mine synth)
    python bench/synth_ceiling.py --item-noise 1.0
    python bench/synth_ceiling.py --n-gallery 60000 --n-triplets 15000 --item-noise 1.0 --salience neckline=0.3

Regenerates the world's items (same plan as `cir-mine synth` with the same options; fresh image
noise) and scores three oracle queries with the FashionIQ protocol (per-category gallery):

- ``oracle``: the target's clean embedding (category + attributes, no noise): the best any query
  can do; below 100 only because of the images' own noise.
- ``reference-known``: the clean embedding of the reference's true attributes with the caption's
  changes applied; it misses the target's unmentioned changes (``--unmentioned-change``).
- ``reference-decoded``: like reference-known, but the reference's attributes are decoded from its
  noisy embedding (argmax over each group's directions), as a model must: a practical ceiling.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cir_mine.data.synthetic import GROUPS, SynthConfig, World, keyed_rng, image_embeddings, parse_salience, plan  # noqa: E402
from cir_mine.data.workspace import l2_normalize  # noqa: E402


def clean(world: World, cfg: SynthConfig, cats: np.ndarray, vals: np.ndarray) -> np.ndarray:
    x = cfg.category_weight * world.category_dirs[cats]
    for gi, g in enumerate(GROUPS):
        x = x + cfg.salience[g] * world.attr_dirs[g][vals[:, gi]]
    return l2_normalize(x)


def recall10(q: np.ndarray, emb: np.ndarray, cats: np.ndarray, target_rows: np.ndarray) -> float:
    out = []
    for c in np.unique(cats[target_rows]):
        rows, sel = np.flatnonzero(cats == c), np.flatnonzero(cats[target_rows] == c)
        ts = np.einsum("ij,ij->i", q[sel], emb[target_rows[sel]])
        out.append(float(((q[sel] @ emb[rows].T > ts[:, None]).sum(1) < 10).mean()))
    return 100 * float(np.mean(out))


def ceilings(cfg: SynthConfig) -> dict:
    world, p = World.make(cfg.seed, cfg.dim), plan(cfg)
    emb = image_embeddings(world, cfg, p.cats, p.vals, keyed_rng(cfg.seed, "ceiling"))
    T, R = p.target_rows, p.ref_rows
    decoded = np.stack([(emb[R] @ world.attr_dirs[g].T).argmax(1) for g in GROUPS], axis=1)
    known = np.where(p.changed, p.vals[T], p.vals[R])
    guess = np.where(p.changed, p.vals[T], decoded)
    acc = {g: round(float((decoded[:, i] == p.vals[R, i]).mean()), 3) for i, g in enumerate(GROUPS)}
    return {
        "oracle": recall10(clean(world, cfg, p.cats[T], p.vals[T]), emb, p.cats, T),
        "reference-known": recall10(clean(world, cfg, p.cats[T], known), emb, p.cats, T),
        "reference-decoded": recall10(clean(world, cfg, p.cats[T], guess), emb, p.cats, T),
        "decode accuracy": acc,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-gallery", type=int, default=20000)
    ap.add_argument("--n-triplets", type=int, default=5000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--item-noise", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--salience", default=None, help="per-group weights as in cir-mine synth, e.g. neckline=0.3")
    a = ap.parse_args(argv)
    cfg = SynthConfig(
        n_gallery=a.n_gallery,
        n_triplets=a.n_triplets,
        dim=a.dim,
        item_noise=a.item_noise,
        seed=a.seed,
        salience=parse_salience(a.salience),
    ).validate()
    for name, v in ceilings(cfg).items():
        print(f"{name:18s} {v if isinstance(v, dict) else round(v, 1)}")


if __name__ == "__main__":
    from cir_mine.data.memory import prefer_fast_pool

    prefer_fast_pool()  # Arrow's memory pool, as the command line sets it
    main()
