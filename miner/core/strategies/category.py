"""category: stratified random draws from the target's category, the other categories and the gallery."""

from __future__ import annotations

from dataclasses import dataclass

from cir_mine.data.errors import UsageError
from cir_mine.miner.core.strategies.registry import register, split_k
from cir_mine.miner.core.strategies.selection import Picks, concat_picks, select_available


@dataclass(frozen=True)
class CategoryParams:
    # fmt: off
    category_shares: tuple = (0.7, 0.2, 0.1)  # shares of same-category, other-category and any-image draws
    # fmt: on

    def validate(self) -> None:
        s = self.category_shares
        if len(s) != 3 or min(s) < 0 or sum(s) <= 0:
            raise UsageError(
                "category_shares needs three non-negative shares, e.g. 0.7,0.2,0.1.", params=("category_shares",)
            )


@register("category", CategoryParams, hint="change MineConfig.of(category_shares=...)")
def category(ctx, k: int, stream: int, p: CategoryParams) -> Picks:
    """Stratified random: same category as the target (different item), other category, any image."""
    parts = []
    for s, (kind, ki) in enumerate(zip(("same-cat", "other-cat", "all"), split_k(k, list(p.category_shares)))):
        if ki == 0:
            continue
        picks = select_available(ctx, ctx.random_candidates(kind, ki, stream * 8 + s + 1), ki)
        ctx.take(picks)
        parts.append(picks)
    return concat_picks(parts, len(ctx.q))
