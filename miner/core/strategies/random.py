"""random: uniform over the gallery (guards applied)."""

from __future__ import annotations

from cir_mine.miner.core.strategies.registry import register
from cir_mine.miner.core.strategies.selection import Picks, select_available


@register("random", hint="a larger gallery")
def random(ctx, k: int, stream: int, params) -> Picks:
    """Uniform over the gallery (guards applied)."""
    return select_available(ctx, ctx.random_candidates("all", k, stream), k)
