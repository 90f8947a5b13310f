"""verified: annotator-verified negatives (CIRR target_soft = -1)."""

from __future__ import annotations

from cir_mine.miner.core.strategies.registry import register
from cir_mine.miner.core.strategies.selection import Picks, select_available


@register("verified", hint="only datasets with verified negatives (CIRR target_soft = -1) have them")
def verified(ctx, k: int, stream: int, params) -> Picks:
    """Annotator-verified negatives (CIRR target_soft = -1), in the order the dataset lists them."""
    return select_available(ctx, ctx.verified_candidates(), k)
