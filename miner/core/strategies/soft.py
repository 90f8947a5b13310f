"""soft: a partial attribute match with the target, soft_lo < overlap(c, t) < soft_hi."""

from __future__ import annotations

from dataclasses import dataclass

from cir_mine.data.errors import UsageError
from cir_mine.miner.core.strategies.registry import register
from cir_mine.miner.core.strategies.selection import Picks, pick


@dataclass(frozen=True)
class SoftParams:
    # fmt: off
    soft_lo: float = 0.0                  # keep attribute overlap with the target (Jaccard) above this
    soft_hi: float = 1.0                  # keep attribute overlap with the target below this
    # fmt: on

    def validate(self) -> None:
        if self.soft_lo > self.soft_hi:
            raise UsageError(
                f"soft_lo ({self.soft_lo}) is above soft_hi ({self.soft_hi}); swap them.", params=("soft_lo", "soft_hi")
            )


@register(
    "soft",
    SoftParams,
    ranked=True,
    attributes=True,
    hint="widen MineConfig.of(soft_lo=..., soft_hi=...) or raise MineConfig.of(max_candidates=...)",
)
def soft(ctx, k: int, stream: int, p: SoftParams) -> Picks:
    """Partial attribute match: soft_lo < overlap(c, t) < soft_hi (Jaccard on attributes)."""
    c = ctx.ranked
    overlap = ctx.overlap(c)
    return pick(ctx, c, c.valid & (overlap > p.soft_lo) & (overlap < p.soft_hi), k, stream, "top")
