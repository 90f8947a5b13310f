"""False-negative guards: masks on a query x candidate matrix, each returning (mask, n_removed).

Every mask is True where the guard *drops* a candidate. Inputs are [b, L] matrices of gallery
rows (int64, -1 = no candidate) mapped to product codes (one code per image id, so an id listed
under two categories is one product), s(q, c) scores and s(c, t) similarities. ``n_removed`` is
int64[b], the per-query count of candidates the guard flags. :func:`apply_guards` runs them in
order and counts, per guard, the candidates it removed that no earlier guard had.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cir_mine.data.errors import UsageError
from cir_mine.miner.core.scores import cap_mask

GUARDS = ("target", "reference", "extra_positive", "cap", "near_duplicate", "duplicate_product")


def _counted(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return mask, mask.sum(axis=1, dtype=np.int64)


def member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """bool mask of ``keys`` (any shape, int64) found in ``sorted_keys`` (int64[n], ascending)."""
    if sorted_keys.size == 0:
        return np.zeros(keys.shape, dtype=bool)
    idx = np.searchsorted(sorted_keys, keys)
    return sorted_keys[np.minimum(idx, sorted_keys.size - 1)] == keys


class PairSet:
    """A set of (query index, product) pairs, asked about [b, L] candidate matrices at a time.

    ``keys``: the sorted int64 pair keys (:func:`pair_keys`). When no query holds more than
    ``MAX_DENSE`` pairs, each query's products also sit in a padded matrix, and a lookup compares
    against that query's few products instead of searching the sorted keys."""

    MAX_DENSE = 32

    def __init__(self, q: np.ndarray, products: np.ndarray, m: int, n_products: int):
        q, products = np.asarray(q, np.int64), np.asarray(products, np.int64)
        self.n_products = int(n_products)
        self.keys = np.unique(pair_keys(q[:, None], products[:, None], n_products).ravel())
        q, products = self.keys // self.n_products, self.keys % self.n_products
        per = np.bincount(q, minlength=m) if q.size else np.zeros(m, np.int64)
        self.dense = None
        if int(per.max(initial=0)) <= self.MAX_DENSE:
            self.dense = np.full((m, int(per.max(initial=0))), -1, np.int64)
            if q.size:
                self.dense[q, np.arange(q.size) - np.searchsorted(q, q)] = products

    @property
    def size(self) -> int:
        return int(self.keys.size)

    def contains(self, q: np.ndarray, cand_prod: np.ndarray) -> np.ndarray:
        """bool[b, L]: (q[i], cand_prod[i, j]) is in the set (q: int64[b] query indices; a product
        of -1, an empty slot, never is)."""
        if self.keys.size == 0:
            return np.zeros(cand_prod.shape, bool)
        if self.dense is None:
            return member(pair_keys(q, cand_prod, self.n_products), self.keys) & (cand_prod >= 0)
        mine = self.dense[q]  # [b, E], each query's products first, then -1 pads
        out = np.zeros(cand_prod.shape, bool)
        held = (mine >= 0).sum(1)
        for e in range(mine.shape[1]):
            rows = np.flatnonzero(held > e)  # the queries with an e-th product
            if rows.size * 2 >= len(q):
                col = mine[:, e : e + 1]
                out |= (cand_prod == col) & (col >= 0)
            elif rows.size:  # fewer than half: compare those rows alone
                out[rows] |= cand_prod[rows] == mine[rows, e : e + 1]
            else:
                break
        return out


def pair_keys(q: np.ndarray, products: np.ndarray, n_products: int) -> np.ndarray:
    """int64 keys of (query index, product) pairs: q * n_products + product (q: int64[b] or [b, 1])."""
    q = np.asarray(q, dtype=np.int64)
    return (q.reshape(-1, 1) if q.ndim == 1 else q) * np.int64(n_products) + products


def target_guard(cand_prod: np.ndarray, target_prod: np.ndarray):
    """Never the target (compared by product: the same id under another category is the target too)."""
    return _counted(cand_prod == target_prod[:, None])


def reference_guard(cand_prod: np.ndarray, ref_prod: np.ndarray):
    """Never the reference image."""
    return _counted(cand_prod == ref_prod[:, None])


def extra_positive_guard(cand_prod: np.ndarray, q: np.ndarray, extra: "PairSet"):
    """Never an extra positive (CIRR target_soft >= 0.5, synthetic exact twins).

    ``extra``: every query's extra positives (:class:`PairSet`)."""
    return _counted(extra.contains(q, cand_prod))


def near_duplicate_guard(sim_target: np.ndarray, threshold: float | None):
    """Never a near-duplicate of the target: s(c, t) >= threshold (None disables)."""
    if threshold is None:
        return _counted(np.zeros(sim_target.shape, dtype=bool))
    return _counted(sim_target >= threshold)


def cap_guard(scores: np.ndarray, target_score: np.ndarray, rho: float | None):
    """Positive-aware cap (TopK-PercPos), sign-safe: drop s(q, c) > s(q,t) − (1−ρ)|s(q,t)| (None disables)."""
    if rho is None:
        return _counted(np.zeros(scores.shape, dtype=bool))
    return _counted(cap_mask(scores, target_score, rho))


def duplicate_product_guard(cand_prod: np.ndarray, valid: np.ndarray):
    """Keep only the first valid occurrence of a product in each row (an id in two categories,
    or a random draw that repeats): the later ones are dropped."""
    b, L = cand_prod.shape
    if L < 2:
        return _counted(np.zeros((b, L), dtype=bool))
    big = np.iinfo(np.int64).max
    key = np.where(valid, cand_prod, big)
    order = np.argsort(key, axis=1, kind="stable")  # equal products keep column order
    sk = np.take_along_axis(key, order, axis=1)
    dup_sorted = np.zeros((b, L), dtype=bool)
    dup_sorted[:, 1:] = (sk[:, 1:] == sk[:, :-1]) & (sk[:, 1:] != big)
    dup = np.zeros((b, L), dtype=bool)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    return _counted(dup)


NEAR_DUPLICATE = 0.98  # cosine similarity at or above which two images count as near-duplicates


@dataclass(frozen=True)
class GuardConfig:
    """Every false-negative guard's switch and threshold (the mining core's one guard config)."""

    # fmt: off
    exclude_target: bool = True           # never the target
    exclude_reference: bool = True        # never the reference
    exclude_extra_positives: bool = True  # never an extra positive
    dup_threshold: float | None = NEAR_DUPLICATE  # near-duplicate guard: drop candidates with s(c, t) >= this
                                                  # (None: off)
    rho: float | None = 0.95              # positive-aware cap, sign-safe: drop s(q,c) > s(q,t) - (1-rho)|s(q,t)|
                                          # (None: off)
    trust_verified: bool = True           # annotator-verified negatives skip the cap and near-dup guards
    # fmt: on

    def validate(self) -> "GuardConfig":
        if self.rho is not None and not 0 < self.rho <= 1:
            raise UsageError(
                f"rho must be in (0, 1] (got {self.rho}); switch the cap off with rho=None.", params=("rho", "rho=None")
            )
        return self


def apply_guards(
    cand_rows,
    cand_prod,
    scores,
    sim_target_fn,
    target_score,
    target_prod,
    ref_prod,
    q,
    extra: "PairSet",
    verified: "PairSet",
    cfg: GuardConfig,
    distinct_products: bool = False,
):
    """All guards on one candidate matrix, in order: target, reference, extra positive, cap,
    near-duplicate, duplicate product. Returns (valid bool[b, L], {guard: int64[b]}), where each
    count is the candidates that guard removed and no earlier guard had.

    ``cand_rows`` < 0 marks empty slots (never valid, never counted). ``sim_target_fn(mask)`` returns
    s(c, t) as float32[b, L], needed only where ``mask`` is True (the survivors of the cheaper guards),
    so the near-duplicate check gathers embeddings for those alone. ``distinct_products``: no row
    holds a product twice (distinct rows of a gallery with one product per row), so the
    duplicate-product guard has nothing to find and is skipped."""
    drop = cand_rows < 0
    counts = {}
    verified = verified.contains(q, cand_prod) if cfg.trust_verified and verified.size else None

    def apply(name, mask, exempt_verified=False):
        nonlocal drop
        if exempt_verified and verified is not None:
            mask = mask & ~verified
        new = mask & ~drop
        counts[name] = new.sum(axis=1, dtype=np.int64)
        drop = drop | new

    zeros = lambda: np.zeros(cand_rows.shape, dtype=bool)
    apply("target", target_guard(cand_prod, target_prod)[0] if cfg.exclude_target else zeros())
    apply("reference", reference_guard(cand_prod, ref_prod)[0] if cfg.exclude_reference else zeros())
    apply("extra_positive", extra_positive_guard(cand_prod, q, extra)[0] if cfg.exclude_extra_positives else zeros())
    apply("cap", cap_guard(scores, target_score, cfg.rho)[0], exempt_verified=True)
    if cfg.dup_threshold is not None:
        apply("near_duplicate", near_duplicate_guard(sim_target_fn(~drop), cfg.dup_threshold)[0], exempt_verified=True)
    else:
        counts["near_duplicate"] = np.zeros(cand_rows.shape[0], np.int64)
    if distinct_products:
        counts["duplicate_product"] = np.zeros(cand_rows.shape[0], np.int64)
        return ~drop, counts
    dup, counts["duplicate_product"] = duplicate_product_guard(cand_prod, ~drop)
    return ~(drop | dup), counts


# guard -> (what it is, what to do), for the shortfall hints; target and reference remove one
# candidate each at most and have no knob.
_KNOBS = {
    "cap": (
        "the positive-aware cap",
        "loosen MineConfig.of(rho=...) (now {rho}; nearer 1 keeps more) or switch it off, MineConfig.of(rho=None)",
    ),
    "near_duplicate": (
        "the near-duplicate guard",
        "raise MineConfig.of(dup_threshold=...) (now {dup_threshold}) or switch it off, "
        "MineConfig.of(dup_threshold=None)",
    ),
    "extra_positive": (
        "the extra-positive guard",
        "these are other correct targets: keep the guard and lower MineConfig.of(k=...)",
    ),
    "duplicate_product": (
        "the duplicate-product guard",
        "repeated draws or ids in two categories: raise MineConfig.of(candidates=...) or lower MineConfig.of(k=...)",
    ),
}


def shortfall_hints(removed: dict, missing: int, cfg: GuardConfig, strategy_hints=()) -> list[str]:
    """What to loosen for the queries that got fewer than k negatives, most likely cause first.

    removed: {guard: candidates it removed, summed over those queries}; missing: negatives they lack.
    One hint per guard that removed any, e.g. ``"the positive-aware cap removed 1,072: loosen
    MineConfig.of(rho=...) (now 0.95; ...)"``, by count (parameters named as the API sets them; the
    CLI shows its flags, :func:`cir_mine.data.errors.spell_calls`). A guard that removed at least ``missing`` candidates can explain the
    shortfall alone and comes before ``strategy_hints`` (the strategies' own filters); the others after."""
    major, minor = [], []
    for name, n in sorted(removed.items(), key=lambda kv: (-kv[1], GUARDS.index(kv[0]))):
        if n > 0 and name in _KNOBS:
            what, fix = _KNOBS[name]
            hint = f"{what} removed {int(n):,}: " + fix.format(rho=cfg.rho, dup_threshold=cfg.dup_threshold)
            (major if n >= missing else minor).append(hint)
    return major + list(strategy_hints) + minor
