"""The trainer: data, model and optimizer of one run, and the run's epochs as named steps.

:class:`Trainer` plans each epoch (seeds, batches, sampled negatives), assembles batches, steps
the optimizer, evaluates, re-mines through the refresh's miner and checkpoints; randomness is keyed
by (seed, epoch), so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch

from cir_mine.data.crash import crash_point
from cir_mine.data.errors import DataError, UsageError
from cir_mine.data.io import write_json_atomic
from cir_mine.data.workspace import Workspace
from cir_mine.miner.core.curriculum import Curriculum
from cir_mine.train import checkpoint as ck
from cir_mine.train.config import TrainConfig, resolve_heads
from cir_mine.train.history import epoch_record, plot_curves, write_history
from cir_mine.train.data import (
    NegativeBank,
    check_extra_origin,
    concat_queries,
    dev_split,
    extra_queries,
    group_negatives,
    image_keys,
    resolve_queries,
    sample_negatives,
    subset_queries,
)
from cir_mine.train.loss import attribute_margin, bank_loss, positive_mask
from cir_mine.train.metrics import evaluate
from cir_mine.train.model import (
    ModelConfig,
    attribute_head_codes,
    build_model,
    encode_queries,
)
from cir_mine.train.objective import Batch, Objective

if TYPE_CHECKING:
    from cir_mine.miner.remine import Remine

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """What a checkpoint restores."""

    # fmt: off
    epoch: int = 0                     # epochs done
    round: int = 0                     # refresh rounds done
    negatives: Optional[str] = None    # negatives table in use
    history: list = field(default_factory=list)
    # fmt: on


@dataclass
class EpochPlan:
    """What one epoch draws before its first step."""

    # fmt: off
    epoch: int                         # 0-based epoch
    rng: np.random.Generator           # the epoch's numpy stream (bank samples draw from it)
    batches: list                      # int64 query-index arrays, one per step
    negatives: Optional[np.ndarray]    # int64[n_queries, neg_per_query] sampled gallery rows (-1 empty)
    bank_stage: bool                   # the static-bank stage (epoch >= cfg.epochs)
    stage_start: int                   # first epoch of the stage
    stage_len: int                     # epochs in the stage
    # fmt: on

    def progress(self, step: int) -> float:
        """Share of the stage done before ``step`` of this epoch (the learning-rate schedule's clock)."""
        return (self.epoch - self.stage_start + step / len(self.batches)) / max(self.stage_len, 1)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, 1]).generate_state(1)[0])


class Trainer:
    """Holds the data, the model and the optimizer of one run; ``run()`` does the epochs.

    Named steps: :meth:`epoch_plan` (seeds, batches, sampled negatives), :meth:`assemble` (a
    :class:`Batch` of tensors), :meth:`forward`, ``loss`` (an :class:`Objective` chosen once from the
    config; :meth:`static_bank_loss` in the static-bank stage), :meth:`step`, :meth:`evaluate`,
    :meth:`refresh` (re-mine) and :meth:`save` / :meth:`restore` (checkpoint).
    """

    def __init__(
        self, cfg: TrainConfig, remine: Optional["Remine"] = None, on_epoch: Optional[Callable[[dict], None]] = None
    ):
        self.cfg, self.remine, self.on_epoch = cfg, remine, on_epoch
        self.run_dir = Path(cfg.out)
        ws = Workspace(cfg.work).require()
        self.ws = ws
        self.gallery, triplets = ws.load(cfg.split)
        self.gallery_keys, self.key_of = image_keys(self.gallery)
        self.all_queries = resolve_queries(triplets, self.gallery, self.gallery_keys, self.key_of)
        if cfg.eval_work:
            ew = Workspace(cfg.eval_work).require()
            self.eval_gallery, self.eval_triplets = ew.load(cfg.eval_split)
            if self.eval_gallery.dim != self.gallery.dim:
                raise DataError(
                    f"{ew.gallery_path(cfg.eval_split)}: the evaluation workspace has d="
                    f"{self.eval_gallery.dim} but {cfg.work} has d={self.gallery.dim}. Evaluate on a "
                    f"workspace embedded with the same encoder."
                )
            train_idx = np.arange(len(triplets))
        else:
            train_idx, dev_idx = dev_split(len(triplets), cfg.dev_fraction, cfg.dev_seed)
            if dev_idx.size == 0:
                raise UsageError(
                    "dev_fraction gives no evaluation queries; raise it or pass eval_work.",
                    params=("dev_fraction", "eval_work"),
                )
            self.eval_gallery, self.eval_triplets = self.gallery, triplets.subset(dev_idx)
        self.train_idx = train_idx
        self.queries = subset_queries(self.all_queries, train_idx)
        if cfg.extra_triplets:  # generated queries join training only (never the dev split)
            check_extra_origin(cfg.extra_triplets, ws)
            self.queries = concat_queries(
                self.queries,
                extra_queries(
                    cfg.extra_triplets,
                    self.gallery,
                    self.gallery_keys,
                    self.key_of,
                    self.all_queries.query_ids.tolist(),
                    cfg.extra_weight,
                ),
            )
        self.curriculum = Curriculum.parse(cfg.schedule) if cfg.schedule else None
        self.neg_meta: dict = {}
        heads = {"attr_heads": resolve_heads(cfg.heads(), self.gallery.attributes)} if cfg.attr_heads else {}
        mcfg = ModelConfig(
            kind="sum" if cfg.zero_shot or cfg.epochs == 0 else cfg.model,
            dim=self.gallery.dim,
            width=cfg.width,
            dropout=cfg.dropout,
            **heads,
        )
        self.model_config = mcfg
        torch.manual_seed(cfg.seed)
        self.model = build_model(mcfg)
        # dqe: per gallery row and attribute head, an id of its values (who differs from the target where)
        self.head_codes = (
            torch.from_numpy(attribute_head_codes(self.gallery.attributes, mcfg.attr_heads))
            if mcfg.kind == "dqe"
            else None
        )
        params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if params else None
        self.gallery_t = torch.from_numpy(np.require(self.gallery.embeddings, requirements="W"))
        self.keys_t = torch.from_numpy(self.gallery_keys)
        self.state = RunState(negatives=cfg.negatives)
        self.bank: Optional[NegativeBank] = None
        self.loss = Objective.of(cfg)  # chosen once: the terms cfg.loss names

    # -------------------------------------------------------------------------------- negatives
    def load_bank(self, path: Optional[str]) -> None:
        from cir_mine.miner.core.tables import read_negatives

        if not path:
            self.bank = None
            return
        nt = read_negatives(path, self.ws)
        self.ws.check_unchanged(self.cfg.split, self.gallery.data_hash)  # the table's split is the one loaded
        self.neg_meta = nt.meta
        known = set(self.all_queries.query_ids.tolist())
        table_ids = set(nt.table.column("query_id").to_pylist())
        foreign = sorted(table_ids - known)
        if foreign:
            raise DataError(
                f"{path}: {len(foreign)} of its {len(table_ids)} query ids are not queries of "
                f"{self.ws.triplets_path(self.cfg.split)} (first: {foreign[0]}). Mine the table from "
                f"this split: cir-mine negatives `work` {self.cfg.work} `split` {self.cfg.split}.",
                params=("work", "split"),
            )
        self.bank = group_negatives(nt.table, self.queries, self.gallery)
        table_schedule = nt.config.get("schedule")
        if self.curriculum is None and table_schedule:
            self.curriculum = Curriculum.parse(table_schedule)  # the schedule the table was mined for
        if self.curriculum is not None:
            missing = self.curriculum.strategies() - set(self.bank.strategies)
            if missing and not self.cfg.refresh_every:
                log.warning(
                    "schedule names %s but %s has no rows of them; those epochs get fewer negatives",
                    sorted(missing),
                    path,
                )
        log.info(
            "negatives %s: %d slots per query, strategies %s, coverage %.2f",
            path,
            self.bank.k,
            self.bank.strategies,
            self.bank.coverage(),
        )

    def refresh(self, epoch: int) -> dict:
        """Re-embed every query of the split, re-mine, write RUN/negs.round{r}.parquet -> stats."""
        from cir_mine.miner.core.tables import conform, write_negatives

        if self.remine is None:
            raise UsageError("refresh_every needs a miner; none was given to the trainer.", params=("refresh_every",))
        r = self.state.round + 1
        q = encode_queries(self.model, self.gallery.embeddings[self.all_queries.ref_rows], self.all_queries.text_emb)
        res = self.remine(q, mining_round=r, epoch=epoch)
        table, meta = res.table, res.meta
        path = self.run_dir / f"negs.round{r}.parquet"
        write_negatives(table, path, meta)
        prev = self.bank
        self.state.round, self.state.negatives = r, str(path)
        # the table just written, as written (validated by write_negatives), without reading it back
        self.bank = group_negatives(conform(table, path), self.queries, self.gallery)
        delta = table.column("delta").to_numpy(zero_copy_only=False) if table.num_rows else np.zeros(0)
        qs = (0.1, 0.25, 0.5, 0.75, 0.9)
        stats = {
            "round": r,
            "path": str(path),
            "rows": int(table.num_rows),
            "delta_quantiles": {str(p): float(np.quantile(delta, p)) for p in qs} if delta.size else {},
            "overlap_with_previous": (
                len(self.bank.pairs & prev.pairs) / max(1, len(self.bank.pairs)) if prev is not None else None
            ),
        }
        if meta.get("prepared"):  # e.g. error-targeted: the model's top-1 errors and the allocation
            stats["prepared"] = meta["prepared"]
        log.info(
            "refresh round %d: %d rows, delta quantiles %s, overlap %.3f",
            r,
            stats["rows"],
            stats["delta_quantiles"],
            stats["overlap_with_previous"] or 0.0,
        )
        return stats

    # -------------------------------------------------------------------------------- epochs
    def epoch_plan(self, epoch: int) -> "EpochPlan":
        """Seeds, batches and the mined negatives of epoch ``epoch`` (0-based): a function of
        (seed, epoch) only, so a resumed run draws what an uninterrupted one does."""
        cfg = self.cfg
        torch.manual_seed(_epoch_seed(cfg.seed, epoch))
        rng = np.random.default_rng(_epoch_seed(cfg.seed, epoch))
        bank_stage = epoch >= cfg.epochs
        negs = None
        if self.bank is not None and not bank_stage:
            mix, share = self._mix_and_share(epoch)
            negs = sample_negatives(self.bank, cfg.neg_per_query, rng, mix, share)
        batches = [b for b in self._batches(rng) if b.size >= 2]
        start, length = (cfg.epochs, cfg.static_bank) if bank_stage else (0, cfg.epochs)
        return EpochPlan(epoch, rng, batches, negs, bank_stage, start, length)

    def _mix_and_share(self, epoch: int) -> tuple[Optional[dict], float]:
        cfg = self.cfg
        mix = self.curriculum.mix_at(epoch) if self.curriculum else None
        share = cfg.neg_share
        if cfg.share_warmup:
            share *= min(1.0, epoch / cfg.share_warmup)
        return mix, share

    def assemble(self, b: np.ndarray, plan: "EpochPlan") -> Batch:
        """Tensors of the queries ``b`` (int64 indices into the training queries): references,
        texts, targets, their keys, mined negatives (or, in the static-bank stage, the bank sample)."""
        q, G, K, cfg = self.queries, self.gallery_t, self.keys_t, self.cfg
        trow = torch.from_numpy(q.target_rows[b])
        batch = Batch(
            ref=G[torch.from_numpy(q.ref_rows[b])],
            txt=torch.from_numpy(q.text_emb[b]),
            target_rows=trow,
            target=G[trow],
            target_keys=torch.from_numpy(q.target_keys[b]),
            pos_keys=torch.from_numpy(q.pos_keys[b]),
            weights=torch.from_numpy(q.weights[b]) if q.weights is not None else None,
        )
        if plan.bank_stage:
            if cfg.bank_k:
                batch.bank_sample = torch.from_numpy(
                    plan.rng.choice(G.shape[0], size=min(cfg.bank_k, G.shape[0]), replace=False)
                )
        elif plan.negatives is not None:
            nr = torch.from_numpy(plan.negatives[b])
            batch.neg = G[nr.clamp(min=0)]
            batch.neg_keys = torch.where(nr >= 0, K[nr.clamp(min=0)], torch.full_like(nr, -1))
            batch.neg_rows = nr
        return batch

    def forward(self, batch: Batch) -> torch.Tensor:
        """Query embeddings float32[B, d] of the batch (dqe: its sub-queries and weights go to ``batch.parts``)."""
        if self.head_codes is None:
            return self.model(batch.ref, batch.txt)
        out, subs, w = self.model.parts(batch.ref, batch.txt)
        batch.parts = (subs, w)
        return out

    def train_loss(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The objective, plus (dqe) the attribute-aware margin term weighted by ``attr_weight``."""
        loss = self.loss(out, batch)
        if batch.parts is not None and self.cfg.attr_weight:
            loss = loss + self.cfg.attr_weight * self._attr_loss(batch)
        return loss

    def static_bank_loss(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The static-bank stage's loss: softmax over the gallery (or the batch's bank sample)."""
        return bank_loss(
            out,
            self.gallery_t,
            batch.target_rows,
            self.keys_t,
            batch.pos_keys,
            self.cfg.temperature,
            batch.bank_sample,
            batch.weights,
        )

    def step(self, loss: torch.Tensor) -> float:
        """One optimizer step on ``loss``; returns its value."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def train_epoch(self, epoch: int) -> float:
        """One epoch (0-based ``epoch``): plan, then per batch assemble, forward, loss, step.
        Returns the mean loss."""
        plan = self.epoch_plan(epoch)
        loss_of = self.static_bank_loss if plan.bank_stage else self.train_loss
        self.model.train()
        total = 0.0
        for i, b in enumerate(plan.batches):
            self._set_lr(plan.progress(i))
            batch = self.assemble(b, plan)
            loss = loss_of(self.forward(batch), batch)
            if not torch.isfinite(loss.detach()):
                raise DataError(
                    f"{self.run_dir}: training diverged at epoch {epoch + 1}, step {i + 1} (loss "
                    f"{float(loss.detach())}). Lower lr ({self.cfg.lr:g}) or raise temperature "
                    f"({self.cfg.temperature:g}); the run failed and reports no metrics.",
                    params=("lr", "temperature"),
                )
            total += self.step(loss)
        return total / max(len(plan.batches), 1)

    def _batches(self, rng: np.random.Generator) -> list:
        """One epoch's batches (int64 query indices): a shuffled split, or (category_batches)
        batches within one category, in shuffled order."""
        perm = rng.permutation(len(self.queries))
        bs = self.cfg.batch_size
        groups = [perm]
        if self.cfg.category_batches:
            cats = self.queries.categories[perm]
            groups = [perm[cats == c] for c in sorted(set(cats.tolist()))]
        batches = [g[s : s + bs] for g in groups for s in range(0, len(g), bs)]
        return batches if not self.cfg.category_batches else [batches[i] for i in rng.permutation(len(batches))]

    def _set_lr(self, progress: float) -> None:
        """Learning rate at ``progress`` in [0, 1) of the current stage (a function of the step only)."""
        lr = self.cfg.lr
        if self.cfg.lr_schedule == "cosine":
            lr *= 0.5 * (1.0 + np.cos(np.pi * min(max(progress, 0.0), 1.0)))
        for group in self.opt.param_groups:
            group["lr"] = lr

    def _attr_loss(self, b: Batch) -> torch.Tensor:
        """dqe: attribute-aware margin loss of the sub-queries over the batch's other targets and
        the mined negatives (positives and padding never count)."""
        subs, w = b.parts
        B = b.target_rows.shape[0]
        cand = b.target_rows.unsqueeze(0).expand(B, B)
        valid = ~positive_mask(b.pos_keys, b.target_keys)
        if b.neg_rows is not None:
            nr = b.neg_rows
            cand = torch.cat([cand, nr.clamp(min=0)], 1)
            valid = torch.cat([valid, (nr >= 0) & ~positive_mask(b.pos_keys, b.neg_keys)], 1)
        codes = self.head_codes
        differs = (codes[cand] != codes[b.target_rows].unsqueeze(1)) & valid.unsqueeze(-1)
        return attribute_margin(subs, w, b.target, self.gallery_t[cand], differs, self.cfg.margin)

    def evaluate(self) -> dict:
        t, g = self.eval_triplets, self.eval_gallery
        ref = g.embeddings[g.rows(t.ref_ids.tolist(), t.categories.tolist(), what="reference")]
        q = encode_queries(self.model, ref, t.text_embeddings)
        if not np.isfinite(q).all():
            raise DataError(
                f"{self.run_dir}: the model's query embeddings are not finite after epoch "
                f"{self.state.epoch}. Lower lr ({self.cfg.lr:g}) or raise temperature "
                f"({self.cfg.temperature:g}); the run failed and reports no metrics.",
                params=("lr", "temperature"),
            )
        return evaluate(q, t, g, exclude_reference=self.cfg.exclude_reference)

    # -------------------------------------------------------------------------------- run
    def save(self) -> None:
        ck.save_checkpoint(
            self.run_dir,
            {
                "epoch": self.state.epoch,
                "round": self.state.round,
                "negatives": self.state.negatives,
                "history": self.state.history,
                "model_config": self.model_config.to_dict(),
                "train_config": self.cfg.to_dict(),
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict() if self.opt else None,
                "workspace_hash": self.ws.manifest_hash(),
            },
        )

    def restore(self, state: dict) -> None:
        ckpt, work = self.run_dir / ck.NAME, self.cfg.work
        if state["model_config"].get("dim") != self.model_config.dim:
            raise DataError(
                f"{ckpt}: the model takes d={state['model_config'].get('dim')} but {work} now has "
                f"d={self.model_config.dim}. Resume on the workspace the run was trained on, or start "
                f"a new run with another out.",
                params=("out",),
            )
        if state.get("workspace_hash") and state["workspace_hash"] != self.ws.manifest_hash():
            raise DataError(
                f"{ckpt}: trained on another workspace (manifest hash {state['workspace_hash']}, {work} "
                f"has {self.ws.manifest_hash()}). Resume on the workspace the run was trained on, or "
                f"start a new run with another out.",
                params=("out",),
            )
        self.model.load_state_dict(state["model"])
        if self.opt is not None and state.get("optimizer"):
            self.opt.load_state_dict(state["optimizer"])
        self.state = RunState(state["epoch"], state["round"], state.get("negatives"), state["history"])

    def run_epoch(self, e: int) -> dict:
        """Train epoch ``e`` (0-based), re-mine when a refresh is due, evaluate -> the epoch's record."""
        cfg = self.cfg
        t0 = time.perf_counter()
        loss = self.train_epoch(e)
        rec = {"epoch": e + 1, "stage": "static_bank" if e >= cfg.epochs else "train", "loss": loss}
        if cfg.refresh_every and e + 1 < cfg.epochs and (e + 1) % cfg.refresh_every == 0:
            rec["refresh"] = self.refresh(e + 1)
        rec["train_s"] = time.perf_counter() - t0
        rec.update(epoch_record(self.evaluate()))
        return rec

    def run(self, resume: bool = False) -> dict:
        cfg = self.cfg
        if resume and (self.run_dir / ck.NAME).exists():
            self.restore(ck.load_checkpoint(self.run_dir))
            log.info("resumed %s at epoch %d", self.run_dir, self.state.epoch)
        self.load_bank(self.state.negatives)
        write_json_atomic(self.run_dir / "config.json", cfg.to_dict())
        total_epochs = 0 if self.model_config.kind == "sum" else cfg.epochs + cfg.static_bank
        while self.state.epoch < total_epochs:
            rec = self.run_epoch(self.state.epoch)
            self.state.history.append(rec)
            self.state.epoch = rec["epoch"]
            write_history(self.run_dir / "metrics.jsonl", self.state.history)
            self.save()
            if self.on_epoch:
                self.on_epoch(rec)
            crash_point("epoch-saved")
        final = self.evaluate()
        if total_epochs == 0:
            self.save()
        final.update(
            {
                "model": self.model_config.kind,
                "epochs": self.state.epoch,
                "rounds": self.state.round,
                "negatives": self.state.negatives,
                "seed": cfg.seed,
                "config": cfg.to_dict(),
                "n_train_queries": len(self.queries),
                "n_extra_queries": len(self.queries) - len(self.train_idx),
                "eval": cfg.eval_work or f"dev {cfg.dev_fraction}",
            }
        )
        write_json_atomic(self.run_dir / "metrics.json", final)
        plot_curves(self.state.history, self.run_dir / "curves.png")
        return final
