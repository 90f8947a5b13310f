"""kept-mismatch: satisfies the requested change but differs from the target in a kept group.

Candidates from the query's ranking that satisfy the requested change (no requested group
contradicted; unknown where the tags cannot tell) but differ from the target in a group the caption
does not mention: they change what the query should have kept from the reference.
"""

from __future__ import annotations

from cir_mine.miner.core.strategies.registry import register
from cir_mine.miner.core.strategies.selection import Picks, kept_mismatch_mask, pick


@register(
    "kept-mismatch",
    ranked=True,
    attributes=True,
    hint="raise MineConfig.of(max_candidates=...) (queries whose ranking holds no image that satisfies the caption get none)",
)
def kept_mismatch(ctx, k: int, stream: int, p) -> Picks:
    """Satisfies the requested change but differs from the target in a group the caption leaves alone."""
    c = ctx.ranked
    return pick(ctx, c, c.valid & kept_mismatch_mask(ctx, c), k, stream, "top")
