"""in-batch: the other targets of the training batch (trainer-side); the miner picks nothing."""

from __future__ import annotations

from cir_mine.miner.core.strategies.registry import register
from cir_mine.miner.core.strategies.selection import Picks


@register("in-batch")
def in_batch(ctx, k: int, stream: int, params) -> Picks:
    """Trainer-side: the other targets of the training batch. The miner picks nothing."""
    return Picks.empty(len(ctx.q))
