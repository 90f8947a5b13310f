"""The exact re-scoring window by window (miner/core/search/_windows.c) returns gathered_dot's scores
bit for bit: rows in any order, pads, skewed and sparse rows (which fall back to one call), galleries
of one window and memory-mapped ones (never windowed), any query count; exact_rescore's top-k from the
windows' sort keys equals topk_desc of those scores; and the compiled count and place return blocks
that hold each row once, where its position says."""

import numpy as np
import pytest

from cir_mine.miner.core.search import exact
from cir_mine.miner.core.search.exact import exact_rescore, gathered_dot
from cir_mine.miner.core.search.topk import topk_desc


def windows():
    assert exact.WINDOWS is not None, "the extension is not built: run `make venv` (pip install -e .)"
    return exact.WINDOWS


def one_call(xb, rows, vec):
    """The scores of one FAISS call over every row (the windows switched off)."""
    saved = exact.WINDOWS
    exact.WINDOWS = None
    try:
        return gathered_dot(xb, rows, vec)
    finally:
        exact.WINDOWS = saved


@pytest.fixture
def small_windows(monkeypatch):
    """Windows sized by the rows a query holds alone (8 in a window), so that small galleries are
    scored window by window."""
    windows()
    monkeypatch.setattr(exact, "WINDOW_BYTES", 1)
    monkeypatch.setattr(exact, "WINDOW_MAX_BYTES", 1 << 30)


def world(seed: int, n: int, d: int, b: int, depth: int):
    rng = np.random.default_rng(seed)
    xb = rng.standard_normal((n, d)).astype(np.float32)
    xq = rng.standard_normal((b, d)).astype(np.float32)
    rows = rng.integers(0, n, (b, depth))
    return rng, xb, xq, rows


def count_windowed(monkeypatch) -> list:
    """Records whether each windowed group was scored window by window."""
    seen = []
    real = exact._dot_windowed

    def spy(*args):
        got = real(*args)
        seen.append(got is not None)
        return got

    monkeypatch.setattr(exact, "_dot_windowed", spy)
    return seen


@pytest.mark.parametrize("order", ["sorted", "unsorted"])
@pytest.mark.parametrize("d", [8, 17, 64])
def test_windows_return_the_one_call_scores_bit_for_bit(small_windows, monkeypatch, order, d):
    rng, xb, xq, rows = world(d, 1000, d, 300, 120)
    rows[rng.random(rows.shape) < 0.1] = -1  # pads anywhere
    rows[5] = -1  # a query with no rows
    if order == "sorted":
        rows.sort(1)
    seen = count_windowed(monkeypatch)
    got = gathered_dot(xb, rows, xq)
    assert seen and all(seen)
    want = one_call(xb, rows, xq)
    assert np.array_equal(got.view(np.int32), want.view(np.int32))
    assert np.all(np.isneginf(got[rows < 0]))
    # and the scores are the per-pair products (each row scored alone)
    i, j = 7, 11
    assert got[i, j] == gathered_dot(xb, rows[i : i + 1, j : j + 1], xq[i : i + 1])[0, 0]


def test_queries_go_in_groups_of_window_queries(small_windows, monkeypatch):
    monkeypatch.setattr(exact, "WINDOW_QUERIES", 37)
    _, xb, xq, rows = world(1, 800, 16, 200, 90)
    seen = count_windowed(monkeypatch)
    got = gathered_dot(xb, rows, xq)
    assert len(seen) == 6 and all(seen)
    assert np.array_equal(got.view(np.int32), one_call(xb, rows, xq).view(np.int32))


def test_skewed_rows_fall_back_to_one_call(small_windows, monkeypatch):
    _, xb, xq, rows = world(2, 4096, 16, 64, 200)
    rows[1:, 20:] = -1  # 20 rows a query, but one query holds 200 rows of one window
    rows[0] = np.arange(200)
    seen = count_windowed(monkeypatch)
    got = gathered_dot(xb, rows, xq)
    assert seen == [False]
    assert np.array_equal(got.view(np.int32), one_call(xb, rows, xq).view(np.int32))


def test_small_galleries_and_mapped_ones_are_not_windowed(small_windows, monkeypatch, tmp_path):
    monkeypatch.setattr(exact, "WINDOW_BYTES", 64 * 16 * 4)  # 64 rows of dimension 16
    _, xb, xq, rows = world(3, 60, 16, 50, 40)  # one window
    assert exact.window_shift(*xb.shape, 50, 50 * 40) is None
    seen = count_windowed(monkeypatch)
    gathered_dot(xb, rows, xq)
    _, xb2, xq2, rows2 = world(4, 1000, 16, 50, 40)
    path = tmp_path / "g.npy"
    np.save(path, xb2)
    mapped = np.load(path, mmap_mode="r")
    got = gathered_dot(mapped, rows2, xq2)
    assert seen == []
    assert np.array_equal(got.view(np.int32), one_call(xb2, rows2, xq2).view(np.int32))


def test_the_default_window_holds_a_cache_sized_block():
    windows()
    # 100k x 256, 4,096 queries of 600 rows: 2,048 rows (2 MB) a window
    assert exact.window_shift(100_000, 256, 4096, 4096 * 600) == 11
    # fewer rows a query: larger windows, up to WINDOW_MAX_BYTES
    assert exact.window_shift(300_000, 256, 4096, 4096 * 600) == 12
    # 1M x 256: 700 rows a query would need 16 MB windows (one call); 2,048 rows, 4 MB windows
    assert exact.window_shift(1_000_000, 256, 4096, 4096 * 700) is None
    assert exact.window_shift(1_000_000, 256, 256, 256 * 2048) == 12
    assert exact.window_shift(100_000, 256, 4096, 0) is None


def test_count_and_place_put_each_row_once_where_its_position_says():
    k = windows()
    rng = np.random.default_rng(5)
    b, L, shift, n = 40, 30, 4, 200
    nw = ((n - 1) >> shift) + 1
    rows = rng.integers(0, n, (b, L))
    rows[rng.random(rows.shape) < 0.2] = -1
    widths = np.empty(nw, np.int64)
    valid = k.count(rows, b, L, shift, nw, widths)
    assert valid == int((rows >= 0).sum())
    per = np.zeros((b, nw), np.int64)
    for i, j in zip(*np.nonzero(rows >= 0)):
        per[i, rows[i, j] >> shift] += 1
    assert np.array_equal(widths, per.max(0))
    base = np.zeros(nw + 1, np.int64)
    np.cumsum(widths * b, out=base[1:])
    ids, pos = np.empty(int(base[-1]), np.int64), np.empty((b, L), np.int64)
    k.place(rows, b, L, shift, nw, base[:-1], widths, ids, pos)
    ok = rows >= 0
    assert np.all(pos[~ok] == -1)
    assert np.array_equal(ids[pos[ok]], rows[ok])
    assert len(np.unique(pos[ok])) == int(ok.sum())  # each row its own slot
    assert int((ids >= 0).sum()) == int(ok.sum())  # every other slot a pad
    w = rows[ok] >> shift
    q = np.nonzero(ok)[0]
    assert np.all((pos[ok] >= base[w] + q * widths[w]) & (pos[ok] < base[w] + (q + 1) * widths[w]))


def test_the_kernels_refuse_rows_past_the_windows_and_short_buffers():
    k = windows()
    rows = np.array([[0, 5, 300]], np.int64)
    widths = np.empty(2, np.int64)
    with pytest.raises(ValueError, match="past the windows"):
        k.count(rows, 1, 3, 7, 2, widths)  # row 300 lies in window 2 of 2
    with pytest.raises(ValueError, match="widths"):
        k.count(rows, 1, 3, 9, 2, np.empty(1, np.int64))
    with pytest.raises(ValueError, match="does not fit"):
        k.place(rows, 1, 3, 9, 2, np.zeros(2, np.int64), np.array([1, 0]), np.empty(1, np.int64), np.empty(3, np.int64))


def same_top(got, want) -> bool:
    return np.array_equal(got[1], want[1]) and np.array_equal(got[0].view(np.int32), want[0].view(np.int32))


@pytest.mark.parametrize("k", [1, 40, 120])
def test_the_top_k_from_window_keys_is_topk_desc_of_the_scores(small_windows, monkeypatch, k):
    rng, xb, xq, rows = world(6, 1000, 16, 300, 120)
    xb[::50] = xb[1::50]  # equal rows: tied scores, the lower row first
    xb[7] = 0.0  # a zero row: 0.0 or -0.0, keyed as 0.0
    rows[:, :20] = np.arange(0, 1000, 50)  # the tied rows (and their equals, 1 past) in every line
    rows[:, 20:40] = np.arange(1, 1000, 50)
    rows[:, 40] = 7
    rows[rng.random(rows.shape) < 0.15] = -1  # pads anywhere
    rows[9] = -1  # a query with no rows
    seen = count_windowed(monkeypatch)
    got = exact_rescore(xb, xq, rows, k)
    assert seen and all(seen)
    want = topk_desc(one_call(xb, rows, xq), rows, k)
    assert same_top(got, want)
    tied = (got[0][:, 1:] == got[0][:, :-1]) & np.isfinite(got[0][:, 1:])
    assert k < 40 or tied.any()  # ties decided by the row
    assert np.all(got[1][9] == -1) and np.all(np.isneginf(got[0][9]))


def test_the_top_k_of_groups_that_fall_back_is_the_same(small_windows, monkeypatch):
    monkeypatch.setattr(exact, "WINDOW_QUERIES", 32)
    _, xb, xq, rows = world(7, 4096, 16, 64, 200)
    rows[32:, 20:] = -1  # the second group: 20 rows a query, one of them 200 rows of one window
    rows[32] = np.arange(200)
    seen = count_windowed(monkeypatch)
    got = exact_rescore(xb, xq, rows, 50)
    assert sorted(seen) == [False, True]  # the groups run on two threads, in either order
    assert same_top(got, topk_desc(one_call(xb, rows, xq), rows, 50))


def test_keys_and_unkey_refuse_positions_and_shapes_that_do_not_fit():
    k = windows()
    rows = np.array([0, 5, -1], np.int64)
    keys = np.empty(3, np.uint64)
    with pytest.raises(ValueError, match="out of range"):
        k.keys(np.zeros(2, np.float32), np.array([0, 2, -1], np.int64), rows, 3, keys)
    k.keys(np.array([-0.0, 1.5], np.float32), np.array([0, 1, -1], np.int64), rows, 3, keys)
    assert keys[2] == np.iinfo(np.uint64).max
    D, I = np.empty(2, np.float32), np.empty(2, np.int64)
    k.unkey(np.sort(keys), 1, 3, 2, D, I)
    assert I.tolist() == [5, 0] and D.tolist() == [1.5, 0.0] and not np.signbit(D[1])
    with pytest.raises(ValueError, match="bad shape"):
        k.unkey(keys, 1, 3, 4, D, I)
    with pytest.raises(ValueError, match="D"):
        k.unkey(keys, 1, 3, 3, D, np.empty(3, np.int64))
