"""error-targeted: k split over the attribute groups where the current queries' top-1 errs.

Before the batches, :func:`measure_top1_errors` takes the current query embeddings' top-1 result in
the target's category (every query, or :data:`TOP1_SAMPLE` evenly spaced ones) and counts, per
attribute group, how often it differs from the target (an error that differs in n groups counts 1/n
for each). The strategy's k negatives per query are split over the groups in proportion to that
error mass (``split_k``); group g's share goes to the highest-ranked guarded candidates that differ
from the target in g. At a refresh the miner gets the trained model's query embeddings, so the
allocation follows the model's errors round by round; it is written into the table's footer
metadata (``meta["prepared"]["error-targeted"]``) and the trainer copies it into metrics.jsonl.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cir_mine.miner.core.search.backends import search_batched
from cir_mine.miner.core.strategies.registry import register, split_k
from cir_mine.miner.core.strategies.selection import Picks, concat_picks, pick

# Search depth of the top-1 measurement: the first result in the target's category is taken from
# this many neighbours (a query whose top TOP1_DEPTH are all in other categories counts as
# "other-category").
TOP1_DEPTH = 32
# Queries the top-1 measurement looks at: all up to this many, else this many evenly spaced over the
# split (shares of a few thousand queries are within about 1 point of the full count, at a fraction
# of a second search over the whole split).
TOP1_SAMPLE = 4096


def sample_queries(m: int, n: int = TOP1_SAMPLE) -> np.ndarray:
    """int64[min(m, n)]: every query when m <= n, else n evenly spaced query indices."""
    return np.arange(m, dtype=np.int64) if m <= n else np.unique(np.linspace(0, m - 1, n).round().astype(np.int64))


def measure_top1_errors(pool, qs, index, cfg, k: int) -> dict:
    """Top-1 errors per attribute group of the query embeddings ``qs.emb`` -> a JSON-able dict.

    For each query (all, or :data:`TOP1_SAMPLE` evenly spaced ones) the first search result in the target's category is its top-1 (what the
    FashionIQ protocol ranks first; the reference is not excluded). It is right when it is the
    target, an extra positive or has the target's attribute values in every group. ``errors``:
    group -> error mass (a wrong top-1 that differs in n groups adds 1/n to each), ``shares``:
    errors normalised, ``k``: this strategy's negatives per query per group (``split_k``).
    """
    attrs = pool.attrs
    groups = list(attrs.groups)
    sample = sample_queries(len(qs.target_rows))
    m = len(sample)
    depth = min(TOP1_DEPTH, len(pool.product))
    mass = np.zeros(len(groups), np.float64)
    n_right = n_other = n_wrong = 0
    extra = qs.extra
    for s in range(0, m, cfg.query_batch):
        q = sample[s : s + cfg.query_batch]
        _, I = search_batched(index, qs.emb[q], depth, batch_size=len(q))
        trow = qs.target_rows[q]
        same = (I >= 0) & (pool.cat[np.maximum(I, 0)] == pool.cat[trow][:, None])
        has = same.any(1)
        n_other += int((~has).sum())
        top = np.where(has, I[np.arange(len(q)), np.argmax(same, 1)], -1)
        q, trow, top = q[has], trow[has], top[has]
        gdiff = attrs.group_code[attrs.combo[top]] != attrs.group_code[attrs.combo[trow]]  # [b, G]
        is_extra = extra.contains(q, pool.product[top][:, None])[:, 0]
        right = (pool.product[top] == pool.product[trow]) | is_extra | ~gdiff.any(1)
        n_right += int(right.sum())
        wrong = gdiff[~right]
        n_wrong += int(wrong.shape[0])
        if wrong.size:
            mass += (wrong / wrong.sum(1, keepdims=True)).sum(0)
    total = mass.sum()
    errors = {g: round(float(x), 3) for g, x in zip(groups, mass) if x > 0}
    shares = {g: round(float(x / total), 4) for g, x in zip(groups, mass) if x > 0} if total > 0 else {}
    ks = split_k(k, [x / total for x in mass]) if total > 0 else []
    return {
        "n_queries": len(qs.target_rows),
        "n_measured": m,
        "top1_right": n_right,
        "top1_wrong": n_wrong,
        "top1_other_category": n_other,
        "errors": errors,
        "shares": shares,
        "k": {g: int(x) for g, x in zip(groups, ks) if x > 0},
    }


@dataclass(frozen=True)
class ErrorTargetedParams:
    # fmt: off
    error_minimal: bool = False           # only minimal pairs: candidates that differ from the target in the
                                          # allocated group alone
    # fmt: on


@register(
    "error-targeted",
    ErrorTargetedParams,
    ranked=True,
    hint="raise MineConfig.of(max_candidates=...)",
    prepare=measure_top1_errors,
)
def error_targeted(ctx, k: int, stream: int, p: ErrorTargetedParams) -> Picks:
    """k split over the groups by the measured top-1 error mass; per group, the top-ranked
    candidates that differ from the target in that group (``error_minimal``: in that group alone,
    a minimal pair)."""
    alloc = ctx.prepared["error-targeted"]
    groups = ctx.pool.attrs.groups
    shares = [alloc["errors"].get(g, 0.0) for g in groups]
    c = ctx.ranked
    if sum(shares) <= 0:  # no measured error (or no attributes): the ranking's top
        return pick(ctx, c, c.valid, k, stream, "top")
    diff = ctx.group_diff(c)
    if p.error_minimal:
        diff = diff & (diff.sum(-1) == 1)[:, :, None]
    parts = []
    for gi, kg in enumerate(split_k(k, [s / sum(shares) for s in shares])):
        if kg == 0:
            continue
        got = pick(ctx, c, c.valid & diff[:, :, gi], kg, stream * 16 + gi + 1, "top")
        ctx.take(got)
        parts.append(got)
    return concat_picks(parts, len(ctx.q))
