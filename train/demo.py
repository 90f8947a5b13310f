"""The end-to-end demo behind ``cir-mine demo``: synthetic world -> negatives -> training -> table.

A synthetic world (gallery + triplets with ground-truth attributes) is mined with a few strategies;
a short training runs on each table and on in-batch negatives only; every run is evaluated on the
same held-out dev queries. A run named ``STRATEGY+refresh`` re-mines its table once, halfway, with
the model being trained (cir-train --refresh-every); ``dqe+STRATEGY+refresh`` does so with DQE-CIR's
attribute sub-queries as the model (cir-train --model dqe --attr-heads groups). Sized to finish in
under three minutes on two CPU cores. The default world is the fine-grained one (60,000 images, a subtle neckline group,
category batches), where mined negatives pay; ``world="coarse"`` is the synth default (20,000
images), where in-batch negatives already hold the near misses and mining adds little.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from cir_mine.data.synthetic import SynthConfig, generate
from cir_mine.data.workspace import Workspace

from cir_mine.train.config import TrainConfig

log = logging.getLogger(__name__)

DEMO_STRATEGIES = ("random", "midzone", "attribute-mismatch")
# Worlds the demo can run: synthetic-world settings, runs (a strategy, "+refresh" for one re-mine
# halfway), training settings. "fine" is the fine-grained world of docs/benchmarks.md ("Where mined
# negatives pay"): a subtle neckline group, clean images and 20,000 images per category, where
# guarded mined negatives beat in-batch training; "coarse" is the synth default.
WORLDS = {
    "fine": dict(
        synth=dict(n_gallery=60000, n_triplets=15000, item_noise=1.0, salience={"neckline": 0.3}),
        strategies=("random", "midzone", "attribute-mismatch", "hardest+refresh", "dqe+hardest+refresh"),
        train=dict(batch_size=128, category_batches=True),
    ),
    "coarse": dict(synth={}, strategies=DEMO_STRATEGIES, train=dict(batch_size=256)),
}
REFRESH = "+refresh"
# A run named "dqe+STRATEGY..." trains DQE-CIR's attribute sub-queries instead of the combiner: one
# head per attribute group (the measured best, docs/benchmarks.md), the default margin-loss weight.
DQE = "dqe+"
DQE_OPTIONS = dict(model="dqe", attr_heads="groups")


def table_of(run: str) -> str:
    """The negatives table a demo run trains on: its name without the model prefix and "+refresh"."""
    return run.removeprefix(DQE).removesuffix(REFRESH)


@dataclass
class DemoConfig:
    # fmt: off
    n_gallery: Optional[int] = None   # synthetic gallery images (None: the world's, see WORLDS)
    n_triplets: Optional[int] = None  # synthetic queries (None: the world's, see WORLDS)
    dim: int = 128                # embedding dimension
    seed: int = 0                 # world, mining and training seed
    k: int = 8                    # negatives mined per query
    epochs: int = 4               # training epochs per run
    batch_size: Optional[int] = None   # queries per step (None: the world's)
    strategies: Optional[tuple] = None  # one run per entry, "NAME", "NAME+refresh", "dqe+NAME[+refresh]" (None: the world's)
    world: str = "fine"           # fine (the fine-grained world, where mined negatives pay; adds hardest re-mined
                                  # once halfway, with the combiner and with DQE's attribute sub-queries) or coarse
                                  # (the synth default: random, midzone and attribute-mismatch); see WORLDS
    # fmt: on

    def resolve(self) -> tuple:
        """-> (SynthConfig, strategies, TrainConfig overrides) of this demo."""
        from cir_mine.data.errors import UsageError
        from cir_mine.data.synthetic import DEFAULT_SALIENCE

        if self.world not in WORLDS:
            raise UsageError(f"world {self.world!r}: use one of {', '.join(WORLDS)}.", params=("world",))
        w = WORLDS[self.world]
        synth = dict(w["synth"])
        synth["salience"] = {**DEFAULT_SALIENCE, **synth.get("salience", {})}
        for name in ("n_gallery", "n_triplets"):
            if getattr(self, name) is not None:
                synth[name] = getattr(self, name)
        train = dict(w["train"])
        if self.batch_size is not None:
            train["batch_size"] = self.batch_size
        return (SynthConfig(dim=self.dim, seed=self.seed, **synth), tuple(self.strategies or w["strategies"]), train)


@dataclass
class DemoResult:
    # fmt: off
    work: Path                                   # the synthetic workspace
    tables: dict = field(default_factory=dict)   # strategy -> negatives table path (zero-shot queries)
    runs: dict = field(default_factory=dict)     # run name -> {"dir", "R@10", "R@50", "seconds"}
    seconds: float = 0.0
    # fmt: on


def _check_demo(cfg: DemoConfig, out: str | Path, overwrite: bool) -> None:
    """Every stage's options, and ``out``, checked before the demo writes anything."""
    from cir_mine.data.errors import UsageError
    from cir_mine.data.io import check_output_dir
    from cir_mine.miner.core.mine import MineConfig

    synth, strategies, train_opts = cfg.resolve()
    synth.validate()
    for s in dict.fromkeys(table_of(x) for x in strategies):
        MineConfig(strategy=s, k=cfg.k, seed=cfg.seed, device="cpu").validate()
    TrainConfig(work="-", out="-", epochs=cfg.epochs, seed=cfg.seed, width=0.5, dropout=0.2, **train_opts).validate()
    if any(x.startswith(DQE) for x in strategies):
        TrainConfig(work="-", out="-", negatives="-", **DQE_OPTIONS).validate()
    check_output_dir(out)
    if Path(out).is_dir() and any(Path(out).iterdir()) and not overwrite:
        raise UsageError(
            f"out {out}: already holds files. Pass overwrite to replace an earlier demo's outputs, "
            f"or choose another out.",
            params=("out", "overwrite"),
        )


def run_demo(
    out: str | Path,
    cfg: Optional[DemoConfig] = None,
    on_step: Optional[Callable[[str], None]] = None,
    overwrite: bool = True,
) -> DemoResult:
    """Run every stage into ``out`` (work/, negs.{strategy}.parquet, runs/{name}/) -> DemoResult.

    Every option is validated before anything is written. The outputs of an earlier demo in ``out``
    are replaced only with ``overwrite`` (the demo owns ``out``).
    """
    from cir_mine.miner.core.mine import MineConfig, mine_to_file
    from cir_mine.train.loop import train

    cfg = cfg or DemoConfig()
    synth, strategies, train_opts = cfg.resolve()
    _check_demo(cfg, out, overwrite)
    say = on_step or (lambda msg: None)
    t0 = time.perf_counter()
    out = Path(out)
    work = out / "work"
    m = generate(synth, work)
    res = DemoResult(work)
    say(f"synthetic world -> {work}: {m['counts']} (d={m['dim']})")
    ws = Workspace(work)
    for s in dict.fromkeys(table_of(x) for x in strategies):
        path = out / f"negs.{s}.parquet"
        t = time.perf_counter()
        r = mine_to_file(ws, "train", MineConfig.of(strategy=s, k=cfg.k, seed=cfg.seed, device="cpu"), path)
        res.tables[s] = path
        say(f"negatives {s:<18s} -> {path}: {r.table.num_rows} rows ({time.perf_counter() - t:.1f}s)")
    plan = [("zero-shot", None, True), ("in-batch", None, False)]
    plan += [(s, res.tables[table_of(s)], False) for s in strategies]
    for name, negs, zero_shot in plan:
        run = out / "runs" / name
        shutil.rmtree(run, ignore_errors=True)
        t = time.perf_counter()
        refresh = max(1, cfg.epochs // 2) if name.endswith(REFRESH) and cfg.epochs > 1 else 0
        model = DQE_OPTIONS if name.startswith(DQE) else {}
        metrics = train(
            TrainConfig(
                work=str(work),
                out=str(run),
                negatives=str(negs) if negs else None,
                epochs=cfg.epochs,
                seed=cfg.seed,
                width=0.5,
                dropout=0.2,
                zero_shot=zero_shot,
                refresh_every=refresh,
                **train_opts,
                **model,
            ),
            overwrite=True,
        )
        res.runs[name] = {
            "dir": run,
            "R@10": metrics["R@10"],
            "R@50": metrics["R@50"],
            "seconds": time.perf_counter() - t,
        }
        say(
            f"train {name:<18s} -> {run}: R@10 {metrics['R@10']:.2f}  R@50 {metrics['R@50']:.2f} "
            f"({res.runs[name]['seconds']:.1f}s)"
        )
    res.seconds = time.perf_counter() - t0
    return res
