"""The list-major IVF kernel's compiled selection and scatter (miner/core/search/_lists.c) against the
numpy code they replace (miner/core/search/lists.py): each query's k best scores and their rows
(tie-aware: the same scores; the same rows above the k-th score), columns copied bit for bit, and
buffers or lists out of range refused before anything is read or written."""

from types import SimpleNamespace

import numpy as np
import pytest

from cir_mine.miner.core.search import lists as lists_mod
from cir_mine.miner.core.search.lists import ListLayout, coarse_assign, ivf_flat_lists, list_major_search

pytestmark = pytest.mark.skipif(lists_mod.KERNEL is None, reason="the compiled list kernel is not built")


def _world(rng, m, p, nlist=30, longest=50):
    """A pass: list sizes (one list empty), a layout, each query's probe slots (-1: none), the
    slots' sizes C and each query's segment length T."""
    sizes = rng.integers(0, longest, nlist)
    sizes[rng.integers(0, nlist)] = 0
    layout = SimpleNamespace(
        sizes=sizes, starts=(np.cumsum(sizes) - sizes).astype(np.int64), ids=rng.permutation(int(sizes.sum()))
    )
    A = np.stack([rng.choice(nlist, p, replace=False) for _ in range(m)]).astype(np.int64)
    A[rng.random(A.shape) < 0.1] = -1
    C = np.where(A >= 0, sizes[np.maximum(A, 0)], 0)
    return layout, A, C, C.sum(1)


def _both(monkeypatch, *args):
    got = lists_mod._top_of_segments(*args)
    with monkeypatch.context() as mp:
        mp.setattr(lists_mod, "KERNEL", None)
        want = lists_mod._top_of_segments(*args)
    return got, want


def _same_best(got, want):
    """The same scores per query, and the same rows wherever a score is above the query's k-th."""
    (Dg, Ig), (Dw, Iw) = got, want
    assert Dg.dtype == np.float32 and Ig.dtype == np.int64 and Dg.shape == Dw.shape
    for q in range(len(Dg)):
        assert np.array_equal(np.sort(Dg[q]), np.sort(Dw[q]))
        assert ((Ig[q] >= 0) == np.isfinite(Dg[q])).all()
        kth = Dg[q].min()
        assert set(Ig[q][Dg[q] > kth]) == set(Iw[q][Dw[q] > kth])
        assert np.unique(Ig[q][Ig[q] >= 0]).size == (Ig[q] >= 0).sum()


@pytest.mark.parametrize("scores", ["normal", "ties", "constant", "negative", "sample_holds_the_best"])
@pytest.mark.parametrize("ordered", [True, False])
def test_compiled_selection_keeps_the_numpy_best(monkeypatch, scores, ordered):
    """Short segments (all kept, -inf / -1 after), empty ones, long ones (the histogram's range
    select) and every k against the full partition's best, through the probe slots to the rows."""
    rng = np.random.default_rng(["normal", "ties", "constant", "negative", "sample_holds_the_best"].index(scores))
    for trial in range(40):
        longest = 50 if trial % 2 else 2000
        layout, A, C, T = _world(rng, int(rng.integers(1, 12)), int(rng.integers(1, 6)), longest=longest)
        buf = rng.standard_normal(int(T.sum())).astype(np.float32)
        if scores == "ties":
            buf = np.round(buf * 2).astype(np.float32)
        if scores == "constant":
            buf[:] = 0.25
        if scores == "negative":
            buf = -np.abs(buf) - 3
        if scores == "sample_holds_the_best":  # the threshold leaves fewer than k: the whole segment
            buf[:: lists_mod.SAMPLE_STRIDE] += 100
        for k in (1, 3, int(rng.integers(1, 400)), 700):
            got, want = _both(monkeypatch, buf, layout, A, C, T, k, ordered)
            _same_best(got, want)
            if ordered:
                assert np.array_equal(got[0], want[0])


def test_ties_at_the_cut_keep_the_lower_positions(monkeypatch):
    """The compiled selection breaks ties at the k-th score by position: the first tied ones."""
    layout = SimpleNamespace(sizes=np.array([600]), starts=np.array([0]), ids=np.arange(600, dtype=np.int64) + 1000)
    buf = np.zeros(600, np.float32)
    buf[[10, 400]] = 1.0
    D, I = lists_mod._top_of_segments(buf, layout, np.array([[0]]), np.array([[600]]), np.array([600]), 5, True)
    assert D.tolist() == [[1, 1, 0, 0, 0]] and I.tolist() == [[1010, 1400, 1000, 1001, 1002]]


def test_scatter_copies_each_column_to_its_segment():
    rng = np.random.default_rng(2)
    for size, m in ((0, 3), (5, 1), (257, 11), (30, 64)):
        S = rng.standard_normal((size, m)).astype(np.float32)
        dst = rng.permutation(m).astype(np.int64) * size
        buf, ref = np.zeros(size * m + 7, np.float32), np.zeros(size * m + 7, np.float32)
        lists_mod.KERNEL.scatter(S, size, m, dst, buf)
        ref[dst + np.arange(size)[:, None]] = S
        assert np.array_equal(buf.view(np.uint32), ref.view(np.uint32))


def test_the_kernels_refuse_what_lies_outside_their_buffers():
    K = lists_mod.KERNEL
    i64 = lambda *v: np.array(v, np.int64)
    buf, D, I = np.zeros(10, np.float32), np.empty((1, 2), np.float32), np.empty((1, 2), np.int64)
    ok = (buf, i64(0), i64(10), i64(0), i64(0), i64(0), i64(*range(10)), 1, 1, 2, 8, 4, D, I)
    K.top(*ok)
    bad = {
        1: i64(5),  # the segment runs past the buffer
        3: i64(-1),  # a slot before its segment
        4: i64(3),  # a list the layout does not hold
        6: i64(*range(9)),  # a list running past the ids
    }
    for at, value in bad.items():
        with pytest.raises(ValueError):
            K.top(*ok[:at], value, *ok[at + 1 :])
    with pytest.raises(ValueError):
        K.top(*ok[:12], np.empty((1, 1), np.float32), I)  # D shorter than m x k
    with pytest.raises(ValueError):
        K.scatter(np.zeros((4, 2), np.float32), 4, 2, i64(0, 7), np.zeros(10, np.float32))
    with pytest.raises(ValueError):
        K.scatter(np.zeros((4, 2), np.float32), 4, 3, i64(0, 4, 8), np.zeros(20, np.float32))


def test_list_major_search_is_the_same_with_and_without_the_kernels(monkeypatch):
    """The whole search (scatter and selection) with the compiled kernels and with numpy: the same
    scores bit for bit and the same rows (tie-aware), ordered or not."""
    import faiss
    from faiss.contrib.evaluation import check_ref_knn_with_draws

    rng = np.random.default_rng(8)
    xb = rng.standard_normal((5000, 16)).astype(np.float32)
    xb[4000:] = xb[:1000]  # twins: ties at every depth
    index = faiss.index_factory(16, "IVF30,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(xb)
    index.add(xb)
    ivf = ivf_flat_lists(index)
    layout = ListLayout.of(ivf)
    xq = rng.standard_normal((150, 16)).astype(np.float32)
    _, assign = coarse_assign(ivf, xq, 6, layout.centroids)
    assign[::7, -1] = -1
    for k in (1, 40, 900, 3000):
        got = list_major_search(ivf, xq, k, assign, layout, budget=20_000)
        with monkeypatch.context() as mp:
            mp.setattr(lists_mod, "KERNEL", None)
            want = list_major_search(ivf, xq, k, assign, layout, budget=20_000)
        assert np.array_equal(got[0].view(np.uint32), want[0].view(np.uint32))
        ok = want[1] >= 0
        assert ((got[1] >= 0) == ok).all()
        check_ref_knn_with_draws(
            np.where(ok, want[0], -1e30), want[1], np.where(ok, got[0], -1e30), got[1], rtol=0, atol=0
        )
