"""semantic: near the query but not satisfying the modification."""

from __future__ import annotations

from cir_mine.miner.core.attribute_codes import STATUS_TRUE
from cir_mine.miner.core.strategies.registry import register
from cir_mine.miner.core.strategies.selection import Picks, contradicted, pick


@register(
    "semantic",
    ranked=True,
    attributes=True,
    hint="raise MineConfig.of(max_candidates=...) (queries without requested attributes get none)",
)
def semantic(ctx, k: int, stream: int, params) -> Picks:
    """Near the query but not satisfying the modification: no requested group satisfied, one contradicted."""
    c = ctx.ranked
    status = ctx.status(c)
    ok = contradicted(status) & ~(status == STATUS_TRUE).any(axis=-1)
    return pick(ctx, c, c.valid & ok, k, stream, "top")
