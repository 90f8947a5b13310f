"""category-discrepant: visually near the target but contradicting a requested attribute."""

from __future__ import annotations

from dataclasses import dataclass

from cir_mine.data.errors import UsageError
from cir_mine.miner.core.strategies.registry import check_share, register
from cir_mine.miner.core.strategies.selection import (
    Picks,
    contradicted,
    contradicted_as_reference,
    pick,
    with_kept_share,
)

POOLS = ("target", "query")


@dataclass(frozen=True)
class CategoryDiscrepantParams:
    # fmt: off
    discrepant_pool: str = "target"       # candidates near the target (its own search) or the query's ranking
    discrepant_ref_value: bool = False    # also candidates that contradict a requested group with the reference's own
                                          # value (off: such look-alikes of the reference are left out)
    discrepant_kept_share: float = 0.5    # share of k given to kept-mismatch candidates from the query's ranking;
                                          # 0: discrepant negatives only
    # fmt: on

    def validate(self) -> None:
        check_share("discrepant_kept_share", self.discrepant_kept_share)
        if self.discrepant_pool not in POOLS:
            raise UsageError(
                f"discrepant_pool {self.discrepant_pool!r}: use target or query.", params=("discrepant_pool",)
            )


@register(
    "category-discrepant",
    CategoryDiscrepantParams,
    ranked=True,
    attributes=True,
    hint="raise MineConfig.of(max_candidates=...) (queries without requested attributes get none)",
)
def category_discrepant(ctx, k: int, stream: int, p: CategoryDiscrepantParams) -> Picks:
    """Visually near the target (highest s(c, t) first) but contradicting a requested attribute.

    Candidates: the target's own nearest neighbours (``discrepant_pool='target'``, a second search)
    or the query's ranking ('query'). Unless ``discrepant_ref_value``, a candidate that contradicts
    a requested group with the reference's own value there is left out (a look-alike of the
    reference, see attribute-mismatch). ``discrepant_kept_share`` of the k slots go to kept-mismatch
    candidates of the query's ranking, as for attribute-mismatch."""
    return with_kept_share(ctx, k, stream, p.discrepant_kept_share, lambda k1: _discrepant(ctx, k1, stream, p))


def _discrepant(ctx, k: int, stream: int, p: CategoryDiscrepantParams) -> Picks:
    c = ctx.target_neighbors() if p.discrepant_pool == "target" else ctx.ranked
    status = ctx.status(c)
    ok = contradicted(status)
    if not p.discrepant_ref_value:
        ok &= ~contradicted_as_reference(ctx, c, status)
    return pick(ctx, c, c.valid & ok, k, stream, "top", key=-ctx.sim_target_full(c))
