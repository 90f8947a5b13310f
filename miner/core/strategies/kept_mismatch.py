"""kept-mismatch: satisfies the requested change but differs from the target in a kept group.

Candidates from the query's ranking that satisfy the requested change (no requested group
contradicted; unknown where the tags cannot tell) but differ from the target in a group the caption
does not mention: they change what the query should have kept from the reference.
"""
from __future__ import annotations

import numpy as np

from cir_mine.miner.core.strategies.registry import register
from cir_mine.miner.core.strategies.selection import Picks, contradicted, pick


def request_satisfied(status: np.ndarray) -> np.ndarray:
    """bool[b, L] from int8[b, L, Gr] requested status: no requested group contradicted (each one
    satisfied, or unknown where the image's tags cannot tell)."""
    return ~contradicted(status)


@register("kept-mismatch", ranked=True, attributes=True,
          hint="raise --max-candidates (queries whose ranking holds no image that satisfies the caption get none)")
def kept_mismatch(ctx, k: int, stream: int, p) -> Picks:
    """Satisfies the requested change but differs from the target in a group the caption leaves alone."""
    c = ctx.ranked
    diff = ctx.group_diff(c)                                   # [b, L, G]
    kept = ~ctx.group_asked()[:, None, :] & ctx.group_present(c)
    ok = request_satisfied(ctx.status(c)) & (diff & kept).any(-1)
    return pick(ctx, c, c.valid & ok, k, stream, "top")
