"""One training step's tensors (:class:`Batch`) and the loss as a sum of terms (:class:`Objective`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from cir_mine.train.config import TrainConfig
from cir_mine.train.loss import (
    hardest_in_batch,
    info_nce,
    positive_mask,
    triplet_margin,
)


@dataclass
class Batch:
    """The tensors of one training step (B queries, K mined negatives, d dims)."""

    # fmt: off
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
    # fmt: on


@dataclass(frozen=True)
class Objective:
    """The training loss as a sum of terms, chosen once from the config."""

    # fmt: off
    infonce: bool                      # InfoNCE over in-batch targets plus mined negatives
    mined_triplet: bool                # triplet hinge on the mined negatives
    online_hard: int                   # triplet hinge on the k hardest in-batch non-targets (0: off)
    temperature: float                 # InfoNCE softmax temperature
    neg_weight: float                  # InfoNCE weight of each mined negative
    margin: float                      # triplet margin (cosine distance)
    triplet_weight: float              # weight of the triplet terms
    # fmt: on

    @classmethod
    def of(cls, cfg: "TrainConfig") -> "Objective":
        return cls(
            infonce=cfg.loss in ("infonce", "both"),
            mined_triplet=cfg.loss in ("triplet", "both"),
            online_hard=cfg.online_hard or (1 if cfg.loss == "triplet" else 0),
            temperature=cfg.temperature,
            neg_weight=cfg.neg_weight,
            margin=cfg.margin,
            triplet_weight=cfg.triplet_weight,
        )

    def __call__(self, out: torch.Tensor, b: Batch) -> torch.Tensor:
        loss = out.new_zeros(())
        if self.infonce:
            loss = loss + info_nce(
                out,
                b.target,
                b.target_keys,
                b.pos_keys,
                b.neg,
                b.neg_keys,
                self.temperature,
                b.weights,
                self.neg_weight,
            )
        if self.mined_triplet and b.neg is not None:
            valid = (b.neg_keys >= 0) & ~positive_mask(b.pos_keys, b.neg_keys)
            loss = loss + self.triplet_weight * triplet_margin(out, b.target, b.neg, valid, self.margin, b.weights)
        if self.online_hard:
            hn, hv = hardest_in_batch(out, b.target, b.target_keys, b.pos_keys, self.online_hard)
            loss = loss + self.triplet_weight * triplet_margin(out, b.target, hn, hv, self.margin, b.weights)
        return loss
