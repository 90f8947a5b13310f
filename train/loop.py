"""The training loop: cached features in, RUN directory out (checkpoints, metrics, curves).

``train(cfg, remine=None, progress=None)`` trains a query encoder (cir_mine.train.model) on a workspace's
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

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from cir_mine.data.errors import CirMineError, DataError, UsageError
from cir_mine.data.io import check_output_dir, discard, is_workspace, write_job, write_json_atomic
from cir_mine.data.workspace import Workspace

from cir_mine.train import checkpoint as ck
from cir_mine.train.config import GROUP_HEADS, LOSSES, TrainConfig  # noqa: F401  (re-exported)
from cir_mine.train.checkpoint import load_query_encoder  # noqa: F401  (the query-encoding hook, re-exported)
from cir_mine.train.data import (NegativeBank, concat_queries, dev_split, extra_queries, group_negatives,
                                 image_keys, resolve_queries, sample_negatives, subset_queries)
from cir_mine.train.loss import attribute_margin, bank_loss, hardest_in_batch, info_nce, positive_mask, triplet_margin
from cir_mine.train.metrics import evaluate
from cir_mine.train.model import (GROUP_HEAD, ModelConfig, attribute_head_codes, build_model, encode_queries)
from cir_mine.miner.core.curriculum import Curriculum

log = logging.getLogger(__name__)

# remine(query_emb float32[m_split, d], mining_round, epoch) -> (negatives pa.Table, footer meta dict)
Remine = Callable[[np.ndarray, int, int], tuple]


def resolve_heads(heads: tuple, attributes) -> tuple:
    """DQE head names for a gallery: ``("groups",)`` -> one "group:NAME" head per attribute group
    in its tags (sorted); otherwise ``heads``, each "group:NAME" head checked to occur in a tag."""
    found = sorted({a.split(":", 1)[0] for tags in attributes for a in tags if ":" in a})
    if heads == (GROUP_HEADS,):
        if not found:
            raise UsageError("attr_heads groups: the gallery has no attribute tags (group:value) to make heads of.",
                             params=("attr_heads",))
        return tuple(GROUP_HEAD + g for g in found)
    missing = [h for h in heads if h.startswith(GROUP_HEAD) and h[len(GROUP_HEAD):] not in found]
    if missing:
        raise UsageError(f"attribute heads {', '.join(missing)}: no gallery image has a tag of that group "
                         f"(its groups: {', '.join(found) or 'none'}).", params=("attr_heads",))
    return heads


@dataclass
class RunState:
    """What a checkpoint restores."""

    epoch: int = 0                     # epochs done
    round: int = 0                     # refresh rounds done
    negatives: Optional[str] = None    # negatives table in use
    history: list = field(default_factory=list)


@dataclass
class Batch:
    """The tensors of one training step (B queries, K mined negatives, d dims)."""

    ref: torch.Tensor                  # float32[B, d] reference image embeddings
    txt: torch.Tensor                  # float32[B, d] caption embeddings
    target_rows: torch.Tensor          # int64[B] gallery rows of the targets
    target: torch.Tensor               # float32[B, d] target embeddings
    target_keys: torch.Tensor          # int64[B] image keys of the targets
    pos_keys: torch.Tensor             # int64[B, P] target + extra-positive keys (-1 pad)
    weights: Optional[torch.Tensor] = None      # float32[B] per-query loss weight (None: all 1)
    neg: Optional[torch.Tensor] = None          # float32[B, K, d] mined negatives (None: in-batch only)
    neg_keys: Optional[torch.Tensor] = None     # int64[B, K] their keys (-1 = no negative)
    bank_sample: Optional[torch.Tensor] = None  # int64[k] static-bank rows (None: the whole gallery)
    neg_rows: Optional[torch.Tensor] = None     # int64[B, K] gallery rows of the mined negatives (-1 = none)
    parts: Optional[tuple] = None               # dqe: (sub-queries float32[B, S, d], weights float32[B, 1+S])


@dataclass
class EpochPlan:
    """What one epoch draws before its first step."""

    epoch: int                         # 0-based epoch
    rng: np.random.Generator           # the epoch's numpy stream (bank samples draw from it)
    batches: list                      # int64 query-index arrays, one per step
    negatives: Optional[np.ndarray]    # int64[n_queries, neg_per_query] sampled gallery rows (-1 empty)
    bank_stage: bool                   # the static-bank stage (epoch >= cfg.epochs)
    stage_start: int                   # first epoch of the stage
    stage_len: int                     # epochs in the stage

    def progress(self, step: int) -> float:
        """Share of the stage done before ``step`` of this epoch (the learning-rate schedule's clock)."""
        return (self.epoch - self.stage_start + step / len(self.batches)) / max(self.stage_len, 1)


@dataclass(frozen=True)
class Objective:
    """The training loss as a sum of terms, chosen once from the config."""

    infonce: bool                      # InfoNCE over in-batch targets plus mined negatives
    mined_triplet: bool                # triplet hinge on the mined negatives
    online_hard: int                   # triplet hinge on the k hardest in-batch non-targets (0: off)
    temperature: float                 # InfoNCE softmax temperature
    neg_weight: float                  # InfoNCE weight of each mined negative
    margin: float                      # triplet margin (cosine distance)
    triplet_weight: float              # weight of the triplet terms

    @classmethod
    def of(cls, cfg: "TrainConfig") -> "Objective":
        return cls(infonce=cfg.loss in ("infonce", "both"), mined_triplet=cfg.loss in ("triplet", "both"),
                   online_hard=cfg.online_hard or (1 if cfg.loss == "triplet" else 0),
                   temperature=cfg.temperature, neg_weight=cfg.neg_weight, margin=cfg.margin,
                   triplet_weight=cfg.triplet_weight)

    def __call__(self, out: torch.Tensor, b: Batch) -> torch.Tensor:
        loss = out.new_zeros(())
        if self.infonce:
            loss = loss + info_nce(out, b.target, b.target_keys, b.pos_keys, b.neg, b.neg_keys, self.temperature,
                                   b.weights, self.neg_weight)
        if self.mined_triplet and b.neg is not None:
            valid = (b.neg_keys >= 0) & ~positive_mask(b.pos_keys, b.neg_keys)
            loss = loss + self.triplet_weight * triplet_margin(out, b.target, b.neg, valid, self.margin, b.weights)
        if self.online_hard:
            hn, hv = hardest_in_batch(out, b.target, b.target_keys, b.pos_keys, self.online_hard)
            loss = loss + self.triplet_weight * triplet_margin(out, b.target, hn, hv, self.margin, b.weights)
        return loss


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, 1]).generate_state(1)[0])


class Trainer:
    """Holds the data, the model and the optimizer of one run; ``run()`` does the epochs.

    Named steps: :meth:`epoch_plan` (seeds, batches, sampled negatives), :meth:`assemble` (a
    :class:`Batch` of tensors), :meth:`forward`, ``loss`` (an :class:`Objective` chosen once from the
    config; :meth:`static_bank_loss` in the static-bank stage), :meth:`step`, :meth:`evaluate`,
    :meth:`refresh` (re-mine) and :meth:`save` / :meth:`restore` (checkpoint).
    """

    def __init__(self, cfg: TrainConfig, remine: Optional[Remine] = None,
                 progress: Optional[Callable[[dict], None]] = None):
        self.cfg, self.remine, self.progress = cfg, remine, progress
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
                raise DataError(f"{ew.gallery_path(cfg.eval_split)}: the evaluation workspace has d="
                                f"{self.eval_gallery.dim} but {cfg.work} has d={self.gallery.dim}. Evaluate on a "
                                f"workspace embedded with the same encoder.")
            train_idx = np.arange(len(triplets))
        else:
            train_idx, dev_idx = dev_split(len(triplets), cfg.dev_fraction, cfg.dev_seed)
            if dev_idx.size == 0:
                raise UsageError("dev_fraction gives no evaluation queries; raise it or pass eval_work.",
                                 params=("dev_fraction", "eval_work"))
            self.eval_gallery, self.eval_triplets = self.gallery, triplets.subset(dev_idx)
        self.train_idx = train_idx
        self.queries = subset_queries(self.all_queries, train_idx)
        if cfg.extra_triplets:   # generated queries join training only (never the dev split)
            _check_extra_origin(cfg.extra_triplets, ws)
            self.queries = concat_queries(self.queries, extra_queries(
                cfg.extra_triplets, self.gallery, self.gallery_keys, self.key_of,
                self.all_queries.query_ids.tolist(), cfg.extra_weight))
        self.curriculum = Curriculum.parse(cfg.schedule) if cfg.schedule else None
        self.neg_meta: dict = {}
        heads = {"attr_heads": resolve_heads(cfg.heads(), self.gallery.attributes)} if cfg.attr_heads else {}
        mcfg = ModelConfig(kind="sum" if cfg.zero_shot or cfg.epochs == 0 else cfg.model,
                           dim=self.gallery.dim, width=cfg.width, dropout=cfg.dropout, **heads)
        self.model_config = mcfg
        torch.manual_seed(cfg.seed)
        self.model = build_model(mcfg)
        # dqe: per gallery row and attribute head, an id of its values (who differs from the target where)
        self.head_codes = (torch.from_numpy(attribute_head_codes(self.gallery.attributes, mcfg.attr_heads))
                           if mcfg.kind == "dqe" else None)
        params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if params else None
        self.gallery_t = torch.from_numpy(np.require(self.gallery.embeddings, requirements='W'))
        self.keys_t = torch.from_numpy(self.gallery_keys)
        self.state = RunState(negatives=cfg.negatives)
        self.bank: Optional[NegativeBank] = None
        self.loss = Objective.of(cfg)              # chosen once: the terms cfg.loss names

    # -------------------------------------------------------------------------------- negatives
    def load_bank(self, path: Optional[str]) -> None:
        from cir_mine.miner.core.tables import read_negatives

        if not path:
            self.bank = None
            return
        nt = read_negatives(path, self.ws)
        self.ws.check_unchanged(self.cfg.split, self.gallery.data_hash)   # the table's split is the one loaded
        self.neg_meta = nt.meta
        known = set(self.all_queries.query_ids.tolist())
        table_ids = set(nt.table.column("query_id").to_pylist())
        foreign = sorted(table_ids - known)
        if foreign:
            raise DataError(f"{path}: {len(foreign)} of its {len(table_ids)} query ids are not queries of "
                            f"{self.ws.triplets_path(self.cfg.split)} (first: {foreign[0]}). Mine the table from "
                            f"this split: cir-mine negatives --work {self.cfg.work} --split {self.cfg.split}.")
        self.bank = group_negatives(nt.table, self.queries, self.gallery)
        table_schedule = nt.config.get("schedule")
        if self.curriculum is None and table_schedule:
            self.curriculum = Curriculum.parse(table_schedule)   # the schedule the table was mined for
        if self.curriculum is not None:
            missing = self.curriculum.strategies() - set(self.bank.strategies)
            if missing and not self.cfg.refresh_every:
                log.warning("schedule names %s but %s has no rows of them; those epochs get fewer negatives",
                            sorted(missing), path)
        log.info("negatives %s: %d slots per query, strategies %s, coverage %.2f",
                 path, self.bank.k, self.bank.strategies, self.bank.coverage())

    def refresh(self, epoch: int) -> dict:
        """Re-embed every query of the split, re-mine, write RUN/negs.round{r}.parquet -> stats."""
        from cir_mine.miner.core.tables import conform, write_negatives

        if self.remine is None:
            raise UsageError("refresh_every needs a miner; none was given to the trainer.", params=("refresh_every",))
        r = self.state.round + 1
        q = encode_queries(self.model, self.gallery.embeddings[self.all_queries.ref_rows],
                           self.all_queries.text_emb)
        table, meta = self.remine(q, r, epoch)
        path = self.run_dir / f"negs.round{r}.parquet"
        write_negatives(table, path, meta)
        prev = self.bank
        self.state.round, self.state.negatives = r, str(path)
        # the table just written, as written (validated by write_negatives), without reading it back
        self.bank = group_negatives(conform(table, path), self.queries, self.gallery)
        delta = table.column("delta").to_numpy(zero_copy_only=False) if table.num_rows else np.zeros(0)
        qs = (0.1, 0.25, 0.5, 0.75, 0.9)
        stats = {
            "round": r, "path": str(path), "rows": int(table.num_rows),
            "delta_quantiles": {str(p): float(np.quantile(delta, p)) for p in qs} if delta.size else {},
            "overlap_with_previous": (len(self.bank.pairs & prev.pairs) / max(1, len(self.bank.pairs))
                                      if prev is not None else None),
        }
        if meta.get("prepared"):       # e.g. error-targeted: the model's top-1 errors and the allocation
            stats["prepared"] = meta["prepared"]
        log.info("refresh round %d: %d rows, delta quantiles %s, overlap %.3f", r, stats["rows"],
                 stats["delta_quantiles"], stats["overlap_with_previous"] or 0.0)
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
        batch = Batch(ref=G[torch.from_numpy(q.ref_rows[b])], txt=torch.from_numpy(q.text_emb[b]),
                      target_rows=trow, target=G[trow], target_keys=torch.from_numpy(q.target_keys[b]),
                      pos_keys=torch.from_numpy(q.pos_keys[b]),
                      weights=torch.from_numpy(q.weights[b]) if q.weights is not None else None)
        if plan.bank_stage:
            if cfg.bank_k:
                batch.bank_sample = torch.from_numpy(plan.rng.choice(G.shape[0], size=min(cfg.bank_k, G.shape[0]),
                                                                     replace=False))
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
        return bank_loss(out, self.gallery_t, batch.target_rows, self.keys_t, batch.pos_keys,
                         self.cfg.temperature, batch.bank_sample, batch.weights)

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
                raise DataError(f"{self.run_dir}: training diverged at epoch {epoch + 1}, step {i + 1} (loss "
                                f"{float(loss.detach())}). Lower --lr ({self.cfg.lr:g}) or raise --temperature "
                                f"({self.cfg.temperature:g}); the run failed and reports no metrics.")
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
        batches = [g[s:s + bs] for g in groups for s in range(0, len(g), bs)]
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
            raise DataError(f"{self.run_dir}: the model's query embeddings are not finite after epoch "
                            f"{self.state.epoch}. Lower --lr ({self.cfg.lr:g}) or raise --temperature "
                            f"({self.cfg.temperature:g}); the run failed and reports no metrics.")
        return evaluate(q, t, g, exclude_reference=self.cfg.exclude_reference)

    # -------------------------------------------------------------------------------- run
    def save(self) -> None:
        ck.save_checkpoint(self.run_dir, {
            "epoch": self.state.epoch, "round": self.state.round, "negatives": self.state.negatives,
            "history": self.state.history, "model_config": self.model_config.to_dict(),
            "train_config": self.cfg.to_dict(), "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict() if self.opt else None,
            "workspace_hash": self.ws.manifest_hash(),
        })

    def restore(self, state: dict) -> None:
        ckpt, work = self.run_dir / ck.NAME, self.cfg.work
        if state["model_config"].get("dim") != self.model_config.dim:
            raise DataError(f"{ckpt}: the model takes d={state['model_config'].get('dim')} but {work} now has "
                            f"d={self.model_config.dim}. Resume on the workspace the run was trained on, or start "
                            f"a new run with another --out.")
        if state.get("workspace_hash") and state["workspace_hash"] != self.ws.manifest_hash():
            raise DataError(f"{ckpt}: trained on another workspace (manifest hash {state['workspace_hash']}, {work} "
                            f"has {self.ws.manifest_hash()}). Resume on the workspace the run was trained on, or "
                            f"start a new run with another --out.")
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
        rec.update(_flat(self.evaluate()))
        return rec

    def run(self, resume: bool = False) -> dict:
        cfg = self.cfg
        if resume and (self.run_dir / ck.NAME).exists():
            self.restore(ck.load_checkpoint(self.run_dir))
            log.info("resumed %s at epoch %d", self.run_dir, self.state.epoch)
        self.load_bank(self.state.negatives)
        write_json_atomic(self.run_dir / "config.json", cfg.to_dict())
        total_epochs = 0 if self.model_config.kind == "sum" else cfg.epochs + cfg.static_bank
        crash = ck.crash_after_epoch()
        while self.state.epoch < total_epochs:
            rec = self.run_epoch(self.state.epoch)
            self.state.history.append(rec)
            self.state.epoch = rec["epoch"]
            _write_jsonl(self.run_dir / "metrics.jsonl", self.state.history)
            self.save()
            if self.progress:
                self.progress(rec)
            if crash is not None and self.state.epoch == crash:
                raise RuntimeError(f"crash requested after epoch {crash} (CIR_TRAIN_CRASH_AFTER_EPOCH)")
        final = self.evaluate()
        if total_epochs == 0:
            self.save()
        final.update({
            "model": self.model_config.kind, "epochs": self.state.epoch, "rounds": self.state.round,
            "negatives": self.state.negatives, "seed": cfg.seed, "config": cfg.to_dict(),
            "n_train_queries": len(self.queries), "n_extra_queries": len(self.queries) - len(self.train_idx),
            "eval": cfg.eval_work or f"dev {cfg.dev_fraction}",
        })
        write_json_atomic(self.run_dir / "metrics.json", final)
        plot_curves(self.state.history, self.run_dir / "curves.png")
        return final


def _check_extra_origin(paths: list, ws: Workspace) -> None:
    """Generated triplets (cir-mine positives) must come from this workspace (their footer's hash)."""
    from cir_mine.data.workspace import check_readable_file, read_metadata

    here = ws.manifest_hash()
    for p in paths:
        check_readable_file(Path(p))
        try:
            meta = read_metadata(p).get("cir_mine_positives")
        except Exception:   # not Parquet: read_triplets names the problem
            continue
        made_from = meta.get("manifest_hash") if isinstance(meta, dict) else None
        if made_from and made_from != here:
            raise DataError(f"{p}: generated from another workspace (manifest hash {made_from}, {ws.root} has "
                            f"{here}). Generate them from this one: cir-mine positives --work {ws.root}.")


def _flat(metrics: dict) -> dict:
    """Per-epoch record: top-level numbers plus per-category R@10 as 'R@10/cat'."""
    out = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    for cat, v in metrics.get("per_category", {}).items():
        out.update({f"{k}/{cat}": x for k, x in v.items() if k.startswith("R@")})
    return out


def _write_jsonl(path: Path, history: list) -> None:
    """One JSON line per epoch, rewritten atomically from the run's history (so a resumed run never
    duplicates lines); a non-finite number is written as null (JSON has no NaN)."""
    from cir_mine.data.io import atomic_path, json_safe

    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(json_safe(x), sort_keys=True, allow_nan=False) + "\n" for x in history))


def plot_curves(history: list, path: Path) -> None:
    """Loss and R@10 per epoch -> PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cir_mine.data.io import atomic_path

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    ep = [h["epoch"] for h in history]
    a.plot(ep, [h["loss"] for h in history], marker="o")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.set_title("training loss")
    for key in ("R@10", "R@50"):
        b.plot(ep, [h.get(key, float("nan")) for h in history], marker="o", label=key)
    b.set_xlabel("epoch"), b.set_ylabel("recall (%)"), b.set_title("evaluation"), b.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


RUN_FILES = ("ckpt.pt", "config.json", "metrics.jsonl", "metrics.json", "curves.png")


def train(cfg: TrainConfig, remine: Optional[Remine] = None, resume: bool = False,
          progress: Optional[Callable[[dict], None]] = None, overwrite: bool = False) -> dict:
    """Train (or resume) a run; returns the final metrics (also in RUN/metrics.json).

    remine: the refresh's miner call (see :data:`Remine`); required with ``refresh_every``.
    A new run never starts in a directory that holds one unless ``overwrite`` (its files are then
    replaced), nor in a workspace or a folder holding one of its inputs. A new run that fails on
    its input or diverges leaves nothing behind (a crash keeps the last checkpoint for ``resume``).
    """
    cfg.validate()
    run_dir = Path(cfg.out)
    inputs = [cfg.negatives, *cfg.extra_triplets]
    check_output_dir(run_dir, [cfg.work, cfg.eval_work])
    if is_workspace(run_dir):
        raise UsageError(f"--out {run_dir}: is a workspace. Choose another --out; a run never writes into a "
                         f"workspace.")
    for p in inputs:
        if p and Path(p).exists() and _resolve_parent(p) == _resolve_parent(run_dir / "x"):
            if Path(p).name in RUN_FILES or Path(p).name.startswith("negs.round"):
                raise UsageError(f"--out {run_dir}: holds an input of this run ({p}), which the run would "
                                 f"replace. Choose another --out.")
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
            return f"{run_dir} keeps its last checkpoint: continue the run with `cir-train --resume {run_dir}`"
        return "nothing was changed"

    with write_job(run_dir, "cir-train", rollback_on=undo, interrupted=interrupted):
        if not resume and ckpt.exists() and not overwrite:
            raise UsageError(f"{run_dir} already holds a run. Pass --resume {run_dir} to continue it, "
                             f"--overwrite to replace it, or choose another --out.")
        if not resume:
            for old in [*(run_dir / n for n in RUN_FILES), *run_dir.glob("negs.round*.parquet")]:
                if old.exists():
                    discard(old)
        return Trainer(cfg, remine, progress).run(resume=resume)


def _resolve_parent(p) -> Path:
    return Path(p).resolve().parent


def resume_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig a run was started with (from RUN/ckpt.pt)."""
    state = ck.load_checkpoint(run_dir)
    cfg = TrainConfig.from_dict(state["train_config"])
    cfg.out = str(run_dir)
    return cfg
