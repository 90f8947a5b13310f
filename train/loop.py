"""The training loop: cached features in, RUN directory out (checkpoints, metrics, curves).

``train(cfg, remine=None, on_epoch=None)`` trains a query encoder (cir_mine.train.model) on a workspace's
triplets with in-batch targets plus the mined negatives of a negatives table, evaluates after every
epoch, and writes::

    RUN/ckpt.pt                 checkpoint after every epoch (atomic); --resume continues from it
    RUN/metrics.jsonl           one JSON line per epoch (loss, recalls, refresh stats, seconds)
    RUN/metrics.json            final metrics (protocol keys, see train.metrics) + run info
    RUN/curves.png              loss and R@10 per epoch
    RUN/negs.round{r}.parquet   negatives re-mined at refresh round r (--refresh-every)
    RUN/config.json             the TrainConfig

Randomness is keyed by (seed, epoch), so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch

from cir_mine.data.errors import CirMineError, UsageError
from cir_mine.data.io import check_output_dir, discard, is_workspace, write_job
from cir_mine.data.workspace import Workspace
from cir_mine.train import checkpoint as ck
from cir_mine.train.checkpoint import load_query_encoder
from cir_mine.train.config import TrainConfig, resolve_heads
from cir_mine.train.trainer import Trainer

__all__ = ["RUN_FILES", "TrainConfig", "Trainer", "load_query_encoder", "resolve_heads", "resume_config", "train"]

if TYPE_CHECKING:
    from cir_mine.miner.remine import Remine

log = logging.getLogger(__name__)


RUN_FILES = ("ckpt.pt", "config.json", "metrics.jsonl", "metrics.json", "curves.png")


def train(
    cfg: TrainConfig,
    remine: Optional["Remine"] = None,
    resume: bool = False,
    on_epoch: Optional[Callable[[dict], None]] = None,
    overwrite: bool = False,
) -> dict:
    """Train (or resume) a run; returns the final metrics (also in RUN/metrics.json).

    remine: the refresh's re-mining hook (:class:`cir_mine.miner.remine.Remine`, or a callable with
    its call signature; the caller closes it). None with ``refresh_every``: a Remine over
    ``cfg.negatives``, opened here and closed when the run ends. on_epoch: called with each epoch's
    record (the line of RUN/metrics.jsonl) once its checkpoint is saved.
    A new run never starts in a directory that holds one unless ``overwrite`` (its files are then
    replaced), nor in a workspace or a folder holding one of its inputs. A new run that fails on
    its input or diverges leaves nothing behind (a crash keeps the last checkpoint for ``resume``).
    """
    cfg.validate()
    run_dir = Path(cfg.out)
    inputs = [cfg.negatives, *cfg.extra_triplets]
    check_output_dir(run_dir, [cfg.work, cfg.eval_work])
    if is_workspace(run_dir):
        raise UsageError(
            f"out {run_dir}: is a workspace. Choose another out; a run never writes into a workspace.", params=("out",)
        )
    for p in inputs:
        if p and Path(p).exists() and _resolve_parent(p) == _resolve_parent(run_dir / "x"):
            if Path(p).name in RUN_FILES or Path(p).name.startswith("negs.round"):
                raise UsageError(
                    f"out {run_dir}: holds an input of this run ({p}), which the run would "
                    f"replace. Choose another out.",
                    params=("out",),
                )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ckpt = run_dir / ck.NAME
    undone = []

    def undo(e: BaseException) -> bool:
        """A new run is rolled back (an older run it replaces comes back) on a bad input or a divergence,
        and on any failure or interruption before its first checkpoint; after one, it stays for --resume."""
        undone.append(not resume and (isinstance(e, (CirMineError, OSError)) or not ckpt.exists()))
        return undone[-1]

    def interrupted() -> str:
        if ckpt.exists() and not any(undone):
            return f"{run_dir} keeps its last checkpoint: continue the run with `cir-train resume={run_dir}`"
        return "nothing was changed"

    with contextlib.ExitStack() as stack:
        if remine is None and cfg.refresh_every:
            remine = stack.enter_context(_table_remine(cfg))
        return _run(cfg, remine, resume, on_epoch, overwrite, undo, interrupted)


def _table_remine(cfg: TrainConfig) -> "Remine":
    """The re-mining hook over the run's negatives table (its config, search back-end and engine)."""
    from cir_mine.miner.remine import Remine

    return Remine(Workspace(cfg.work), cfg.split, negatives=cfg.negatives, schedule=cfg.schedule, device="cpu")


def _run(cfg: TrainConfig, remine, resume: bool, on_epoch, overwrite: bool, undo, interrupted) -> dict:
    """The run as one write job (see :func:`train`)."""
    run_dir = Path(cfg.out)
    ckpt = run_dir / ck.NAME
    with write_job(run_dir, "cir-train", rollback_on=undo, interrupted=interrupted, params=("resume",)):
        if not resume and ckpt.exists() and not overwrite:
            raise UsageError(
                f"{run_dir} already holds a run. Pass resume {run_dir} to continue it, "
                f"overwrite to replace it, or choose another out.",
                params=("resume", "overwrite", "out"),
            )
        if not resume:
            for old in [*(run_dir / n for n in RUN_FILES), *run_dir.glob("negs.round*.parquet")]:
                if old.exists():
                    discard(old)
        return Trainer(cfg, remine, on_epoch).run(resume=resume)


def _resolve_parent(p) -> Path:
    return Path(p).resolve().parent


def resume_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig a run was started with (from RUN/ckpt.pt)."""
    state = ck.load_checkpoint(run_dir)
    cfg = TrainConfig.from_dict(state["train_config"])
    cfg.out = str(run_dir)
    return cfg
