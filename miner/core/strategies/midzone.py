"""midzone: the target-relative mid-zone of DQE-CIR, delta_lo <= Δ <= delta_hi."""

from __future__ import annotations

from dataclasses import dataclass

from cir_mine.data.errors import UsageError
from cir_mine.miner.core.strategies.registry import register
from cir_mine.miner.core.strategies.selection import Picks, pick


@dataclass(frozen=True)
class MidzoneParams:
    # fmt: off
    delta_lo: float = 0.02                # lower bound of delta = s(q,t) - s(q,c) (inclusive)
    delta_hi: float = 0.2                 # upper bound of delta (inclusive)
    # fmt: on

    def validate(self) -> None:
        if self.delta_lo > self.delta_hi:
            raise UsageError(
                f"delta_lo ({self.delta_lo}) is above delta_hi ({self.delta_hi}); swap them.",
                params=("delta_lo", "delta_hi"),
            )


@register(
    "midzone",
    MidzoneParams,
    ranked=True,
    hint="widen MineConfig.of(delta_lo=..., delta_hi=...) or raise MineConfig.of(max_candidates=...)",
)
def midzone(ctx, k: int, stream: int, p: MidzoneParams) -> Picks:
    """Target-relative mid-zone (DQE-CIR): delta_lo <= Δ <= delta_hi, sampled uniformly in the zone."""
    c = ctx.ranked
    zone = (c.delta >= p.delta_lo) & (c.delta <= p.delta_hi)
    return pick(ctx, c, c.valid & zone, k, stream, "random")
