"""The search layer's contract: every back-end returns each query's top-k by exact score (descending,
ties by the lower row), so the rows never depend on the query batch, the pass budget, the thread
count, prefetching, the kernel that fetched the candidates, or the CPU's BLAS kernel.

Candidates are checked against FAISS as the oracle: exact top-k over the gallery, and FAISS contrib's
``big_batch_search`` with a numpy pairwise-score function for IVF lists; comparisons are tie-aware in
the manner of ``faiss.contrib.evaluation.check_ref_knn_with_draws``."""

import threading

import numpy as np
import pytest

from cir_mine.data.workspace import Workspace
from cir_mine.miner.core.mine import MineConfig, mine_negatives
from cir_mine.miner.core.search.backends import ExactSearch, Reranked
from cir_mine.miner.core.search.build import build_index
from cir_mine.miner.accel.search import TorchSearch
from tests.builders import bf16_search


def _unit(a):
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def _ivf_with_empty_tail(nlist=8, filled=6, n=3000, d=16, seed=2):
    """An IVF-Flat whose lists filled..nlist-1 hold no vector (the last list of the layout is empty)."""
    import faiss

    rng = np.random.default_rng(seed)
    xb = _unit(rng.standard_normal((n, d)))
    index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(xb)
    _, assign = index.quantizer.search(xb, 1)
    keep = np.flatnonzero(assign[:, 0] < filled)
    index.add_with_ids(xb[keep], keep.astype(np.int64))
    centroids = index.quantizer.reconstruct_n(0, nlist)
    return index, xb, keep, _unit(centroids), rng


def test_all_empty_probed_lists_with_a_trailing_empty_list_pad_like_faiss():
    """A query whose probed lists are all empty, the last of them the layout's trailing empty list,
    gets -1 / -inf pads (as FAISS's own search), in a batch large enough for the list-major kernel."""
    index, xb, keep, centroids, rng = _ivf_with_empty_tail()
    xq = np.concatenate([_unit(rng.standard_normal((40, 16))), np.repeat(centroids[7:8], 8, 0)])
    backend = Reranked(index, xb, 1.0, {"index": "ivf"})
    backend.set_params({"nprobe": 1})
    D, I = backend.search(xq, 5)
    index.nprobe = 1
    D0, I0 = index.search(xq, 5)
    assert (I0[40:] == -1).all()  # FAISS: nothing to return
    assert (I[40:] == -1).all() and np.isneginf(D[40:]).all()
    assert ((I[:40] >= 0) == (I0[:40] >= 0)).all() and np.isin(I[I >= 0], keep).all()


def test_concurrent_searches_of_one_backend_equal_sequential():
    """Two threads searching one IVF-Flat back-end at once (prefetch beside a strategy's own search)
    get the rows each would get alone, and the process's BLAS thread count is what it was."""
    from threadpoolctl import threadpool_info

    import faiss

    rng = np.random.default_rng(4)
    xb = _unit(rng.standard_normal((20000, 32)))
    index = faiss.index_factory(32, "IVF64,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(xb)
    index.add(xb)
    backend = Reranked(index, xb, 1.0, {"index": "ivf"})
    backend.set_params({"nprobe": 8})
    qa, qb = _unit(rng.standard_normal((600, 32))), _unit(rng.standard_normal((500, 32)))
    ref_a, ref_b = backend.search(qa, 60), backend.search(qb, 90)
    blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    out, errors = {}, []

    def work(name, xq, k):
        try:
            out[name] = [backend.search(xq, k) for _ in range(6)]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=a) for a in (("a", qa, 60), ("b", qb, 90))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for name, ref in (("a", ref_a), ("b", ref_b)):
        for D, I in out[name]:
            assert np.array_equal(I, ref[1]) and np.array_equal(D, ref[0])
    assert [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"] == blas


@pytest.fixture(scope="module")
def ws(synth_work):
    return Workspace(synth_work)


@pytest.mark.parametrize("index", ["flat", "IVF16,Flat"])
@pytest.mark.parametrize("strategy", ["hardest", "category-discrepant"])
def test_tables_do_not_depend_on_batch_budget_threads_prefetch_or_kernel(ws, index, strategy, monkeypatch):
    """Resumed == uninterrupted in every sense the search has: one table whatever the query batch,
    the list-major pass budget, FAISS's thread count, prefetching, or the candidate kernel (numpy's,
    FAISS's, the bfloat16 scan's, or torch's on its CPU device in fp32 and bf16)."""
    from cir_mine.miner.core.search import lists as lists_mod
    from cir_mine.miner.core.search.faiss_api import load_faiss
    from cir_mine.miner.core.search.measure import KernelRace

    base = dict(strategy=strategy, k=8, candidates=100, index=index)
    if index != "flat":
        base["nprobe"] = 4
    ref = mine_negatives(ws, "train", MineConfig.of(**base)).table
    xb = ws.load("train")[0].embeddings
    variants = [
        MineConfig.of(**base, query_batch=7),
        MineConfig.of(**base, query_batch=100_000),
        MineConfig.of(**base, prefetch=True, query_batch=50),
    ]
    for cfg in variants:
        assert mine_negatives(ws, "train", cfg).table.equals(ref), cfg
    monkeypatch.setattr(lists_mod, "LIST_MAJOR_SCORES", 500)
    faiss = load_faiss()
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        assert mine_negatives(ws, "train", MineConfig.of(**base, query_batch=33)).table.equals(ref)
    finally:
        faiss.omp_set_num_threads(threads)
    kernels = (
        (("faiss",), ("gemm",), ("bf16",), ("torch", "fp32", ("heap",)), ("torch", "bf16", ("topk",)))
        if index == "flat"
        else (("faiss",), ("lists",))
    )
    for kernel in kernels:
        if kernel[0] == "torch":  # the torch back-end on torch's CPU device
            backend = TorchSearch(xb, "cpu", kernel[1], kernels=kernel[2])
        elif kernel == ("bf16",):
            backend = bf16_search(xb)
        elif index == "flat":
            backend = ExactSearch(xb, device="cpu", kernels=kernel)
        else:
            backend = Reranked(build_index(xb, index, device="cpu"), xb, 1.0, {"index": "ivf"})
            backend.race = KernelRace(kernel)
            backend.set_params({"nprobe": 4})
        got = mine_negatives(ws, "train", MineConfig.of(**base), index=backend).table
        assert got.equals(ref), kernel


@pytest.mark.parametrize(
    "kw",
    [
        dict(strategy="midzone", k=8, candidates=40, max_candidates=600, delta_lo=0.0, delta_hi=0.3),
        dict(mix="hardest:0.5,random:0.5", k=8, candidates=60),
        dict(strategy="category-discrepant", k=8, candidates=120, index="IVF16,Flat", nprobe=4),
    ],
    ids=["midzone-deepened", "mix", "category-discrepant-ivf"],
)
def test_tables_do_not_depend_on_the_selection_threads(ws, kw, monkeypatch):
    """A batch's guards and selections split over threads (parts of 5 queries, 3 threads, each
    strategy's own searches and the deepening passes included) give the one-thread table."""
    from cir_mine.miner.core import schedule

    monkeypatch.setattr(schedule, "SELECT_PART", 10**9)
    ref = mine_negatives(ws, "train", MineConfig.of(**kw, query_batch=64)).table
    calls = []
    part = schedule.DepthSchedule.mine_part

    def spy(self, q, *a):
        calls.append((threading.current_thread().name, q.size))
        return part(self, q, *a)

    monkeypatch.setattr(schedule, "SELECT_PART", 5)
    monkeypatch.setattr(schedule, "select_threads", lambda: 3)
    monkeypatch.setattr(schedule.DepthSchedule, "mine_part", spy)
    got = mine_negatives(ws, "train", MineConfig.of(**kw, query_batch=64))
    parts = [n for name, n in calls if name.startswith("cir-mine-select")]
    assert len(parts) >= 3 and max(parts) <= 22  # batches of 64 split in three
    assert ref.num_rows > 0 and got.table.equals(ref)
    assert not [t for t in threading.enumerate() if t.name.startswith("cir-mine-select")]  # shut down


def test_prefetch_with_ivf_flat_and_category_discrepant_equals_sequential(ws):
    """category-discrepant searches its target neighbours through the back-end while the next batch
    is searched in a worker thread: the table is the sequential one."""
    kw = dict(strategy="category-discrepant", k=8, candidates=120, index="IVF16,Flat", nprobe=4, query_batch=40)
    a = mine_negatives(ws, "train", MineConfig.of(prefetch=False, **kw))
    b = mine_negatives(ws, "train", MineConfig.of(prefetch=True, **kw))
    assert b.meta["search"]["prefetch"] is True and a.table.num_rows > 0
    assert a.table.equals(b.table)


# -- the same rows under every kernel -------------------------------------------------------------


def _cpu_flags() -> set:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    line = next((l for l in text.splitlines() if l.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def blas_kernels() -> list:
    """OpenBLAS kernels this CPU can run (OPENBLAS_CORETYPE values), oldest first."""
    flags = _cpu_flags()
    kernels = ["Prescott", "Sandybridge"] + (["Haswell"] if "avx2" in flags else [])
    return kernels + (["SkylakeX"] if "avx512f" in flags else [])


def _probe(work, tmp_path, env: dict) -> dict:
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    r = subprocess.run(
        [sys.executable, "-m", "tests.search_probe", str(work), str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_rows_and_tables_are_the_same_under_every_blas_kernel_and_thread_count(synth_world, tmp_path):
    """Exact and IVF-Flat searches of a gallery whose scores crowd within float32 rounding (every
    batch size, both candidate kernels), mined tables (hardest and category-discrepant, exact
    and IVF-Flat) and the IVF indexes built (k-means and list assignment, over repeated rows too)
    give the same bits under every OpenBLAS kernel this CPU runs and with one BLAS thread: the cuts
    are decided on exact scores, never on a GEMM's summation order."""
    work = synth_world(n_gallery=2000, n_triplets=240, dim=32, seed=11)
    runs = {"default": _probe(work, tmp_path, {})}
    runs["one thread"] = _probe(work, tmp_path, {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
    for kernel in blas_kernels():
        runs[kernel] = _probe(work, tmp_path, {"OPENBLAS_CORETYPE": kernel})
    ref = runs["default"]
    for name, got in runs.items():
        assert got == ref, name
    # within one run: every batch size and kernel returned the same rows
    by_backend = {}
    for key, h in ref["searches"].items():
        by_backend.setdefault(key.split("/")[0].split("-")[0], set()).add(h)
    assert all(len(hs) == 1 for hs in by_backend.values()), ref["searches"]


def test_exact_scores_have_the_same_bits_whatever_simd_level_faiss_picks():
    """FAISS sums a dot product 8 or 16 lanes wide by the CPU; the exact scores are computed at one
    pinned level, so a process on an AVX-512 CPU and one on an AVX2 CPU write the same bits."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    code = (
        "import numpy as np, hashlib\n"
        "from cir_mine.miner.core.search.exact import gathered_dot\n"
        "rng = np.random.default_rng(0)\n"
        "xb = rng.standard_normal((500, 200)).astype(np.float32)\n"
        "xq = rng.standard_normal((40, 200)).astype(np.float32)\n"
        "rows = rng.integers(0, 500, (40, 60))\n"
        "print(hashlib.sha256(gathered_dot(xb, rows, xq).tobytes()).hexdigest())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FAISS_SIMD_LEVEL"}
    run = lambda extra: subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env={**env, **extra}, timeout=120
    )
    auto, avx2 = run({}), run({"FAISS_SIMD_LEVEL": "AVX2"})
    assert auto.returncode == 0 and avx2.returncode == 0, auto.stderr + avx2.stderr
    assert auto.stdout == avx2.stdout


def test_faiss_flat_search_takes_its_blas_path_for_every_batch():
    """FAISS scores a batch of fewer than 128,000 / d queries one query at a time (6-12x slower per
    query), and the kernel race's parts, deepening passes and recall samples are such batches: once
    loaded, FAISS takes its BLAS path for a single query of dimension 8. The rows it returns are the
    same whichever path it takes (the cut is exact), which the tests above check."""
    from cir_mine.miner.core.search.faiss_api import BLAS_FROM, load_faiss

    faiss = load_faiss()
    assert faiss.cvar.distance_compute_blas_threshold == BLAS_FROM <= 8
    rng = np.random.default_rng(3)
    xb = rng.standard_normal((300, 8)).astype(np.float32)
    xq = rng.standard_normal((5, 8)).astype(np.float32)
    for n in (1, 5):
        D, I = ExactSearch(xb).search(xq[:n], 7)
        ref = np.argsort(-(xq[:n].astype(np.float64) @ xb.T.astype(np.float64)), axis=1, kind="stable")[:, :7]
        assert (I == ref).all()


def test_tuned_ivf_tables_do_not_depend_on_how_deep_a_batch_was_searched(ws):
    """A tuned IVF probes more lists the deeper it searches (``Reranked.beam_for``). A mining run's
    first batch is searched at the ladder's second depth and, once most of its queries prove short,
    the later batches at the deepest, each query mined at the shallower depths from those rows: so
    every search of one run probes as its deepest does, and a query's rows do not depend on the
    batch that decided the depth (batches of 4 and 64 queries switch after different queries)."""
    xb = ws.load("train")[0].embeddings
    info = {"index": "ivf", "depth": 40, "params": {"nprobe": 1}, "deep": {"depth": 640, "params": {"nprobe": 16}}}

    def tuned():
        backend = Reranked(build_index(xb, "IVF16,Flat", device="cpu"), xb, 1.0, dict(info))
        backend.set_params({"nprobe": 1})
        return backend

    base = dict(strategy="hardest", k=8, candidates=40, max_candidates=640)
    tables = [
        mine_negatives(ws, "train", MineConfig.of(**base, query_batch=b), index=tuned()).table for b in (4, 64, 100_000)
    ]
    assert tables[0].num_rows > 0
    assert tables[1].equals(tables[0]) and tables[2].equals(tables[0])


def test_an_ivf_build_puts_every_row_in_its_exact_nearest_list():
    """Over rows repeated many times (images sharing their tags), every row of the built IVF-Flat,
    whether added by the build or by add_rows into a trained copy (as shards fill theirs), is in a
    list of its largest exact score (tie-aware), and every copy of a row in the same one."""
    import faiss

    from cir_mine.miner.core.search.build import add_rows

    rng = np.random.default_rng(4)
    base = _unit(rng.standard_normal((60, 24)))
    xb = np.repeat(base, rng.integers(1, 30, 60), axis=0)
    xb = xb[rng.permutation(len(xb))]
    for index in (build_index(xb, "IVF32,Flat", device="cpu"), None):
        if index is None:
            index = build_index(xb, "IVF32,Flat", device="cpu", add=False)
            add_rows(index, xb)
        ivf = faiss.extract_index_ivf(index)
        centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
        where = np.empty(len(xb), np.int64)
        for lst in range(ivf.nlist):
            if ivf.invlists.list_size(lst):
                where[faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), ivf.invlists.list_size(lst)).copy()] = lst
        scores = xb.astype(np.float64) @ centroids.T.astype(np.float64)
        assert (scores[np.arange(len(xb)), where] >= scores.max(axis=1) - 1e-6).all()  # tie-aware
        for row in base:
            same = np.flatnonzero((xb == row).all(axis=1))
            assert len(set(where[same])) == 1
