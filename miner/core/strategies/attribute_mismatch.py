"""attribute-mismatch: like the target outside the requested groups, contradicting a requested one."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cir_mine.miner.core.strategies.registry import check_share, register
from cir_mine.miner.core.strategies.selection import (
    Picks,
    contradicted,
    contradicted_as_reference,
    pick,
    with_kept_share,
)


@dataclass(frozen=True)
class AttributeMismatchParams:
    # fmt: off
    attr_agree: float = 1.0               # least share of non-requested groups equal to the target's
    mismatch_ref_value: bool = False      # also candidates that contradict a requested group with the reference's own
                                          # value (off: such look-alikes of the reference are left out)
    mismatch_kept_share: float = 0.5      # share of k given to kept-mismatch candidates (satisfy the caption, break a
                                          # kept group); 0: caption-contradicting negatives only
    # fmt: on

    def validate(self) -> None:
        check_share("mismatch_kept_share", self.mismatch_kept_share)


@register(
    "attribute-mismatch",
    AttributeMismatchParams,
    ranked=True,
    attributes=True,
    hint="lower MineConfig.of(attr_agree=...) or raise MineConfig.of(max_candidates=...)",
)
def attribute_mismatch(ctx, k: int, stream: int, p: AttributeMismatchParams) -> Picks:
    """Agrees with the target outside the requested groups (share >= attr_agree of the groups either
    image has) and differs from it in a requested group that the candidate contradicts.

    Unless ``mismatch_ref_value``, a candidate that contradicts a requested group with the
    reference's own value there (it keeps what the caption asks to change, as a copy of the
    reference does) is left out: pushing the query away from such look-alikes of the reference cost
    about 1 R@10 on the synthetic worlds (docs/benchmarks.md).

    ``mismatch_kept_share`` of the k slots go to kept-mismatch candidates instead (see
    :func:`with_kept_share`): negatives that all contradict the caption cost up to 1.8 R@10
    against in-batch training on the synthetic worlds; half of them, paired with the mirror-image
    kind, gained 0.3 to 1.4 instead (docs/benchmarks.md)."""
    return with_kept_share(ctx, k, stream, p.mismatch_kept_share, lambda k1: _contradicting(ctx, k1, stream, p))


def _contradicting(ctx, k: int, stream: int, p: AttributeMismatchParams) -> Picks:
    c = ctx.ranked
    diff = ctx.group_diff(c)  # [b, L, G]
    asked = ctx.group_asked()[:, None, :]  # [b, 1, G]
    diff_asked = (diff & asked).any(axis=-1)
    present = ctx.group_present(c)  # [b, L, G] either image has the group
    other = present & ~asked
    n_other = other.sum(-1)
    agree = np.where(n_other > 0, (other & ~diff).sum(-1) / np.maximum(n_other, 1), 1.0)
    # where no image carries a requested group as a raw group (FashionIQ tags name other groups than
    # captions), the contradiction itself is the difference
    asked_present = (present & asked).any(axis=-1)
    status = ctx.status(c)
    ok = (diff_asked | ~asked_present) & contradicted(status) & (agree >= p.attr_agree - 1e-9)
    if not p.mismatch_ref_value:
        ok &= ~contradicted_as_reference(ctx, c, status)
    return pick(ctx, c, c.valid & ok, k, stream, "top")
