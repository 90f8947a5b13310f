"""The bfloat16 candidate scan (miner/core/search/lowp.py): its bound holds for every score, its
order keys are exact on every bfloat16 pattern, and exact search through it returns FAISS's flat
search's bits on every path (sampled threshold, retry, FAISS for heavy or short queries, non-positive
thresholds, a streamed gallery, several query chunks, concurrent callers)."""

import threading

import numpy as np
import pytest
import torch

from cir_mine.miner.accel import bf16 as lowp
from cir_mine.miner.core.search.backends import ExactSearch
from tests.builders import bf16_search
from cir_mine.miner.accel.bf16 import Bf16Scan
from cir_mine.miner.accel.survivors import bf16_key, key_floor, key_value


def _unit(a):
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def world(kind: str, n: int = 6000, d: int = 48, nq: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    if kind == "unit":
        xb = _unit(rng.standard_normal((n, d)))
        xq = _unit(xb[rng.integers(0, n, nq)] + 0.7 * rng.standard_normal((nq, d)))
    elif kind == "clustered":  # scores crowd near the top: wide bands
        c = rng.standard_normal((20, d))
        xb = _unit(c[rng.integers(0, 20, n)] + 0.2 * rng.standard_normal((n, d)))
        xq = _unit(xb[rng.integers(0, n, nq)] + 0.1 * rng.standard_normal((nq, d)))
    elif kind == "crowded":  # scores apart by less than bfloat16 resolves: the band decides the rows
        base = rng.standard_normal(d)
        xb = _unit(base + 2e-3 * rng.standard_normal((n, d)))
        xq = _unit(base + 2e-3 * rng.standard_normal((nq, d)))
    elif kind == "rounding":  # rows whose bfloat16 order is the reverse of their real order
        # pairs of coordinates (1 + a ulp, 1 + b ulp), ulp = 2^-7 (bfloat16 at 1), scored by
        # alternating signs: "down" rows (a, b = 1.49, 0.51) score 0.98 ulp a pair, rounded 0;
        # "up" rows (0.51, 0.49) score 0.02 ulp a pair, rounded 1 ulp
        ulp = 2.0**-7
        up = rng.random(n) < 0.7
        a = np.where(up, 0.51, 1.49)[:, None] + 1e-3 * rng.random((n, d // 2))
        b = np.where(up, 0.49, 0.51)[:, None] - 1e-3 * rng.random((n, d // 2))
        xb = np.empty((n, d))
        xb[:, 0::2], xb[:, 1::2] = 1 + a * ulp, 1 + b * ulp
        xb = xb.astype(np.float32)
        sign = np.tile([1.0, -1.0], d // 2)
        xq = (sign * (1 + 1e-3 * rng.random((nq, d))) / np.sqrt(d)).astype(np.float32)
    elif kind == "scaled":  # rows and queries of norms from 1e-3 to 1e3
        xb = (rng.standard_normal((n, d)) * 10.0 ** rng.uniform(-3, 3, (n, 1))).astype(np.float32)
        xq = (rng.standard_normal((nq, d)) * 10.0 ** rng.uniform(-3, 3, (nq, 1))).astype(np.float32)
    elif kind == "negative":  # every score below zero: the thresholds are not positive
        xb = np.abs(rng.standard_normal((n, d))).astype(np.float32)
        xq = -np.abs(rng.standard_normal((nq, d))).astype(np.float32)
    elif kind == "duplicates":  # blocks of equal rows and zero queries: ties and heavy queries
        xb = np.repeat(rng.standard_normal((n // 50, d)), 50, axis=0).astype(np.float32)
        xq = rng.standard_normal((nq, d)).astype(np.float32)
        xq[::7] = 0.0
    else:
        raise ValueError(kind)
    return np.ascontiguousarray(xb), np.ascontiguousarray(xq)


def _same(a, b):
    assert np.array_equal(a[1], b[1])
    assert np.array_equal(a[0], b[0])


def test_keys_order_every_bfloat16_pattern():
    """bf16_key orders all 65,536 patterns (NaNs aside) as their values, -0 and +0 alike;
    key_value inverts it; key_floor gives the largest bfloat16 at most t."""
    bits = np.arange(-(1 << 15), 1 << 15, dtype=np.int64).astype(np.int16)
    with np.errstate(invalid="ignore"):
        values = (bits.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    ok = ~np.isnan(values)
    bits, values = bits[ok], values[ok]
    keys = bf16_key(bits)
    order = np.argsort(values, kind="stable")
    assert np.all(np.diff(keys[order]) >= 0)
    assert np.array_equal(np.diff(keys[order]) == 0, np.diff(values[order]) == 0)
    assert np.array_equal(key_value(keys), values + 0.0)
    rng = np.random.default_rng(1)
    finite = np.unique(values[np.isfinite(values)])
    t = np.concatenate(
        [
            rng.standard_normal(20_000) * 10.0 ** rng.uniform(-30, 30, 20_000),
            finite,  # exactly representable
            np.nextafter(finite, np.inf),
            np.nextafter(finite, -np.inf),
            [0.0, -0.0, 1e-45, -1e-45],
        ]
    )
    t = t[np.isfinite(t) & (np.abs(t) < 3e38)]
    floor = key_value(key_floor(t))
    assert np.all(floor <= t)
    # the next pattern up is above t: the floor is the largest bfloat16 <= t
    pos = np.searchsorted(finite, floor, side="right")
    above = finite[np.minimum(pos, len(finite) - 1)]
    assert np.all((above > t) | (pos == len(finite)))


@pytest.mark.parametrize("kind", ["unit", "crowded", "rounding", "scaled", "negative", "duplicates"])
def test_every_bfloat16_score_is_within_the_bound(kind):
    """|q·x - v| <= u'|v| + c(q) for every pair, v the bfloat16 GEMM's score, q·x in float64."""
    xb, xq = world(kind, n=3000, nq=200)
    scan = Bf16Scan(xb)
    c, u = scan.constants(xq)
    v = (torch.from_numpy(xq).bfloat16() @ torch.from_numpy(xb).bfloat16().T).float().numpy().astype(np.float64)
    real = xq.astype(np.float64) @ xb.astype(np.float64).T
    assert np.all(np.abs(real - v) <= u * np.abs(v) + c[:, None])
    # and the bound is not loose by orders of magnitude (it decides how many rows are re-ranked)
    if kind == "unit":
        assert np.median(c) < 0.02


@pytest.mark.parametrize("kind", ["unit", "clustered", "crowded", "rounding", "scaled", "negative", "duplicates"])
@pytest.mark.parametrize("k", [1, 10, 100])
def test_exact_search_through_the_scan_is_faiss_flat_search(kind, k):
    xb, xq = world(kind)
    ref = ExactSearch(xb, device="cpu", kernels=("faiss",)).search(xq, k)
    _same(bf16_search(xb).search(xq, k), ref)


def test_small_galleries_and_cuts_past_the_gallery():
    """A gallery smaller than the sample needs (every row is the sample), k = n, k > n."""
    xb, xq = world("unit", n=500, nq=40)
    for k in (1, 77, 499, 500, 600):
        ref = ExactSearch(xb, device="cpu", kernels=("faiss",)).search(xq, k)
        _same(bf16_search(xb).search(xq, k), ref)


def count_scan_paths(monkeypatch) -> dict:
    """Counters of the scan's fallback paths: its retries (and how many cuts they carried) and its
    calls of FAISS's flat search."""
    calls = {"retry": 0, "faiss": 0, "cuts": set()}
    scan_once, faiss_topk = Bf16Scan._scan, lowp.faiss_topk

    def counting_scan(self, xq, depth, ranks, over=lowp.SAMPLE_OVER):
        if over != lowp.SAMPLE_OVER:
            calls["retry"] += 1
            calls["cuts"].add(len(ranks))
        return scan_once(self, xq, depth, ranks, over)

    def counting_faiss(*a, **kw):
        calls["faiss"] += 1
        return faiss_topk(*a, **kw)

    monkeypatch.setattr(Bf16Scan, "_scan", counting_scan)
    monkeypatch.setattr(lowp, "faiss_topk", counting_faiss)
    return calls


def test_every_fallback_path_gives_the_same_rows(monkeypatch):
    """Thresholds so high that most queries fall short (scanned again, then FAISS), and a survivor
    cap so low that queries turn heavy (FAISS): the rows are FAISS's, and each path ran."""
    xb, xq = world("unit", n=8000, nq=400)
    ref = ExactSearch(xb, device="cpu", kernels=("faiss",)).search(xq, 50)
    calls = count_scan_paths(monkeypatch)
    monkeypatch.setattr(lowp, "SAMPLE_OVER", 0.02)  # ~1 row in 50 of the depth passes the threshold
    monkeypatch.setattr(lowp, "RETRY_OVER", 4.0)  # still short after the retry
    _same(bf16_search(xb).search(xq, 50), ref)
    assert calls["retry"] and calls["faiss"]
    monkeypatch.setattr(lowp, "SAMPLE_OVER", 1.5)
    monkeypatch.setattr(lowp, "SURVIVOR_CAP", 0)  # a query holding more than one block's rows is heavy
    monkeypatch.setattr(lowp, "MIN_BLOCK_COLS", 64)
    monkeypatch.setattr(lowp, "BLOCK_SCORES", 64)
    calls["faiss"] = 0
    _same(bf16_search(xb).search(xq, 50), ref)
    assert calls["faiss"]


def test_streamed_gallery_and_query_chunks(monkeypatch, tmp_path):
    """No bfloat16 copy (each block converted at each scan, a memory-mapped gallery), several
    query chunks and gallery blocks: the same rows."""
    xb, xq = world("clustered", n=5000, nq=333)
    ref = ExactSearch(xb, device="cpu", kernels=("faiss",)).search(xq, 20)
    monkeypatch.setattr(lowp, "COPY_BYTES", 0)
    monkeypatch.setattr(lowp, "QUERY_CHUNK", 100)
    path = tmp_path / "xb.npy"
    np.save(path, xb)
    mapped = np.load(path, mmap_mode="r")
    for gallery in (xb, mapped):
        backend = bf16_search(gallery, block_rows=1500)
        _same(backend.search(xq, 20), ref)
        assert backend.scans["bf16"]._copy is None


def test_concurrent_searches_of_one_backend_equal_sequential():
    """Two threads scanning through one back-end (per-thread score buffers)."""
    xb, xq = world("unit", n=6000, nq=600)
    backend = bf16_search(xb)
    ref = [backend.search(xq[:300], 30), backend.search(xq[300:], 30)]
    got = [None, None]

    def run(i):
        for _ in range(3):
            got[i] = backend.search(xq[300 * i : 300 * (i + 1)], 30)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _same(got[0], ref[0])
    _same(got[1], ref[1])


def test_the_device_rule_races_the_scan_for_galleries_in_memory(tmp_path):
    """On the CPU, device_search hands the core an ExactSearch racing the scan (the GEMM kernel
    last); a memory-mapped gallery, and the core alone, race FAISS and the GEMM kernel."""
    from cir_mine.miner.accel import device_search
    from cir_mine.miner.core.config import MineConfig

    xb, _ = world("unit", n=1000, nq=1)
    cfg = MineConfig(device="cpu")
    assert device_search(xb, cfg).race.names == ("faiss", "bf16", "gemm")
    assert ExactSearch(xb, device="cpu").race.names == ("faiss", "gemm")
    path = tmp_path / "xb.npy"
    np.save(path, xb)
    assert device_search(np.load(path, mmap_mode="r"), cfg) is None


def test_a_gemm_outside_the_bound_hands_the_queries_to_faiss(monkeypatch, caplog):
    """prepare checks torch's GEMM against the bound: it holds here; with a bound too tight for any
    bfloat16 GEMM the check fails, the scan says so, and FAISS fetches (the rows stay exact)."""
    xb, xq = world("unit", n=5000, nq=200)
    ref = ExactSearch(xb, device="cpu", kernels=("faiss",)).search(xq, 20)
    scan = Bf16Scan(xb)
    scan.prepare()
    assert scan.sound
    monkeypatch.setattr(lowp, "BF16_ROUNDOFF", 2.0**-30)
    backend = bf16_search(xb)
    with caplog.at_level("WARNING"):
        _same(backend.search(xq, 20), ref)
    assert not backend.scans["bf16"].sound and "exceeds the rounding bound" in caplog.text


def _ahead_is_the_deep_search(backend, xq, k: int, deep: int, ref) -> None:
    D, I, later = backend.search_ahead(xq, k, deep)
    _same((D, I), (ref[0][:, :k], ref[1][:, :k]))
    sel = np.arange(0, len(xq), 3)
    _same(later(sel), (ref[0][sel], ref[1][sel]))
    _same(later(np.arange(len(xq))), ref)


@pytest.mark.parametrize("kind", ["unit", "clustered", "crowded", "rounding", "negative", "duplicates"])
@pytest.mark.parametrize("kernels", [("faiss",), ("gemm",), ("bf16",)])
def test_a_search_ahead_is_the_deep_search_cut_twice(kind, kernels):
    """search_ahead(xq, k, deep): the exact top-k now and, for any queries asked later, the exact
    top-deep, from one fetch whatever the kernel: the first k columns and the rows of a search
    ``deep`` deep."""
    xb, xq = world(kind)
    ref = ExactSearch(xb, device="cpu", kernels=("faiss",)).search(xq, 200)
    backend = ExactSearch(xb, device="cpu", kernels=kernels, scans={"bf16": Bf16Scan(xb)})
    _ahead_is_the_deep_search(backend, xq, 30, 200, ref)


def test_a_search_ahead_takes_every_path_of_the_scan(monkeypatch):
    """The scan's second cut through its retry, FAISS for short and heavy queries, and several query
    chunks and gallery blocks: the same rows."""
    xb, xq = world("unit", n=8000, nq=400)
    ref = ExactSearch(xb, device="cpu", kernels=("faiss",)).search(xq, 120)
    calls = count_scan_paths(monkeypatch)
    monkeypatch.setattr(lowp, "SAMPLE_OVER", 0.02)
    monkeypatch.setattr(lowp, "QUERY_CHUNK", 150)
    scan_only = lambda: ExactSearch(xb, device="cpu", kernels=("bf16",), scans={"bf16": Bf16Scan(xb)})
    _ahead_is_the_deep_search(scan_only(), xq, 40, 120, ref)
    assert calls["retry"] and calls["faiss"] and calls["cuts"] == {2}
    calls["faiss"] = 0
    monkeypatch.setattr(lowp, "SAMPLE_OVER", 1.5)
    monkeypatch.setattr(lowp, "SURVIVOR_CAP", 0)
    monkeypatch.setattr(lowp, "MIN_BLOCK_COLS", 64)
    monkeypatch.setattr(lowp, "BLOCK_SCORES", 64)
    _ahead_is_the_deep_search(scan_only(), xq, 40, 120, ref)
    assert calls["faiss"]


def test_a_search_ahead_scores_the_deep_rows_only_when_asked(monkeypatch):
    """The first fetch re-scores the rows of the cut at k (k and its margin, from FAISS's flat
    search); the rows past it only for the queries ``later`` is asked about."""
    from cir_mine.miner.core.search import backends, exact
    from cir_mine.miner.core.search.exact import cut_depth

    xb, xq = world("unit", n=6000, nq=300)
    scored = []
    rescore = exact.exact_rescore

    def counted(xb, xq, I, k):
        scored.append(I.shape)
        return rescore(xb, xq, I, k)

    monkeypatch.setattr(backends, "exact_rescore", counted)
    monkeypatch.setattr(exact, "exact_rescore", counted)
    backend = ExactSearch(xb, device="cpu", kernels=("faiss",))
    _, _, later = backend.search_ahead(xq, 20, 400)
    assert scored == [(300, cut_depth(20))]
    later(np.arange(10))
    assert scored == [(300, cut_depth(20)), (10, cut_depth(400))]
