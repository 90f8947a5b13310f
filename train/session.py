"""A training run as one call, the one behind ``cir-train``: the config (given, or a run's own to
resume it), the refresh's miner when the run re-mines, and the training loop."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from cir_mine.data.errors import UsageError
from cir_mine.train.loop import TrainConfig, resume_config, train


def run_training(
    cfg: Optional[TrainConfig] = None,
    *,
    resume: Optional[str | Path] = None,
    ray_address: Optional[str] = None,
    overwrite: bool = False,
    on_config: Optional[Callable[[TrainConfig], None]] = None,
    on_epoch: Optional[Callable[[dict], None]] = None,
    on_remine: Optional[Callable[[int, int, dict], None]] = None,
) -> dict:
    """Train a new run with ``cfg``, or continue the run in ``resume`` with its own config; returns
    the final metrics (also in RUN/metrics.json).

    on_config(cfg): once, with the config the run uses, before any work. on_epoch(record): after
    every epoch. on_remine(round, epoch, meta): after every re-mining round (``refresh_every``),
    which searches the way the negatives table was mined; ``ray_address`` is the Ray cluster it
    joins for a table mined with engine 'ray' (None: a local one)."""
    if resume is not None:
        cfg = resume_config(resume)
    elif cfg is None or not cfg.work or not cfg.out:
        raise UsageError(
            "work and out are required (or resume RUN to continue a run).", params=("work", "out", "resume")
        )
    if on_config is not None:
        on_config(cfg)
    if not cfg.validate().refresh_every:
        return train(cfg, resume=resume is not None, on_epoch=on_epoch, overwrite=overwrite)
    with _remine(cfg, ray_address, on_remine) as remine:
        return train(cfg, remine=remine, resume=resume is not None, on_epoch=on_epoch, overwrite=overwrite)


def _remine(cfg: TrainConfig, ray_address: Optional[str], on_remine):
    """The refresh's re-mining over the table cfg.negatives (:class:`~cir_mine.miner.remine.Remine`, a
    context manager that releases what it opens), reporting every round to ``on_remine``."""
    from cir_mine.data.workspace import Workspace
    from cir_mine.miner.remine import Remine

    class Reporting(Remine):
        def __call__(self, query_emb, mining_round=None, epoch=0, query_ids=None):
            res = super().__call__(query_emb, mining_round, epoch, query_ids)
            if on_remine is not None:
                on_remine(self.mining_round, epoch, res.meta)
            return res

    return Reporting(
        Workspace(cfg.work),
        cfg.split,
        negatives=cfg.negatives,
        schedule=cfg.schedule,
        device="cpu",
        ray_address=ray_address,
    )


def remine_line(round: int, epoch: int, meta: dict) -> str:
    """``re-mine round 1 (epoch 2): midzone:0.6,random:0.4, 3,120 rows, 0.4s``"""
    mix = ",".join(f"{p['strategy']}:{p['share']:g}" for p in meta["parts"])
    return f"re-mine round {round} (epoch {epoch}): {mix}, {meta['n_rows']:,} rows, {meta['timing']['total_s']:.1f}s"
