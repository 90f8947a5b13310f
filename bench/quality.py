"""Training quality grid on a workspace (default ../shared/fiq-proxy): mean ± sd over seeds.

    python bench/quality.py --work ../shared/fiq-proxy --out bench/out/quality --seeds 0,1,2

Mines one negatives table per strategy (k negatives per query, zero-shot queries, seed 0; cached
in OUT/negs.{strategy}.parquet), then trains every variant below for every seed with the Python
API that `cir-train` calls (cir_mine.train.loop.train; refresh through cir_mine.miner.remine.Remine) and
evaluates on the held-out dev queries (--dev-fraction 0.1, --dev-seed 0: the same dev set for
every seed and variant). Writes OUT/results.jsonl (one line per run) and OUT/quality.md (the table).
Each run's directory OUT/runs/{variant}.s{seed} is a normal cir-train run (metrics.json, curves.png).
--dev-fraction changes the held-out share for every row; --positives FILE (cir-mine positives) adds
the "+pos" rows (generated triplets as extra training queries); quality.md lists each row's paired
per-seed difference to in-batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cir_mine.data.workspace import Workspace  # noqa: E402
from cir_mine.train.loop import TrainConfig, train  # noqa: E402

# The model/optimizer every variant shares (tuned for in-batch on fiq-proxy's dev split).
BASE = dict(
    epochs=10, batch_size=128, width=0.5, dropout=0.5, lr=1e-3, temperature=0.05, category_batches=True, threads=1
)
STRATEGIES = ("random", "semihard", "midzone", "hardest", "category", "attribute-mismatch")
# Mining config of every table: k negatives per query from a flat search of depth `candidates`
# (the default depth 128 leaves most fiq-proxy queries without ranked negatives: their zero-shot
# targets rank below 128, so every candidate is above the target and the positive-aware cap drops it).
MINE = dict(k=8, candidates=1024, seed=0, device="cpu")
# random and category do not depend on the query embedding: a refresh would re-draw the same rows.
REFRESHABLE = ("semihard", "midzone", "hardest", "attribute-mismatch")


def variants(positives=None) -> dict:
    """name -> (mix or None, TrainConfig overrides, MineConfig overrides).

    positives: generated triplets (cir-mine positives) for the "+pos" rows (absent without it).
    """
    v = {"zero-shot": (None, dict(zero_shot=True), {}), "in-batch": (None, {}, {})}
    v["online-hard"] = (None, dict(online_hard=4), {})
    v["static-bank"] = (None, dict(static_bank=2), {})
    for s in STRATEGIES:
        v[s] = (s, {}, {})
    for s in REFRESHABLE:
        v[f"{s}+refresh"] = (s, dict(refresh_every=5), {})
    nocap = dict(rho=None)
    v["hardest-nocap"] = ("hardest", {}, nocap)
    v["hardest-nocap+refresh"] = ("hardest", dict(refresh_every=5), nocap)
    v["midzone±0.1-nocap"] = ("midzone", {}, dict(rho=None, delta_lo=-0.1, delta_hi=0.1))
    v["midzone±0.1-nocap+refresh"] = ("midzone", dict(refresh_every=5), dict(rho=None, delta_lo=-0.1, delta_hi=0.1))
    # Follow-up (2026-11-25): mixes, curricula, down-weighted mined logits, longer training, deeper search
    r5 = dict(refresh_every=5)
    v["midzone+hardest+refresh"] = ("midzone:0.5,hardest:0.5", r5, {})
    v["curriculum+refresh3"] = ("random", dict(refresh_every=3, schedule="0:random;3:midzone;6:hardest"), {})
    v["hardest+refresh+negw0.3"] = ("hardest", dict(r5, neg_weight=0.3), {})
    v["midzone+refresh+negw0.3"] = ("midzone", dict(r5, neg_weight=0.3), {})
    v["in-batch-e20"] = (None, dict(epochs=20), {})
    v["hardest+refresh-e20"] = ("hardest", dict(epochs=20, refresh_every=5), {})
    v["hardest-deep+refresh"] = ("hardest", r5, dict(max_candidates=8192))
    v["midzone-deep+refresh"] = ("midzone", r5, dict(max_candidates=8192))
    v["hardest+refresh-late"] = ("hardest", dict(r5, share_warmup=5), {})
    if positives:  # generated triplets as extra training queries
        pos = dict(extra_triplets=[str(positives)])
        v["in-batch+pos"] = (None, pos, {})
        v["in-batch+pos-w0.3"] = (None, dict(pos, extra_weight=0.3), {})
        v["hardest+refresh+pos"] = ("hardest", dict(pos, **r5), {})
        v["midzone+refresh+pos"] = ("midzone", dict(pos, **r5), {})
    return v


def mine_table(work: Path, out: Path, mix: str, mine: dict) -> Path:
    from cir_mine.miner.core.mine import MineConfig, mine_to_file

    tag = mix.replace(":", "").replace(",", "+") + "".join(f".{k}={v}" for k, v in sorted(mine.items()))
    path = out / f"negs.{tag}.parquet"
    if not path.exists():
        t0 = time.perf_counter()
        mine_to_file(Workspace(work), "train", MineConfig.of(mix=mix, **{**MINE, **mine}), path)
        print(f"mined {path} in {time.perf_counter() - t0:.1f}s", flush=True)
    return path


def run_one(work: Path, out: Path, name: str, strategy, overrides: dict, mine: dict, seed: int) -> dict:
    run = out / "runs" / f"{name}.s{seed}"
    negs = mine_table(work, out, strategy, mine) if strategy else None
    if (run / "metrics.json").exists():
        return json.loads((run / "metrics.json").read_text())
    cfg = TrainConfig(
        work=str(work), out=str(run), negatives=str(negs) if negs else None, seed=seed, **{**BASE, **overrides}
    )
    return train(cfg, resume=(run / "ckpt.pt").exists())  # refresh_every re-mines through the table's Remine


def _overrides(text: str, defaults) -> dict:
    """'a=1&b=x' -> {a: 1, b: 'x'} typed like the field of ``defaults`` (MineConfig when None)."""
    from cir_mine.miner.core.mine import MineConfig

    defaults = defaults if defaults is not None else MineConfig()
    known = defaults.options() if isinstance(defaults, MineConfig) else vars(defaults)
    out = {}
    for kv in filter(None, text.split("&")):
        key, _, val = kv.partition("=")
        default = known[key]
        if val.lower() == "none":
            out[key] = None
        elif isinstance(default, list):
            out[key] = val.split(",")
        elif isinstance(default, tuple):
            out[key] = tuple(float(x) for x in val.split(","))
        elif isinstance(default, bool):
            out[key] = val.lower() in ("1", "true", "yes")
        else:
            out[key] = val if default is None else type(default)(val)
    return out


def mean_sd(xs: list) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "fiq-proxy")
    ap.add_argument("--out", type=Path, default=Path("bench/out/quality"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    ap.add_argument(
        "--positives", type=Path, default=None, help="generated triplets (cir-mine positives) for the +pos rows"
    )
    ap.add_argument("--baseline", default="in-batch", help="the row the paired per-seed differences are taken against")
    ap.add_argument("--dev-fraction", type=float, default=0.1, help="held-out share of queries (every row)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=MIX|KEY=VALUE&...[|KEY=VALUE&...]",
        help="an extra variant: a mix (one strategy or 'random:0.5,midzone:0.5'), TrainConfig "
        "overrides and MineConfig overrides, e.g. 'mid-both=midzone|loss=both&neg_per_query=8|rho=none'",
    )
    args = ap.parse_args(argv)
    grid = variants(args.positives)
    BASE["dev_fraction"] = args.dev_fraction
    for spec in args.set:
        name, _, rest = spec.partition("=")
        strat, _, rest = rest.partition("|")
        kvs, _, mkvs = rest.partition("|")
        grid[name] = (strat or None, _overrides(kvs, TrainConfig()), _overrides(mkvs, None))
    names = args.only.split(",") if args.only else list(grid)
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        strategy, ov, mine = grid[name]
        r10, r50, secs = [], [], []
        for seed in seeds if name != "zero-shot" else seeds[:1]:
            t0 = time.perf_counter()
            m = run_one(args.work, args.out, name, strategy, ov, mine, seed)
            secs.append(time.perf_counter() - t0)
            r10.append(m["R@10"]), r50.append(m["R@50"])
            with open(args.out / "results.jsonl", "a") as fh:
                fh.write(
                    json.dumps(
                        {
                            "variant": name,
                            "seed": seed,
                            "R@10": m["R@10"],
                            "R@50": m["R@50"],
                            "per_category": m.get("per_category"),
                            "overrides": ov,
                            "strategy": strategy,
                            "mine": {**MINE, **mine} if strategy else None,
                        }
                    )
                    + "\n"
                )
        rows.append((name, r10, r50))
        print(
            f"{name:28s} R@10 {mean_sd(r10):>14s}   R@50 {mean_sd(r50):>14s}   ({statistics.mean(secs):.0f}s/run)",
            flush=True,
        )
    base = next((r for r in rows if r[0] == args.baseline), None)
    lines = [
        f"| variant | R@10 (avg) | R@50 (avg) | Δ R@10 vs {args.baseline} | paired Δ R@10 per seed |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r10, r50 in rows:
        d = f"{statistics.mean(r10) - statistics.mean(base[1]):+.2f}" if base else ""
        paired = " ".join(f"{a - b:+.2f}" for a, b in zip(r10, base[1])) if base and len(r10) == len(base[1]) else ""
        lines.append(f"| {name} | {mean_sd(r10)} | {mean_sd(r50)} | {d} | {paired} |")
    (args.out / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    from cir_mine.data.memory import prefer_fast_pool

    prefer_fast_pool()  # Arrow's memory pool, as the command line sets it
    main()
