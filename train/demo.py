"""The end-to-end demo behind ``cir-mine demo``: synthetic world -> negatives -> training -> table.

A synthetic world (gallery + triplets with ground-truth attributes) is mined with three strategies
(random, midzone, attribute-mismatch); a short training runs on each table and on in-batch
negatives only; every run is evaluated on the same held-out dev queries. Sized to finish in well
under three minutes on two CPU cores.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from data.synthetic import SynthConfig, generate
from data.workspace import Workspace

from .loop import TrainConfig, train

log = logging.getLogger(__name__)

DEMO_STRATEGIES = ("random", "midzone", "attribute-mismatch")


@dataclass
class DemoConfig:
    n_gallery: int = 20000        # synthetic gallery images
    n_triplets: int = 5000        # synthetic queries
    dim: int = 128                # embedding dimension
    seed: int = 0                 # world, mining and training seed
    k: int = 8                    # negatives mined per query
    epochs: int = 4               # training epochs per run
    batch_size: int = 256         # queries per step
    strategies: tuple = DEMO_STRATEGIES  # one table and one run per strategy


@dataclass
class DemoResult:
    work: Path                                   # the synthetic workspace
    tables: dict = field(default_factory=dict)   # strategy -> negatives table path
    runs: dict = field(default_factory=dict)     # run name -> {"dir", "R@10", "R@50", "seconds"}
    seconds: float = 0.0


def run_demo(out: str | Path, cfg: Optional[DemoConfig] = None,
             progress: Optional[Callable[[str], None]] = None) -> DemoResult:
    """Run every stage into ``out`` (work/, negs.{strategy}.parquet, runs/{name}/) -> DemoResult.

    Run directories under ``out/runs`` are replaced (the demo owns ``out``).
    """
    from miner.mine import MineConfig, mine_to_file

    cfg = cfg or DemoConfig()
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    out = Path(out)
    work = out / "work"
    m = generate(SynthConfig(n_gallery=cfg.n_gallery, n_triplets=cfg.n_triplets, dim=cfg.dim, seed=cfg.seed), work)
    res = DemoResult(work)
    say(f"synthetic world -> {work}: {m['counts']} (d={m['dim']})")
    ws = Workspace(work)
    for s in cfg.strategies:
        path = out / f"negs.{s}.parquet"
        t = time.perf_counter()
        r = mine_to_file(ws, "train", MineConfig(strategy=s, k=cfg.k, seed=cfg.seed, device="cpu"), path)
        res.tables[s] = path
        say(f"negatives {s:<18s} -> {path}: {r.table.num_rows} rows ({time.perf_counter() - t:.1f}s)")
    plan = [("zero-shot", None, True), ("in-batch", None, False)]
    plan += [(s, res.tables[s], False) for s in cfg.strategies]
    for name, negs, zero_shot in plan:
        run = out / "runs" / name
        shutil.rmtree(run, ignore_errors=True)
        t = time.perf_counter()
        metrics = train(TrainConfig(work=str(work), out=str(run), negatives=str(negs) if negs else None,
                                    epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed, width=0.5,
                                    dropout=0.2, zero_shot=zero_shot))
        res.runs[name] = {"dir": run, "R@10": metrics["R@10"], "R@50": metrics["R@50"],
                          "seconds": time.perf_counter() - t}
        say(f"train {name:<18s} -> {run}: R@10 {metrics['R@10']:.2f}  R@50 {metrics['R@50']:.2f} "
            f"({res.runs[name]['seconds']:.1f}s)")
    res.seconds = time.perf_counter() - t0
    return res
