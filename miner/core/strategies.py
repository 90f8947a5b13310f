"""Negative-sampling strategies: a registry of small functions with one signature.

``fn(ctx, k, salt) -> Picks``: ``ctx`` is the batch context built by :mod:`cir_mine.miner.core.mine` (guarded
candidate matrices for a batch of b queries, see :class:`cir_mine.miner.core.mine.BatchContext`), ``k`` the
number of negatives this strategy contributes per query, ``salt`` an int that keeps the random
streams of mix parts apart. A strategy picks at most ``k`` negatives per query and never pads:
slots it cannot fill stay -1 and show up as shortfall. Candidates already picked by an earlier
part of a mix are unavailable (``ctx.available``). Random choices use keys hashed from
(seed, query_id, gallery row, salt), so rows do not depend on the batch size.
See docs/strategies.md for definitions and references.
"""
from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from cir_mine.data.errors import UsageError

from cir_mine.miner.core.attribute_codes import STATUS_FALSE, STATUS_TRUE

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorized SplitMix64 finalizer on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + _M1
        z = (z ^ (z >> np.uint64(30))) * _M2
        z = (z ^ (z >> np.uint64(27))) * _M3
        return z ^ (z >> np.uint64(31))


def hash_keys(qhash: np.ndarray, values: np.ndarray, salt: int) -> np.ndarray:
    """uint64 keys for (query, value): ``qhash`` uint64[b], ``values`` int64[b, L] -> uint64[b, L]."""
    v = splitmix64(values.astype(np.uint64) ^ splitmix64(np.uint64(salt) + np.zeros(1, np.uint64)))
    return splitmix64(qhash[:, None] ^ v)


@dataclass
class Candidates:
    """A guarded candidate matrix for b queries."""

    rows: np.ndarray            # int64[b, L] gallery rows (-1 = empty)
    product: np.ndarray         # int64[b, L] product code of each row
    scores: np.ndarray          # float32[b, L] s(q, c)
    ranks: np.ndarray           # int32[b, L] rank in the search (-1: not from the ranking)
    delta: np.ndarray           # float32[b, L] s(q, t) - s(q, c)
    valid: np.ndarray           # bool[b, L] passed every guard

    @property
    def shape(self):
        return self.rows.shape


@dataclass
class Picks:
    rows: np.ndarray            # int64[b, k] picked gallery rows (-1 = unfilled)
    ranks: np.ndarray           # int32[b, k]
    scores: np.ndarray          # float32[b, k] s(q, neg)

    @classmethod
    def empty(cls, b: int) -> "Picks":
        return cls(np.full((b, 0), -1, np.int64), np.full((b, 0), -1, np.int32), np.zeros((b, 0), np.float32))


def select(c: Candidates, eligible: np.ndarray, k: int, key: Optional[np.ndarray] = None) -> Picks:
    """Up to ``k`` eligible candidates per row, smallest ``key`` first (default: column order).

    ``key``: [b, L] numbers (uint64 hash keys for uniform sampling, -s(c,t) for closeness, ...)."""
    b, L = c.shape
    k_eff = min(k, L)
    if key is None:
        key = np.broadcast_to(np.arange(L, dtype=np.int64), (b, L))
    fill = np.iinfo(key.dtype).max if np.issubdtype(key.dtype, np.integer) else np.inf
    key = np.where(eligible, key, fill)
    order = np.argsort(key, axis=1, kind="stable")[:, :k_eff]
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


def pick(ctx, c: Candidates, eligible: np.ndarray, k: int, salt: int, default: str,
         key: Optional[np.ndarray] = None) -> Picks:
    """Select with the configured order: 'top' (ranking order), 'random' (uniform) or ``key``."""
    order = ctx.cfg.sample or default
    if key is None and order == "random":
        key = ctx.random_keys(c, salt)
    return select(c, eligible & ctx.available(c), k, key)


# ------------------------------------------------------------------------------------------------
# Strategies


def random(ctx, k, salt):
    """Uniform over the gallery (guards applied)."""
    c = ctx.random_candidates("all", k, salt)
    return select(c, c.valid & ctx.available(c), k)


def in_batch(ctx, k, salt):
    """Trainer-side: the other targets of the training batch. The miner picks nothing."""
    return Picks.empty(len(ctx.q))


def hardest(ctx, k, salt):
    """Top of the ranking within the rank window [range_min, range_max)."""
    c = ctx.ranked
    cfg = ctx.cfg
    win = c.ranks >= cfg.range_min
    if cfg.range_max is not None:
        win &= c.ranks < cfg.range_max
    return pick(ctx, c, c.valid & win, k, salt, "top")


def semihard(ctx, k, salt):
    """FaceNet semi-hard: ranks below the target but within the margin, 0 < Δ < margin."""
    c = ctx.ranked
    return pick(ctx, c, c.valid & (c.delta > 0) & (c.delta < ctx.cfg.margin), k, salt, "random")


def midzone(ctx, k, salt):
    """Target-relative mid-zone (DQE-CIR): delta_lo <= Δ <= delta_hi, sampled uniformly in the zone."""
    c = ctx.ranked
    zone = (c.delta >= ctx.cfg.delta_lo) & (c.delta <= ctx.cfg.delta_hi)
    return pick(ctx, c, c.valid & zone, k, salt, "random")


def category(ctx, k, salt):
    """Stratified random: same category as the target (different item), other category, any image."""
    shares = ctx.cfg.category_shares
    ks = split_k(k, list(shares))
    parts = []
    for kind, ki, s in zip(("same-cat", "other-cat", "all"), ks, range(3)):
        if ki == 0:
            continue
        c = ctx.random_candidates(kind, ki, salt * 8 + s + 1)
        p = select(c, c.valid & ctx.available(c), ki)
        ctx.take(p)
        parts.append(p)
    return concat_picks(parts, len(ctx.q))


def _contradicted(st: np.ndarray) -> np.ndarray:
    return (st == STATUS_FALSE).any(axis=-1)


def category_discrepant(ctx, k, salt):
    """Visually near the target (highest s(c, t) first) but contradicting a requested attribute.

    Candidates: the target's own nearest neighbours (``discrepant_pool='target'``, a second search)
    or the query's ranking ('query')."""
    c = ctx.target_neighbors() if ctx.cfg.discrepant_pool == "target" else ctx.ranked
    st = ctx.status(c)
    sim_t = ctx.sim_target_full(c)
    return pick(ctx, c, c.valid & _contradicted(st), k, salt, "top", key=-sim_t)


def attribute_mismatch(ctx, k, salt):
    """Agrees with the target outside the requested groups (share >= attr_agree of the groups either
    image has) and differs from it in a requested group that the candidate contradicts."""
    c = ctx.ranked
    st = ctx.status(c)
    diff = ctx.group_diff(c)                                   # [b, L, G]
    asked = ctx.group_asked()[:, None, :]                     # [b, 1, G]
    diff_asked = (diff & asked).any(axis=-1)
    present = ctx.group_present(c)                            # [b, L, G] either image has the group
    other = present & ~asked
    n_other = other.sum(-1)
    agree = np.where(n_other > 0, (other & ~diff).sum(-1) / np.maximum(n_other, 1), 1.0)
    # where no image carries a requested group as a raw group (FashionIQ tags name other groups than
    # captions), the contradiction itself is the difference
    asked_present = (present & asked).any(axis=-1)
    ok = (diff_asked | ~asked_present) & _contradicted(st) & (agree >= ctx.cfg.attr_agree - 1e-9)
    return pick(ctx, c, c.valid & ok, k, salt, "top")


def soft(ctx, k, salt):
    """Partial attribute match: soft_lo < overlap(c, t) < soft_hi (Jaccard on attributes)."""
    c = ctx.ranked
    ov = ctx.overlap(c)
    return pick(ctx, c, c.valid & (ov > ctx.cfg.soft_lo) & (ov < ctx.cfg.soft_hi), k, salt, "top")


def semantic(ctx, k, salt):
    """Near the query but not satisfying the modification: no requested group satisfied, one contradicted."""
    c = ctx.ranked
    st = ctx.status(c)
    ok = _contradicted(st) & ~(st == STATUS_TRUE).any(axis=-1)
    return pick(ctx, c, c.valid & ok, k, salt, "top")


def verified(ctx, k, salt):
    """Annotator-verified negatives (CIRR target_soft = -1), in the order the dataset lists them."""
    c = ctx.verified_candidates()
    return select(c, c.valid & ctx.available(c), k)


@dataclass(frozen=True)
class Strategy:
    fn: Callable                 # fn(ctx, k, salt) -> Picks
    ranked: bool                 # needs the query's FAISS ranking
    attributes: bool = False     # needs requested attributes
    hint: str = ""               # the knob to loosen on shortfall


REGISTRY: dict[str, Strategy] = {
    "random": Strategy(random, False, hint="a larger gallery"),
    "in-batch": Strategy(in_batch, False),
    "hardest": Strategy(hardest, True, hint="raise --range-max/--max-candidates or --rho"),
    "semihard": Strategy(semihard, True, hint="raise --margin or --max-candidates"),
    "midzone": Strategy(midzone, True, hint="widen --delta-lo/--delta-hi or raise --max-candidates"),
    "category": Strategy(category, False, hint="change --category-shares"),
    "category-discrepant": Strategy(category_discrepant, True, True, hint="raise --max-candidates (queries without requested attributes get none)"),
    "attribute-mismatch": Strategy(attribute_mismatch, True, True, hint="lower --attr-agree or raise --max-candidates"),
    "soft": Strategy(soft, True, True, hint="widen --soft-lo/--soft-hi or raise --max-candidates"),
    "semantic": Strategy(semantic, True, True, hint="raise --max-candidates (queries without requested attributes get none)"),
    "verified": Strategy(verified, False, hint="only datasets with verified negatives (CIRR target_soft = -1) have them"),
}


def concat_picks(parts: list, b: int) -> Picks:
    if not parts:
        return Picks.empty(b)
    return Picks(np.concatenate([p.rows for p in parts], 1), np.concatenate([p.ranks for p in parts], 1),
                 np.concatenate([p.scores for p in parts], 1))


# ------------------------------------------------------------------------------------------------
# Mixes


def parse_mix(spec: str) -> list[tuple[str, float]]:
    """'midzone:0.6,category:0.3,random:0.1' (or one name) -> [(name, share)], shares summing to 1."""
    parts = []
    items = [s.strip() for s in str(spec).split(",")]
    if len(items) > 1 and not all(items):
        raise UsageError(f"empty entry in mix {spec!r}: use NAME:SHARE,NAME:SHARE, e.g. midzone:0.6,random:0.4.")
    for item in [s for s in items if s]:
        name, sep, share = item.partition(":")
        name = name.strip()
        if name not in REGISTRY:
            raise UsageError(f"unknown strategy {name!r} in {spec!r}: use one of {', '.join(REGISTRY)}.")
        try:
            w = float(share) if sep else 1.0
        except ValueError:
            raise UsageError(f"bad share {share!r} for {name} in {spec!r}: use NAME:SHARE, e.g. midzone:0.6.") from None
        if not w > 0:
            raise UsageError(f"share of {name} in {spec!r} must be positive.")
        if not math.isfinite(w):
            raise UsageError(f"share of {name} in {spec!r} must be a finite number.")
        if any(n == name for n, _ in parts):
            raise UsageError(f"strategy {name} appears twice in {spec!r}.")
        parts.append((name, w))
    if not parts:
        raise UsageError(f"empty mix {spec!r}: use e.g. midzone:0.6,category:0.3,random:0.1.")
    total = sum(w for _, w in parts)
    if abs(total - 1.0) < 1e-9:
        return parts
    return [(n, w / total) for n, w in parts]


def split_k(k: int, shares: list[float]) -> list[int]:
    """Split k by shares: floors, then the remainder to the largest fractions (ties: earlier part)."""
    raw = [k * s for s in shares]
    base = [int(np.floor(r + 1e-9)) for r in raw]
    rest = k - sum(base)
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - base[i]), i))
    for i in order[:rest]:
        base[i] += 1
    return base
