"""Pure score functions: zero-shot queries, the Δ-score and the sign-safe positive-aware cap.

Conventions: ``scores`` are cosine similarities s(q, c), float32[b, depth], higher is better;
``target_score`` is s(q, t), float32[b]. Δ(c) = s(q, t) − s(q, c): Δ > 0 means the candidate ranks
below the target (an easier negative), Δ < 0 above it (a hard negative or a false negative).
"""

from __future__ import annotations

import numpy as np

from cir_mine.data.workspace import l2_normalize


def zero_shot_queries(ref_emb: np.ndarray, text_emb: np.ndarray, text_weight: float = 1.0) -> np.ndarray:
    """normalize(ref + w * text): float32[m, d] unit rows from two float32[m, d] unit-row arrays."""
    return l2_normalize(np.asarray(ref_emb, np.float32) + np.float32(text_weight) * np.asarray(text_emb, np.float32))


def delta(target_score: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Δ = s(q, t) − s(q, c): float32[b] and float32[b, depth] -> float32[b, depth]."""
    return (target_score[:, None] - scores).astype(np.float32, copy=False)


def cap_threshold(target_score: np.ndarray, rho: float) -> np.ndarray:
    """The positive-aware cap, sign-safe: s(q, t) − (1 − ρ)·|s(q, t)|, float32[b].

    Equals ρ·s(q, t) when s(q, t) >= 0 (NV-Retriever's TopK-PercPos). When s(q, t) < 0, ρ·s(q, t)
    would lie *above* the positive and let through candidates scoring higher than the target;
    this form keeps the margin below the positive whatever the sign.
    """
    t = np.asarray(target_score, dtype=np.float32)
    return (t - np.float32(1.0 - rho) * np.abs(t)).astype(np.float32)


def cap_mask(scores: np.ndarray, target_score: np.ndarray, rho: float) -> np.ndarray:
    """True where s(q, c) > cap_threshold (candidates the ρ cap drops): bool[b, depth]."""
    return scores > cap_threshold(target_score, rho)[:, None]
