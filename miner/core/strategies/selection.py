"""Selection helpers every strategy shares: candidate matrices, picks, hashed random keys.

A strategy picks at most ``k`` negatives per query from a :class:`Candidates` matrix and never pads:
slots it cannot fill stay -1 and show up as shortfall. Random choices use keys hashed from
(seed, query_id, gallery row, stream), so rows do not depend on the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from cir_mine.miner.core.attribute_codes import STATUS_FALSE
from cir_mine.miner.core.strategies.registry import split_k

try:  # the compiled kernels (miner/core/strategies/_select.c); without them, the numpy code here
    from cir_mine.miner.core.strategies import _select as KERNELS
except ImportError:  # pragma: no cover - depends on the install
    KERNELS = None

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorized SplitMix64 finalizer on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + _M1  # a new array: the steps below work in place
        z ^= z >> np.uint64(30)
        z *= _M2
        z ^= z >> np.uint64(27)
        z *= _M3
        z ^= z >> np.uint64(31)
        return z


def hash_keys(qhash: np.ndarray, values: np.ndarray, stream: int, kernels: bool = True) -> np.ndarray:
    """uint64 keys for (query, value) in random stream ``stream`` (an int that keeps the draws of
    mix parts apart): ``qhash`` uint64[b], ``values`` int64[b, L] -> uint64[b, L]. The compiled
    kernel where built (``kernels``), the numpy code below otherwise; the same keys."""
    if kernels and KERNELS is not None and 0 <= stream < 1 << 64 and np.ndim(values) == 2:
        qhash = np.ascontiguousarray(qhash, np.uint64)
        values = np.ascontiguousarray(values, np.int64)
        b, L = values.shape
        if qhash.shape == (b,):
            out = np.empty((b, L), np.uint64)
            KERNELS.hash(qhash, values, b, L, int(stream), out)
            return out
    v = splitmix64(values.astype(np.uint64) ^ splitmix64(np.uint64(stream) + np.zeros(1, np.uint64)))
    return splitmix64(qhash[:, None] ^ v)


@dataclass
class Candidates:
    """A guarded candidate matrix for b queries."""

    # fmt: off
    rows: np.ndarray            # int64[b, L] gallery rows (-1 = empty)
    product: np.ndarray         # int64[b, L] product code of each row
    scores: np.ndarray          # float32[b, L] s(q, c)
    ranks: np.ndarray           # int32[b, L] rank in the search (-1: not from the ranking)
    delta: np.ndarray           # float32[b, L] s(q, t) - s(q, c)
    valid: np.ndarray           # bool[b, L] passed every guard
    # fmt: on

    @property
    def shape(self):
        return self.rows.shape


@dataclass
class Picks:
    # fmt: off
    rows: np.ndarray            # int64[b, k] picked gallery rows (-1 = unfilled)
    ranks: np.ndarray           # int32[b, k]
    scores: np.ndarray          # float32[b, k] s(q, neg)
    # fmt: on

    @classmethod
    def empty(cls, b: int) -> "Picks":
        return cls(np.full((b, 0), -1, np.int64), np.full((b, 0), -1, np.int32), np.zeros((b, 0), np.float32))


def select(c: Candidates, eligible: np.ndarray, k: int, key: Optional[np.ndarray] = None) -> Picks:
    """Up to ``k`` eligible candidates per row, smallest ``key`` first (default: column order).

    ``key``: [b, L] numbers (uint64 hash keys for uniform sampling, -s(c,t) for closeness, ...)."""
    b, L = c.shape
    k_eff = min(k, L)
    order = first_k_order(key, eligible, k_eff)
    ok = np.take_along_axis(eligible, order, axis=1)
    rows = np.where(ok, np.take_along_axis(c.rows, order, axis=1), -1)
    ranks = np.where(ok, np.take_along_axis(c.ranks, order, axis=1), -1).astype(np.int32)
    scores = np.where(ok, np.take_along_axis(c.scores, order, axis=1), 0).astype(np.float32)
    if k_eff < k:
        pad = k - k_eff
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
        ranks = np.pad(ranks, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)))
    return Picks(rows, ranks, scores)


_KINDS = {np.dtype(np.uint64): 0, np.dtype(np.int64): 1}  # the compiled first_k's key kinds (2: column order)


def first_k_order(key: Optional[np.ndarray], eligible: np.ndarray, k: int, kernels: bool = True) -> np.ndarray:
    """int64[b, k]: the first ``k`` columns of each row's stable argsort of ``key`` ([b, L]; None:
    column order) where every entry that is not ``eligible`` holds the key type's largest value.
    The compiled kernel where built (``kernels``) for integer keys and column order, else
    :func:`first_k_stable`; the same columns."""
    b, L = eligible.shape
    kind = 2 if key is None else _KINDS.get(np.asarray(key).dtype)
    if kernels and KERNELS is not None and kind is not None and b * L:
        order = np.empty((b, k), np.int64)
        keys = b"" if key is None else np.ascontiguousarray(key)
        KERNELS.first_k(keys, np.ascontiguousarray(eligible, bool), b, L, k, kind, order)
        return order
    if key is None:
        key = np.broadcast_to(np.arange(L, dtype=np.int64), (b, L))
    fill = np.iinfo(key.dtype).max if np.issubdtype(key.dtype, np.integer) else np.inf
    return first_k_stable(np.where(eligible, key, fill), eligible, fill, k)


def first_k_stable(key: np.ndarray, eligible: np.ndarray, fill, k: int) -> np.ndarray:
    """The first ``k`` columns of each row's stable argsort of ``key`` (int64[b, k]), where it decides
    the picks: the order of the eligible entries (ineligible ones hold ``fill`` and are masked by the
    caller). Integer keys go through the faster unstable sort; rows where it could differ (two
    eligible entries with one key, or an eligible key equal to ``fill``) are sorted again, stably."""
    if not np.issubdtype(key.dtype, np.integer) or key.size == 0:
        return np.argsort(key, axis=1, kind="stable")[:, :k]
    order = np.argsort(key, axis=1)
    sk = np.take_along_axis(key, order, axis=1)
    tied = ((sk[:, 1:] == sk[:, :-1]) & (sk[:, 1:] != fill)).any(axis=1) | (eligible & (key == fill)).any(axis=1)
    if tied.any():
        order[tied] = np.argsort(key[tied], axis=1, kind="stable")
    return order[:, :k]


def select_available(ctx, c: Candidates, k: int) -> Picks:
    """Up to ``k`` valid candidates not picked by an earlier part of the mix, in column order."""
    return select(c, c.valid & ctx.available(c), k)


def pick(
    ctx, c: Candidates, eligible: np.ndarray, k: int, stream: int, default: str, key: Optional[np.ndarray] = None
) -> Picks:
    """Select with the configured order (``ctx.cfg.sample`` or ``default``): 'top' (ranking order),
    'random' (uniform, hashed in ``stream``) or ``key``."""
    order = ctx.cfg.sample or default
    if key is None and order == "random":
        key = ctx.random_keys(c, stream)
    return select(c, eligible & ctx.available(c), k, key)


def contradicted(status: np.ndarray) -> np.ndarray:
    """bool[b, L]: the candidate contradicts at least one requested attribute (status [b, L, R])."""
    return (status == STATUS_FALSE).any(axis=-1)


def contradicted_as_reference(ctx, c: Candidates, status: np.ndarray) -> np.ndarray:
    """bool[b, L]: the candidate contradicts a requested group with the reference's own value there
    (it keeps what the caption asks to change; an exact copy of the reference's attributes always
    does). ``status``: int8[b, L, Gr] requested status of ``c``."""
    a = ctx.pool.attrs
    if not a.req_groups:
        return np.zeros(c.shape, bool)
    same = ctx.group_as_reference(c)[:, :, [a.groups.index(g) for g in a.req_groups]]  # [b, L, Gr]
    return ((status == STATUS_FALSE) & same).any(axis=-1)


def kept_mismatch_mask(ctx, c: Candidates) -> np.ndarray:
    """bool[b, L]: the candidate satisfies the requested change (no requested group contradicted;
    unknown where the tags cannot tell) but differs from the target in a group the caption does not
    mention, i.e. it changes what the query should keep from the reference."""
    diff = ctx.group_diff(c)  # [b, L, G]
    kept = ~ctx.group_asked()[:, None, :] & ctx.group_present(c)
    return ~contradicted(ctx.status(c)) & (diff & kept).any(-1)


def with_kept_share(ctx, k: int, stream: int, share: float, caption_side) -> Picks:
    """``caption_side(k1)``'s picks (negatives that contradict the caption) on k1 of the ``k`` slots
    and the hardest kept-mismatch candidates of the query's ranking on the other ``k - k1``, k split
    by shares ``(1 - share, share)`` as a mix splits it. The two sets are disjoint (one contradicts a
    requested group, the other none), so the result equals the mix
    ``caption-strategy:(1-share),kept-mismatch:share``. Either half alone pushes the query along one
    side of the caption only; together they push on what it asks to change and on what it keeps."""
    k1, k2 = split_k(k, [1.0 - share, share])
    first = caption_side(k1)
    if k2 == 0:
        return first
    ctx.take(first)
    c = ctx.ranked
    second = pick(ctx, c, c.valid & kept_mismatch_mask(ctx, c), k2, stream, "top")
    return concat_picks([first, second], first.rows.shape[0])


def concat_picks(parts: list, b: int) -> Picks:
    if not parts:
        return Picks.empty(b)
    return Picks(
        np.concatenate([p.rows for p in parts], 1),
        np.concatenate([p.ranks for p in parts], 1),
        np.concatenate([p.scores for p in parts], 1),
    )
