"""semihard: FaceNet semi-hard negatives, ranked below the target but within a margin."""

from __future__ import annotations

from dataclasses import dataclass

from cir_mine.miner.core.strategies.registry import register
from cir_mine.miner.core.strategies.selection import Picks, pick


@dataclass(frozen=True)
class SemihardParams:
    # fmt: off
    margin: float = 0.1                   # keep 0 < delta < margin (delta = s(q,t) - s(q,c))
    # fmt: on


@register(
    "semihard", SemihardParams, ranked=True, hint="raise MineConfig.of(margin=...) or MineConfig.of(max_candidates=...)"
)
def semihard(ctx, k: int, stream: int, p: SemihardParams) -> Picks:
    """FaceNet semi-hard: ranks below the target but within the margin, 0 < Δ < margin."""
    c = ctx.ranked
    return pick(ctx, c, c.valid & (c.delta > 0) & (c.delta < p.margin), k, stream, "random")
