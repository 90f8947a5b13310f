"""hardest: the top of the query's ranking within a rank window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from cir_mine.data.errors import UsageError
from cir_mine.miner.core.strategies.registry import register
from cir_mine.miner.core.strategies.selection import Picks, pick


@dataclass(frozen=True)
class HardestParams:
    # fmt: off
    range_min: int = 0                    # first rank of the window (0-based, inclusive)
    range_max: Optional[int] = None       # end of the window (exclusive; None: the search depth)
    # fmt: on

    def validate(self) -> None:
        if self.range_max is not None and self.range_max <= self.range_min:
            raise UsageError(
                f"range_max ({self.range_max}) must be above range_min ({self.range_min}).",
                params=("range_max", "range_min"),
            )


@register(
    "hardest",
    HardestParams,
    ranked=True,
    hint="raise MineConfig.of(range_max=..., max_candidates=...) or MineConfig.of(rho=...)",
)
def hardest(ctx, k: int, stream: int, p: HardestParams) -> Picks:
    """Top of the ranking within the rank window [range_min, range_max)."""
    c = ctx.ranked
    win = c.ranks >= p.range_min
    if p.range_max is not None:
        win &= c.ranks < p.range_max
    return pick(ctx, c, c.valid & win, k, stream, "top")
