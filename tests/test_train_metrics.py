"""Retrieval metrics: chunked == full matrix, and the FashionIQ / CIRR protocols on hand-made cases."""

import numpy as np
import pytest

from cir_mine.train.metrics import cirr_metrics, fashioniq_metrics, is_cirr, target_ranks


def full_matrix_ranks(q, g, target, exclude=None):
    """Reference: the whole score matrix, excluded rows dropped, position of the target in argsort."""
    S = q @ g.T
    out = []
    for i in range(len(q)):
        keep = np.ones(len(g), dtype=bool)
        if exclude is not None:
            for r in np.atleast_1d(exclude[i]):
                if r >= 0 and r != target[i]:
                    keep[r] = False
        rows = np.flatnonzero(keep)
        order = rows[np.argsort(-S[i, rows], kind="stable")]
        out.append(int(np.flatnonzero(order == target[i])[0]))
    return np.asarray(out)


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 4096])
def test_chunked_equals_full_matrix(chunk):
    rng = np.random.default_rng(0)
    q, g = unit(rng.standard_normal((37, 8))), unit(rng.standard_normal((101, 8)))
    target = rng.integers(0, 101, 37)
    exclude = np.stack([rng.integers(0, 101, 37), target, np.full(37, -1)], axis=1)  # ref, target itself, pad
    exclude[0, 1] = exclude[0, 0]  # a repeated row
    assert np.array_equal(target_ranks(q, g, target, chunk=chunk), full_matrix_ranks(q, g, target))
    assert np.array_equal(target_ranks(q, g, target, exclude, chunk=chunk), full_matrix_ranks(q, g, target, exclude))


def angles(deg):
    t = np.deg2rad(np.asarray(deg, dtype=np.float64))
    return np.stack([np.cos(t), np.sin(t)], axis=1).astype(np.float32)


def test_fashioniq_protocol_hand_made():
    # dress gallery: 60 images at 0..59 degrees, the query points at 0 degrees, so image i has rank i.
    # shirt gallery: 5 images; "B0" is listed under both categories (one product, two rows).
    g_ids = [f"D{i}" for i in range(60)] + ["S0", "S1", "S2", "S3", "D3"]
    g_cat = ["dress"] * 60 + ["shirt"] * 5
    g_emb = np.concatenate([angles(range(60)), angles([50, 10, 20, 30, 40])])
    q_emb = angles([0, 0, 0, 0])
    q_cat = np.array(["dress", "dress", "shirt", "shirt"], dtype=object)
    refs = np.array(["D0", "D1", "S0", "S2"], dtype=object)
    tgts = np.array(["D10", "D55", "D3", "S3"], dtype=object)  # ranks 10, 55 | shirt: D3 (40deg) rank 3, S3 rank 2
    m = fashioniq_metrics(q_emb, q_cat, refs, tgts, g_emb, np.array(g_ids, dtype=object), np.array(g_cat, dtype=object))
    assert m["per_category"]["dress"]["R@10"] == 0.0 and m["per_category"]["dress"]["R@50"] == 50.0
    assert m["per_category"]["shirt"]["R@10"] == 100.0 and m["per_category"]["shirt"]["R@50"] == 100.0
    assert m["R@10"] == 50.0 and m["R@50"] == 75.0 and m["protocol"] == "fashioniq"
    # excluding the reference moves D10 from rank 10 to 9 (its reference D0 scored higher)
    m = fashioniq_metrics(
        q_emb,
        q_cat,
        refs,
        tgts,
        g_emb,
        np.array(g_ids, dtype=object),
        np.array(g_cat, dtype=object),
        exclude_reference=True,
    )
    assert m["per_category"]["dress"]["R@10"] == 50.0


def test_cirr_protocol_hand_made():
    ids = np.array([f"i{k}" for k in range(8)], dtype=object)
    g = angles([0, 5, 10, 15, 20, 25, 30, 35])
    q = angles([0, 0])
    refs = np.array(["i0", "i1"], dtype=object)
    tgts = np.array(["i2", "i6"], dtype=object)
    img_set = [["i0", "i2", "i5"], ["i1", "i3", "i6", "i7"]]
    m = cirr_metrics(q, refs, tgts, img_set, g, ids)
    # query 0: i0 (ref) excluded -> i1 ahead -> rank 1; query 1: i0,i2..i5 ahead (i1 excluded) -> rank 5
    assert (m["R@1"], m["R@5"], m["R@10"], m["R@50"]) == (0.0, 50.0, 100.0, 100.0)
    # subsets: query 0 among {i2, i5} -> rank 0; query 1 among {i3, i6, i7} -> rank 1
    assert (m["Rs@1"], m["Rs@2"], m["Rs@3"]) == (50.0, 100.0, 100.0)
    assert m["avg"] == 50.0 and m["protocol"] == "cirr"


def test_protocol_choice():
    assert is_cirr(["", ""], [[], []])
    assert is_cirr(["dress"], [["a"]])
    assert not is_cirr(["dress", "shirt"], [[], []])
