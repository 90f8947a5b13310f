"""The bfloat16 scan's survivor kernels (miner/accel/_survivors.c) return the numpy code's arrays,
element for element, on every instruction set this CPU runs: blocks of every width, thresholds of
every sign (+0 and -0, NaN patterns, subnormals), outputs that overflow their first guess, heavy
queries, histograms past HIST_LEVELS; the sample threshold's radix select returns torch's top-k
values; and the scan through them returns the same rows and bounds."""

import numpy as np
import pytest
import torch

from cir_mine.miner.accel import survivors
from cir_mine.miner.accel.bf16 import Bf16Scan
from cir_mine.miner.accel.survivors import HIST_LEVELS, Survivors, key_value

ISAS = {"scalar": 1, "avx2": 2, "avx512bw": 3}


def kernels():
    assert survivors.KERNELS is not None, "the extension is not built: run `make venv` (pip install -e .)"
    return survivors.KERNELS


def isas() -> list:
    return [ISAS[name] for name in kernels().isas()]


def bf16_bits(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(torch.bfloat16).view(torch.int16).numpy()


def block(rng, b: int, w: int, extremes: bool = True) -> np.ndarray:
    """int16[b, w] bfloat16 patterns: scores, exact zeros of both signs, subnormals and (``extremes``)
    NaNs, infinities and the largest finite values."""
    S = bf16_bits(rng.standard_normal((b, w)) * 0.3)
    special = [0, -32768, 1, -32767] + ([0x7FC0, -64, 0x7F7F, -129, 0x7F80, -128] if extremes else [])
    special = np.array(special, np.int16)
    at = rng.random((b, w)) < 0.05
    S[at] = rng.choice(special, int(at.sum()))
    return S


def thresholds(rng, m: int, kind: str) -> np.ndarray:
    if kind == "positive":
        return rng.uniform(0.2, 0.6, m)
    if kind == "negative":
        return rng.uniform(-0.6, -0.1, m)
    if kind == "zero":  # +0, and thresholds below the smallest positive bfloat16
        return np.where(rng.random(m) < 0.5, 0.0, 1e-42)
    return rng.uniform(-0.4, 0.4, m)  # mixed signs in one part


def held(s: Survivors) -> tuple:
    q, k, r = (np.concatenate(v) if v else np.empty(0) for v in (s.q, s.k, s.r))
    return q, k, r


@pytest.mark.parametrize("kind", ["positive", "negative", "zero", "mixed"])
@pytest.mark.parametrize("w", [1, 15, 16, 31, 32, 33, 100, 257])
def test_take_matches_numpy_on_every_instruction_set(kind, w):
    rng = np.random.default_rng(w)
    b = 37
    S = block(rng, b, w)
    M = np.empty((b, w), bool)
    for a, e in ((0, b), (5, 23), (36, 37)):
        low = thresholds(rng, e - a, kind)
        ref = Survivors(a, e, low, 10**9, kernels=None)
        ref.take(S, M, 1000)
        for isa in isas() + [0]:
            got = Survivors(a, e, low, 10**9, isa=isa)
            got.take(S, M, 1000)
            for x, y in zip(held(got), held(ref)):
                assert x.dtype == y.dtype and np.array_equal(x, y), (kind, w, a, e, isa)


def test_take_runs_again_when_its_first_guess_is_too_small():
    rng = np.random.default_rng(3)
    S = block(rng, 64, 300)
    M = np.empty(S.shape, bool)
    low = thresholds(rng, 64, "mixed")
    ref = Survivors(0, 64, low, 10**9, kernels=None)
    got = Survivors(0, 64, low, 10**9)
    for start in (0, 300, 600):
        ref.take(S, M, start)
        got._guess = 1  # every block overflows its first output
        got.take(S, M, start)
    assert got._guess > 1
    for x, y in zip(held(got), held(ref)):
        assert np.array_equal(x, y)


def band(v, q):
    return 0.01 + 0.004 * np.abs(v)


def mined(kernels_: str | None, S_blocks, low, ranks, cap, t):
    s = Survivors(0, len(low), low, cap, kernels=kernels_)
    M = np.empty(S_blocks[0].shape, bool)
    for i, S in enumerate(S_blocks):
        s.take(S, M, i * S.shape[1])
    return s.select(ranks, t, band), s.heavy


@pytest.mark.parametrize("kind", ["positive", "negative", "mixed"])
@pytest.mark.parametrize("cap", [10**6, 10])
def test_select_matches_numpy(kind, cap):
    """Levels, the short queries, τ and the rows at two ranks; with a cap that makes heavy queries."""
    rng = np.random.default_rng(len(kind) + cap)
    m, w = 50, 64
    blocks = [block(rng, m, w, extremes=False) for _ in range(4)]
    if kind == "negative":  # every score below zero (a histogram from a negative threshold past zero overflows)
        blocks = [np.where(S > 0, S | np.int16(-32768), S) for S in blocks]
    low = thresholds(rng, m, kind)
    t = low + 0.05
    for ranks in ((8,), (20, 5), (1,)):
        (short_n, cuts_n), heavy_n = mined(None, blocks, low, ranks, cap, t)
        (short_c, cuts_c), heavy_c = mined("compiled", blocks, low, ranks, cap, t)
        assert np.array_equal(heavy_n, heavy_c) and np.array_equal(short_n, short_c)
        assert 0 < short_n.sum() < m or cap == 10 or ranks == (1,)
        for (tau_n, rows_n), (tau_c, rows_c) in zip(cuts_n, cuts_c):
            assert np.array_equal(tau_n, tau_c) and np.array_equal(rows_n, rows_c)
    if cap == 10:
        assert heavy_n.any()


def test_select_matches_numpy_past_the_histograms_levels():
    """Survivors spread over more than HIST_LEVELS bfloat16 levels above their thresholds."""
    rng = np.random.default_rng(7)
    m, w = 8, 512
    S = bf16_bits(rng.uniform(1e-30, 1e30, (m, w)) * np.where(rng.random((m, w)) < 0.5, 1, 1e-20))
    low = np.full(m, 1e-35)
    s = Survivors(0, m, low, 10**9, kernels=None)
    s.take(S, np.empty(S.shape, bool), 0)
    levels = s._levels_numpy((4,))[0]
    assert levels == HIST_LEVELS
    for ranks in ((4,), (200, 3)):
        (sn, cn), _ = mined(None, [S], low, ranks, 10**9, low)
        (sc, cc), _ = mined("compiled", [S], low, ranks, 10**9, low)
        assert np.array_equal(sn, sc)
        for (a, b), (c, d) in zip(cn, cc):
            assert np.array_equal(a, c) and np.array_equal(b, d)


def test_an_empty_part_and_no_survivors():
    for m, w in ((0, 16), (4, 16)):
        S = np.full((m, w), -300, np.int16)  # negative scores only
        low = np.full(m, 0.5)
        (sn, cn), _ = mined(None, [S], low, (3,), 10**9, low)
        (sc, cc), _ = mined("compiled", [S], low, (3,), 10**9, low)
        assert np.array_equal(sn, sc) and sn.all()
        assert cn[0][1].shape == cc[0][1].shape == (m, 0)


def test_the_kernels_refuse_buffers_too_small_and_unknown_instruction_sets():
    k = kernels()
    S = np.zeros((4, 32), np.int16)
    low = np.ones(4, np.int32)
    q, kk, r = np.empty(8, np.int32), np.empty(8, np.int32), np.empty(8, np.int64)
    with pytest.raises(ValueError, match="scores"):
        k.take(S[:2], 32, 0, 4, 32, low, 0, q, kk, r, 0)
    with pytest.raises(ValueError, match="thresholds"):
        k.take(S, 32, 0, 4, 32, low[:2], 0, q, kk, r, 0)
    with pytest.raises(ValueError, match="rows"):
        k.take(S, 32, 0, 4, 32, low, 0, q, kk, r[:2], 0)
    with pytest.raises(ValueError, match="instruction set"):
        k.take(S, 32, 0, 4, 32, low, 0, q, kk, r, 9)
    with pytest.raises(ValueError, match="out of range"):
        k.levels(np.array([5], np.int32), np.array([1], np.int32), low, 16, np.array([1]), np.empty(4, np.int64),
                 np.empty(4, np.int64))  # fmt: skip
    with pytest.raises(ValueError, match="rank"):
        k.kth(S, 32, 0, 4, 32, 33, np.empty(4, np.int32))
    with pytest.raises(ValueError, match="out"):
        k.kth(S, 32, 0, 4, 32, 3, np.empty(2, np.int32))
    with pytest.raises(ValueError, match="width"):
        k.rows(np.zeros(3, np.int32), np.ones(3, np.int32), np.arange(3), np.zeros(4, np.int32),
               np.empty(4, np.int64), np.empty(8, np.int64), 2)  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1])
def test_the_scan_returns_the_same_rows_through_the_kernels_and_numpy(monkeypatch, seed):
    rng = np.random.default_rng(seed)
    xb = rng.standard_normal((5000, 32)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xb[rng.integers(0, 5000, 300)] + 0.5 * rng.standard_normal((300, 32)).astype(np.float32)
    xq[::9] *= -1
    scan = Bf16Scan(xb, block_rows=1500)
    got = scan(xq, 60, k=40, near=10)
    monkeypatch.setattr(survivors, "KERNELS", None)
    want = scan(xq, 60, k=40, near=10)
    for x, y in zip(got, want):
        assert np.array_equal(x, y)


@pytest.mark.parametrize("w", [1, 2, 7, 64, 6250])
def test_kth_is_the_rth_largest_key_of_each_row(w):
    """The sample threshold's radix select equals a sort of the keys (NaN patterns aside: the
    scan's inputs are checked finite), at every rank, with ties, ±0, subnormals and infinities."""
    from cir_mine.miner.accel.survivors import bf16_key

    rng = np.random.default_rng(w)
    S = block(rng, 40, w, extremes=False)
    S[::5] = S[::5, :1]  # rows of one value: ties at every rank
    S[1, : w // 2] = 0x7F80  # +inf
    S[2, : w // 2] = -128  # -inf (0xFF80)
    keys = np.sort(bf16_key(S), axis=1)
    for r in sorted({r for r in (1, 2, w // 2 or 1, w) if r <= w}):
        out = np.empty(40, np.int32)
        kernels().kth(S, w, 0, 40, w, r, out)
        assert np.array_equal(out, keys[:, w - r]), (w, r)
        part = np.empty(13, np.int32)
        kernels().kth(S, w, 20, 33, w, r, part)
        assert np.array_equal(part, keys[20:33, w - r])


def test_the_sample_threshold_is_torchs_topk(monkeypatch):
    rng = np.random.default_rng(5)
    xb = rng.standard_normal((4000, 32)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    scan = Bf16Scan(xb)
    scan.prepare()
    q_hat = torch.from_numpy(rng.standard_normal((300, 32)).astype(np.float32)).to(torch.bfloat16)
    for depth in (5, 60, 400):
        with torch.inference_mode():  # as the scan calls it
            got = scan._sample_threshold(q_hat, depth, 1.5)
            monkeypatch.setattr(survivors, "KERNELS", None)
            want = scan._sample_threshold(q_hat, depth, 1.5)
        monkeypatch.undo()
        assert got.dtype == want.dtype == np.float64 and np.array_equal(got, want)


def test_key_value_of_the_levels_used():
    """The levels a histogram counts map back to bfloat16 values in order (select's vd)."""
    keys = np.arange(-0x7F7F, 0x7F80, 97)
    assert np.all(np.diff(key_value(keys)) > 0)
