"""Losses over a batch of query embeddings, their targets and mined negatives.

Identity is by **image key** (an int per distinct image id, so one product listed under two
categories is one key). Every loss masks false negatives: a candidate whose key equals the query's
target key or one of its extra-positive keys is never a negative.

Shapes: ``q: float32[B, d]`` query embeddings (unit rows), ``t: float32[B, d]`` target embeddings,
``target_keys: int64[B]``, ``pos_keys: int64[B, P]`` the target key plus extra positives (-1 pad),
``neg: float32[B, K, d]`` mined negatives with ``neg_keys: int64[B, K]`` (-1 = no negative).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def weighted_mean(per_query: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """mean over B of weights[b] * per_query[b] (weights float32[B]; None = plain mean) -> scalar."""
    return per_query.mean() if weights is None else (per_query * weights).mean()


def positive_mask(pos_keys: torch.Tensor, cand_keys: torch.Tensor) -> torch.Tensor:
    """bool[B, C]: candidate c of query b is a positive of b (pos_keys [B,P], cand_keys [B,C] or [C])."""
    if cand_keys.dim() == 1:
        cand_keys = cand_keys.unsqueeze(0).expand(pos_keys.shape[0], -1)
    eq = cand_keys.unsqueeze(-1) == pos_keys.unsqueeze(1)  # [B, C, P]
    return (eq & (pos_keys.unsqueeze(1) >= 0)).any(-1)


def in_batch_logits(
    q: torch.Tensor, t: torch.Tensor, target_keys: torch.Tensor, pos_keys: torch.Tensor
) -> torch.Tensor:
    """Cosine logits float32[B, B] of queries vs in-batch targets; other positives set to -inf.

    The diagonal (each query's own target) is kept; an off-diagonal target that is the same image
    (duplicate target in the batch) or an extra positive of the query is masked.
    """
    logits = q @ t.T
    mask = positive_mask(pos_keys, target_keys)
    mask.fill_diagonal_(False)
    return logits.masked_fill(mask, NEG_INF)


def mined_logits(q: torch.Tensor, neg: torch.Tensor, neg_keys: torch.Tensor, pos_keys: torch.Tensor) -> torch.Tensor:
    """Cosine logits float32[B, K] of queries vs their mined negatives; padding and positives -inf."""
    logits = torch.einsum("bd,bkd->bk", q, neg)
    bad = (neg_keys < 0) | positive_mask(pos_keys, neg_keys)
    return logits.masked_fill(bad, NEG_INF)


def info_nce(
    q: torch.Tensor,
    t: torch.Tensor,
    target_keys: torch.Tensor,
    pos_keys: torch.Tensor,
    neg: Optional[torch.Tensor] = None,
    neg_keys: Optional[torch.Tensor] = None,
    temperature: float = 0.05,
    weights: Optional[torch.Tensor] = None,
    neg_weight: float = 1.0,
) -> torch.Tensor:
    """InfoNCE: in-batch targets plus mined negatives as extra logits per query -> scalar.

    neg_weight: each mined negative counts ``neg_weight`` times in the softmax denominator
    (log(neg_weight) added to its scaled logit; < 1 down-weights mined negatives, 0 drops them).

    weights: optional float32[B] loss weight per query (generated triplets); the loss is the
    mean over B of weight x per-query cross-entropy.
    """
    logits = in_batch_logits(q, t, target_keys, pos_keys)
    if neg is not None and neg.shape[1] > 0 and neg_weight > 0:
        mined = mined_logits(q, neg, neg_keys, pos_keys)
        if neg_weight != 1.0:
            mined = mined + temperature * math.log(neg_weight)
        logits = torch.cat([logits, mined], dim=1)
    labels = torch.arange(q.shape[0], device=q.device)
    return weighted_mean(F.cross_entropy(logits / temperature, labels, reduction="none"), weights)


def triplet_margin(
    q: torch.Tensor,
    t: torch.Tensor,
    neg: torch.Tensor,
    neg_valid: torch.Tensor,
    margin: float = 0.2,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """mean over valid (query, negative) of max(0, m + d(q,p) − d(q,n)), d = 1 − cos -> scalar.

    neg: float32[B, K, d]; neg_valid: bool[B, K]; weights: optional float32[B] per-query weight
    of the hinge terms. Returns 0 (with grad) when nothing is valid.
    """
    d_pos = 1 - (q * t).sum(-1, keepdim=True)  # [B, 1]
    d_neg = 1 - torch.einsum("bd,bkd->bk", q, neg)  # [B, K]
    hinge = F.relu(margin + d_pos - d_neg) * neg_valid
    if weights is not None:
        hinge = hinge * weights.unsqueeze(1)
    return hinge.sum() / neg_valid.sum().clamp(min=1)


def hardest_in_batch(
    q: torch.Tensor, t: torch.Tensor, target_keys: torch.Tensor, pos_keys: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online hard mining: per query the k hardest in-batch non-target targets.

    Returns (neg float32[B, k', d], valid bool[B, k']) with k' = min(k, B − 1); positives of the
    query (its target, duplicates, extra positives) are never picked (valid False if too few).
    """
    with torch.no_grad():
        logits = in_batch_logits(q, t, target_keys, pos_keys)
        logits.fill_diagonal_(NEG_INF)
        kk = max(0, min(k, q.shape[0] - 1))
        top, idx = logits.topk(kk, dim=1)
    return t[idx], torch.isfinite(top)


def bank_loss(
    q: torch.Tensor,
    bank: torch.Tensor,
    target_rows: torch.Tensor,
    bank_keys: torch.Tensor,
    pos_keys: torch.Tensor,
    temperature: float = 0.05,
    sample: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """SPN static bank: softmax over the gallery (every image a negative) -> scalar.

    bank: float32[N, d] all gallery embeddings (fixed); target_rows: int64[B] rows of the targets;
    bank_keys: int64[N]; sample: optional int64[k] bank rows to use instead of all N (the target
    is always added as the first logit); weights: optional float32[B] per-query loss weight.
    """
    pos_logit = (q * bank[target_rows]).sum(-1, keepdim=True)
    if sample is not None:
        bank, bank_keys = bank[sample], bank_keys[sample]
    logits = q @ bank.T
    logits = logits.masked_fill(positive_mask(pos_keys, bank_keys), NEG_INF)
    logits = torch.cat([pos_logit, logits], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return weighted_mean(F.cross_entropy(logits, labels, reduction="none"), weights)


def attribute_margin(
    subs: torch.Tensor,
    weights: torch.Tensor,
    t: torch.Tensor,
    cand: torch.Tensor,
    differs: torch.Tensor,
    margin: float = 0.2,
) -> torch.Tensor:
    """DQE-CIR's attribute-aware margin loss over attribute sub-queries -> scalar.

    subs: float32[B, S, d] unit sub-queries; weights: float32[B, 1+S] the text-conditioned attribute
    weights (index 0: the global query); t: float32[B, d] targets; cand: float32[B, C, d] negatives;
    differs: bool[B, C, S] candidate c differs from the target in head s's groups (False for padding
    and positives). Hinge ``max(0, m_bs + s_s(q, c) - s_s(q, t))`` on cosine scores, with an
    attribute-aware margin ``m_bs = margin · (1 + S · w_bs)`` (w detached): the head the caption
    weighs most must separate the target by the widest margin. Mean over the (b, c, s) where
    ``differs``; 0 (with grad) when none.
    """
    s_pos = torch.einsum("bsd,bd->bs", subs, t)  # [B, S]
    s_neg = torch.einsum("bsd,bcd->bcs", subs, cand)  # [B, C, S]
    m = margin * (1 + subs.shape[1] * weights[:, 1:].detach())  # [B, S]
    hinge = F.relu(m.unsqueeze(1) + s_neg - s_pos.unsqueeze(1)) * differs
    return hinge.sum() / differs.sum().clamp(min=1)
