"""Benchmarks of `cir-mine negatives` (numbers go to docs/benchmarks.md, section "Negatives").

  (a) speed:  python bench/negatives.py speed  --n-gallery 100000 --n-queries 20000 --dim 256 -k 100 --candidates 400 --no-deepen
      end-to-end midzone mining (read, search, re-rank, guards, sampling, table) vs the bare FAISS
      read + search of the same queries at the same depth (the gallery read from its Parquet file,
      faiss.IndexFlatIP add and search; read with pyarrow's default memory pool, as a script
      reads, where mining reads with the command line's, data.memory.fast_pool), measured in one
      process, with each stage's seconds (--select-threads 1: guards and selections on the mining
      thread alone; --fresh: each run of each side in a process of its own, as a user runs them).
  (b) memory: python bench/negatives.py memory --n-gallery 1000000 --n-queries 2000 --dim 512 -k 100
      peak RSS of `cir-mine negatives` in a fresh process vs (gallery bytes + index bytes).
  (c) st:     python bench/negatives.py st --n-gallery 100000 --n-queries 10000 --dim 256 -k 50
      sentence-transformers mine_hard_negatives on the same embeddings (its embedding cache filled
      first, FAISS search, same candidate window and margin) vs cir-mine on the same workspace:
      doing the same work (exact search at the window's depth, no deepening, no cap or
      near-duplicate guard, queries short of k dropped as the peer drops them), and with cir-mine's
      default guards and deepening on; then the same window through a tuned IVF index.
  (d) kernels: python bench/negatives.py kernels --n-gallery 100000 --dim 256
      the exact-search candidate kernels on random unit vectors, the fastest of 5 alternated runs per
      shape (queries x depth): FAISS's flat search with its own BLAS threshold (queries x dimension
      below it are scored one query at a time), with cir-mine's (BLAS for every batch) and its
      default 1,024-row block, and with the block cir-mine uses (4x the depth, at least 1,024),
      numpy's GEMM into FAISS's heaps, and the bfloat16 scan (its candidates: the rows within its
      proven band, more than the depth; the race in mining also times their exact re-scoring).
  (e) read:   python bench/negatives.py read --n-gallery 100000 --n-queries 20000 --dim 256 --repeats 5
      Workspace.load of the workspace in fresh processes (the first read of a command), with Arrow's
      memory pool the command line sets (data.memory.fast_pool: jemalloc) and with pyarrow's default
      (mimalloc), alternated --repeats times; pandas imported first (pyarrow imports it, when it is
      installed, at its first array, and the peer's process has it already).
  (f) gathers: python bench/negatives.py gathers --n-gallery 100000 --dim 256
      the exact scoring of gathered candidate rows (gathered_dot: 2,048 queries x 600 rows each),
      the gallery in an array numpy owns with its huge-page advice on (how the read leaves it) and
      off (4 KiB pages, as Arrow's allocators leave a zero-copy view), rows drawn from the whole
      gallery and from one 8,192-row block (a scan's block in cache); nanoseconds per pair, the
      fastest of 5 calls, each setting in a fresh process.
  (g) survivors: python bench/negatives.py survivors --n-gallery 100000 --n-queries 10000 --dim 256 --repeats 5
      the bfloat16 scan of the workspace's first 4,096 queries at depths 216, 828 and 2,048, its
      thresholds, survivors and selections by the compiled kernels (miner/accel/_survivors.c) and
      by the torch and numpy code they replace, alternated in one process; microseconds per query,
      the fastest of --repeats.
  (i) windows: python bench/negatives.py windows --n-gallery 100000 --n-queries 10000 --dim 256 --repeats 5
      the exact re-scoring (gathered_dot) of the bfloat16 scan's rows for the workspace's first
      4,096 queries at depths 216, 422 and 828, window by window (miner/core/search/_windows.c)
      and in one FAISS call, and exact_rescore's cut at k with its top-k from the windows' sort
      keys against topk_desc after gathered_dot, alternated in one process; milliseconds, the
      fastest of --repeats, and whether both returned the same bits (and rows).
  (h) pages:  python bench/negatives.py pages --repeats 3
      seconds to fill 1 GiB numpy allocates right after freeing as much, and after a 5 s pause,
      alternated: on a VM that reports free pages to its host, memory freed a few seconds earlier
      is faulted in from the host again (the read stage of a second run in one process).
Workspaces are generated once under --root (default /tmp/cir-mine-bench) and reused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cir_mine.data.synthetic import SynthConfig, generate  # noqa: E402
from cir_mine.data.workspace import Workspace  # noqa: E402
from cir_mine.miner.accel import device_search  # noqa: E402  (what cir-mine negatives hands the core)
from cir_mine.miner.core.mine import MineConfig, mine_negatives, mine_to_file  # noqa: E402
from cir_mine.miner.core.scores import zero_shot_queries  # noqa: E402


def workspace(root: Path, n: int, m: int, d: int) -> Workspace:
    path = root / f"synth-{n}-{m}-{d}"
    if not (path / "manifest.json").exists():
        t = time.perf_counter()
        generate(SynthConfig(n_gallery=n, n_triplets=m, dim=d, seed=0), path)
        print(f"generated {path} in {time.perf_counter() - t:.1f}s", flush=True)
    return Workspace(path)


def queries(ws: Workspace) -> tuple[np.ndarray, np.ndarray]:
    g, t = ws.load("train")
    xq = zero_shot_queries(g.embeddings[g.rows(t.ref_ids.tolist(), t.categories.tolist())], t.text_embeddings)
    return g.embeddings, xq


def _speed_setup(args):
    """(workspace, MineConfig, search depth) of the speed bench."""
    ws = workspace(args.root, args.n_gallery, args.n_queries, args.dim)
    cfg = MineConfig.of(
        strategy="midzone",
        k=args.k,
        delta_lo=args.delta_lo,
        delta_hi=args.delta_hi,
        candidates=args.candidates,
        max_candidates=None if args.no_deepen else 2048,
    )
    return ws, cfg, cfg.depth(args.k)


def _bare(ws: Workspace, xq: np.ndarray, cfg: MineConfig, depth: int) -> None:
    """The gallery read from its Parquet file, faiss.IndexFlatIP at FAISS's defaults, the same
    queries searched at the same depth in the same batches."""
    import faiss
    import pyarrow.parquet as pq

    from cir_mine.data.workspace import embedding_numpy
    from cir_mine.miner.core.search.faiss_api import FAISS_DEFAULT_BLOCK

    faiss.cvar.distance_compute_blas_database_bs = FAISS_DEFAULT_BLOCK
    with _script_pool():
        xb = embedding_numpy(pq.read_table(ws.gallery_path("train"), columns=["embedding"]).column("embedding"))
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    for s in range(0, len(xq), cfg.query_batch):
        index.search(xq[s : s + cfg.query_batch], depth)


SCRIPT_POOL = None  # pyarrow's default memory pool, before the command line's replaced it (set in __main__)


@contextlib.contextmanager
def _script_pool():
    """pyarrow's own default pool for the bare side's read: a script's read, not the command line's."""
    import pyarrow as pa

    was = pa.default_memory_pool()
    pa.set_memory_pool(SCRIPT_POOL or was)
    try:
        yield
    finally:
        pa.set_memory_pool(was)


def _mine(ws: Workspace, cfg: MineConfig):
    with tempfile.TemporaryDirectory() as tmp:
        return mine_to_file(ws, "train", cfg, Path(tmp) / "negs.parquet", index=device_search)


def _select_threads(args) -> None:
    from cir_mine.miner.core import schedule

    if args.select_threads:
        schedule.select_threads = lambda: args.select_threads


def speed_one(args) -> dict:
    """One timed run of one side of the speed bench in this (fresh) process: ``--side`` bare or mine,
    the queries from ``--queries`` (an .npy the parent wrote)."""
    from cir_mine.miner.core.search.faiss_api import load_faiss

    ws, cfg, depth = _speed_setup(args)
    load_faiss()
    _select_threads(args)
    xq = np.load(args.queries)
    c0, t = time.process_time(), time.perf_counter()
    out = _bare(ws, xq, cfg, depth) if args.side == "bare" else _mine(ws, cfg)
    wall, cpu = time.perf_counter() - t, time.process_time() - c0
    return {"wall": wall, "cpu": cpu, "meta": None if out is None else out.meta}


def speed(args) -> dict:
    from cir_mine.miner.core import schedule
    from cir_mine.miner.core.search.faiss_api import load_faiss

    ws, cfg, depth = _speed_setup(args)
    _, xq = queries(ws)
    load_faiss()
    _select_threads(args)
    if args.fresh:
        qpath = args.root / f"{ws.root.name}.queries.npy"
        np.save(qpath, xq)

    def run(name: str):
        """(wall, CPU, the mining result's meta or None) of one run of one side."""
        if not args.fresh:
            c0, t = _cpu(), time.perf_counter()
            out = _bare(ws, xq, cfg, depth) if name == "bare" else _mine(ws, cfg)
            return time.perf_counter() - t, _cpu() - c0, None if out is None else out.meta
        argv = [*sys.argv[1:]]
        argv[argv.index("speed")] = "speed-one"
        argv = [a for a in argv if a != "--fresh"]
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--side", name, "--queries", str(qpath)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        return r["wall"], r["cpu"], r["meta"]

    best = {"bare": (1e9, 1e9), "mine": (1e9, 1e9)}
    meta = None
    for _ in range(args.repeats):  # alternated, the fastest of each kept (a shared machine)
        for name in ("bare", "mine"):
            wall, cpu, m = run(name)
            if wall < best[name][0]:
                best[name] = (wall, cpu)
                meta = m if name == "mine" else meta
    (t_bare, c_bare), (t_mine, c_mine) = best["bare"], best["mine"]
    tm = meta["timing"]
    post = sum(tm[k] for k in ("rerank_s", "guards_s", "select_s", "table_s"))
    import faiss

    return {
        "bench": "speed",
        "n_gallery": args.n_gallery,
        "n_queries": args.n_queries,
        "dim": args.dim,
        "k": args.k,
        "depth": depth,
        "deepen": not args.no_deepen,
        "fresh": bool(args.fresh),
        "faiss_threads": faiss.omp_get_max_threads(),
        "select_threads": schedule.select_threads(),
        "repeats": args.repeats,
        "bare_read_search_s": round(t_bare, 2),
        "bare_cpu_s": round(c_bare, 2),
        "mine_total_s": round(t_mine, 2),
        "mine_cpu_s": round(c_mine, 2),
        "mine_timing": tm,
        "rows": meta["n_rows"],
        "shortfall": meta["shortfall"]["count"],
        "ratio_wall": round(t_mine / t_bare, 3),
        "ratio_cpu": round(c_mine / c_bare, 3),
        "post_search_vs_search": round(post / max(tm["search_s"], 1e-9), 3),
    }


def memory(args) -> dict:
    ws = workspace(args.root, args.n_gallery, args.n_queries, args.dim)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-c",
            "from cir_mine.cli import mine_main; mine_main()",
            "negatives",
            "--work",
            str(ws.root),
            "--strategy",
            "midzone",
            "-k",
            str(args.k),
            "--out",
            str(Path(tmp) / "negs.parquet"),
            "-q",
        ]
        t = time.perf_counter()
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if r.returncode:
            raise SystemExit(r.stderr)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    gallery = args.n_gallery * args.dim * 4
    return {
        "bench": "memory",
        "n_gallery": args.n_gallery,
        "n_queries": args.n_queries,
        "dim": args.dim,
        "k": args.k,
        "peak_rss_gib": round(peak / 2**30, 3),
        "gallery_plus_index_gib": round(2 * gallery / 2**30, 3),
        "ratio": round(peak / (2 * gallery), 3),
        "wall_s": round(wall, 1),
        "summary": r.stdout.strip().splitlines()[0],
    }


class _Precomputed:
    """The attributes mine_hard_negatives reads from a model when its embedding cache is full."""

    def __init__(self, dim: int):
        from types import SimpleNamespace

        self.model_card_data = SimpleNamespace(base_model="cir-mine-precomputed")
        self.device = "cpu"
        self._dim = dim

    def get_embedding_dimension(self):
        return self._dim

    def similarity_pairwise(self, a, b):
        import torch

        return torch.from_numpy(np.einsum("ij,ij->i", np.asarray(a), np.asarray(b)))

    def encode_query(self, *a, **kw):  # never called: the cache is filled first
        raise RuntimeError("cache miss")

    encode_document = encode_query


def st(args) -> dict:
    import hashlib
    import os

    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    ws = workspace(args.root, args.n_gallery, args.n_queries, args.dim)
    g, t = ws.load("train")
    xb, xq = queries(ws)
    depth = 4 * args.k
    cache = Path(tempfile.mkdtemp())
    corpus = g.image_ids.tolist()
    qtexts = t.query_ids.tolist()
    name = "cir-mine-precomputed"
    for kind, texts, emb in (
        ("query", qtexts, xq),
        ("corpus", list(dict.fromkeys(corpus + t.target_ids.tolist())), xb),
    ):
        h = hashlib.sha256(repr((name, None, None, texts)).encode()).hexdigest()
        np.save(cache / f"{kind}_embeddings_{h}.npy", emb)
    ds = Dataset.from_dict({"anchor": qtexts, "positive": t.target_ids.tolist()})
    t0, c0 = time.perf_counter(), _cpu()
    out = mine_hard_negatives(
        ds,
        _Precomputed(args.dim),
        corpus=corpus,
        range_max=depth,
        num_negatives=args.k,
        absolute_margin=args.delta_lo,
        sampling_strategy="random",
        use_faiss=True,
        faiss_batch_size=4096,
        output_format="n-tuple",
        cache_folder=str(cache),
        verbose=False,
    )
    t_st, c_st = time.perf_counter() - t0, _cpu() - c0
    same = MineConfig.of(
        strategy="midzone",
        k=args.k,
        candidates=depth,
        delta_lo=args.delta_lo,
        delta_hi=2.0,
        rho=None,
        dup_threshold=None,
        max_candidates=None,
    )
    t0, c0 = time.perf_counter(), _cpu()
    res = mine_negatives(ws, "train", same, index=device_search)
    full = _drop_short(res.table, args.k)  # the peer keeps only queries with k negatives
    t_same, c_same = time.perf_counter() - t0, _cpu() - c0
    t0, c0 = time.perf_counter(), _cpu()
    guarded = mine_negatives(
        ws,
        "train",
        MineConfig.of(strategy="midzone", k=args.k, candidates=depth, delta_lo=args.delta_lo, delta_hi=2.0),
        index=device_search,
    )
    t_guard, c_guard = time.perf_counter() - t0, _cpu() - c0
    # the same window through an IVF index tuned to candidate recall 0.98 (index build included),
    # its recall and the overlap of its negatives with exact mining measured on 500 queries
    t0, c0 = time.perf_counter(), _cpu()
    ivf = mine_negatives(ws, "train", same.replace(index="ivf", check_recall=500), index=device_search)
    t_ivf, c_ivf = time.perf_counter() - t0, _cpu() - c0
    for f in cache.iterdir():
        os.remove(f)
    cache.rmdir()
    chk = ivf.meta["search"]["check"]
    return {
        "bench": "st",
        "n_gallery": args.n_gallery,
        "n_queries": args.n_queries,
        "dim": args.dim,
        "k": args.k,
        "window": f"ranks < {depth}, delta > {args.delta_lo}, random sampling",
        "st_rows": len(out),
        "st_s": round(t_st, 2),
        "st_cpu_s": round(c_st, 2),
        "same_work": {
            "rows": full.num_rows,
            "queries": full.num_rows // args.k,
            "s": round(t_same, 2),
            "cpu_s": round(c_same, 2),
            "timing": res.meta["timing"],
            "ratio_vs_st": round(t_same / t_st, 3),
            "ratio_vs_st_cpu": round(c_same / c_st, 3),
        },
        "guards_and_deepening": {
            "rows": guarded.meta["n_rows"],
            "deepened": guarded.meta["deepened_queries"],
            "s": round(t_guard, 2),
            "cpu_s": round(c_guard, 2),
            "timing": guarded.meta["timing"],
            "ratio_vs_st": round(t_guard / t_st, 3),
            "ratio_vs_st_cpu": round(c_guard / c_st, 3),
        },
        "ivf": {
            "s": round(t_ivf, 2),
            "cpu_s": round(c_ivf, 2),
            "factory": ivf.meta["search"]["factory"],
            "params": ivf.meta["search"]["params"],
            "candidate_recall": chk["candidate_recall"],
            "negative_overlap": chk["negative_overlap"],
            "ratio_vs_st_cpu": round(c_ivf / c_st, 3),
        },
    }


def _drop_short(table, k: int):
    """The rows of the queries that got all ``k`` negatives."""
    import pyarrow.compute as pc

    counts = pc.value_counts(table.column("query_id"))
    full = pc.filter(counts.field("values"), pc.equal(counts.field("counts"), k))
    return table.filter(pc.is_in(table.column("query_id"), value_set=full))


def kernels(args) -> dict:
    import faiss

    from cir_mine.miner.core.search.exact import faiss_topk, gemm_topk
    from cir_mine.miner.accel.bf16 import Bf16Scan
    from cir_mine.miner.core.search.faiss_api import FAISS_DEFAULT_BLOCK, load_faiss

    own_threshold = faiss.cvar.distance_compute_blas_threshold  # FAISS's own, before load_faiss sets ours
    load_faiss()
    blas_from = faiss.cvar.distance_compute_blas_threshold
    rng = np.random.default_rng(0)
    unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)
    xb = unit(rng.standard_normal((args.n_gallery, args.dim)))
    scan = Bf16Scan(xb)
    scan.prepare()
    rows = []
    for nq, depth in ((64, 2048), (256, 2048), (469, 422), (1024, 800), (4096, 422), (4096, 150)):
        xq = unit(rng.standard_normal((nq, args.dim)))

        def faiss_default(threshold=blas_from):
            faiss.cvar.distance_compute_blas_database_bs = FAISS_DEFAULT_BLOCK
            faiss.cvar.distance_compute_blas_threshold = threshold
            try:
                faiss.knn(xq, xb, depth, metric=faiss.METRIC_INNER_PRODUCT)
            finally:
                faiss.cvar.distance_compute_blas_threshold = blas_from

        best = {}
        for _ in range(5):
            for name, fn in (
                ("faiss_own_blas_threshold", lambda: faiss_default(own_threshold)),
                ("faiss_block_1024", faiss_default),
                ("faiss_block_cir_mine", lambda: faiss_topk(xq, xb, depth)),
                ("gemm_heaps", lambda: gemm_topk(xq, xb, depth)),
                ("bf16_scan", lambda: scan(xq, depth)),
            ):
                t = time.perf_counter()
                fn()
                best[name] = min(best.get(name, 1e9), time.perf_counter() - t)
        rows.append({"queries": nq, "depth": depth, **{k: round(v, 3) for k, v in best.items()}})
    return {
        "bench": "kernels",
        "n_gallery": args.n_gallery,
        "dim": args.dim,
        "faiss_threads": faiss.omp_get_max_threads(),
        "faiss_own_blas_threshold": own_threshold,
        "blas_from": blas_from,
        "rows": rows,
    }


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


_READ = """
import sys, time
try:
    import pandas  # noqa: F401
except ImportError:
    pass
sys.path.insert(0, {repo!r})
from cir_mine.data.workspace import Workspace
import pyarrow as pa
t = time.perf_counter()
Workspace({path!r}).load("train")
print(time.perf_counter() - t, pa.default_memory_pool().backend_name)
"""


def read(args) -> dict:
    import os

    ws = workspace(args.root, args.n_gallery, args.n_queries, args.dim)
    code = _READ.format(repo=str(REPO), path=str(ws.root))
    from cir_mine.data.memory import fast_pool

    pools = {"command line": fast_pool().backend_name, "pyarrow default": "mimalloc"}
    runs: dict = {name: [] for name in pools}
    for _ in range(args.repeats):
        for name, pool in pools.items():
            env = {**os.environ, "ARROW_DEFAULT_MEMORY_POOL": pool}
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            secs, backend = out.stdout.split()[-2:]
            runs[name].append((round(float(secs), 3), backend))
    return {
        "bench": "read",
        "n_gallery": args.n_gallery,
        "n_queries": args.n_queries,
        "dim": args.dim,
        "load_s": {
            name: {"pool": r[0][1], "runs": [s for s, _ in r], "median": float(np.median([s for s, _ in r]))}
            for name, r in runs.items()
        },
    }


_GATHERS = """
import sys, time
import numpy as np
sys.path.insert(0, {repo!r})
np._core.multiarray._set_madvise_hugepage({huge})
from cir_mine.miner.core.search.exact import gathered_dot
rng = np.random.default_rng(0)
xb = np.empty(({n}, {d}), np.float32)
xb[...] = rng.standard_normal(xb.shape, dtype=np.float32)
xq = rng.standard_normal((2048, {d}), dtype=np.float32)
rows = rng.integers(0, {span}, (2048, 600)).astype(np.int64)
gathered_dot(xb, rows, xq)
best = 1e9
for _ in range(5):
    t = time.perf_counter()
    gathered_dot(xb, rows, xq)
    best = min(best, time.perf_counter() - t)
print(best / rows.size * 1e9)
"""


def gathers(args) -> dict:
    out = {}
    for pages, huge in (("huge pages", True), ("4 KiB pages", False)):
        for rows, span in (("whole gallery", args.n_gallery), ("one 8,192-row block", min(8192, args.n_gallery))):
            code = _GATHERS.format(repo=str(REPO), huge=huge, n=args.n_gallery, d=args.dim, span=span)
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            out[f"{pages}, {rows}"] = round(float(r.stdout.split()[-1]), 1)
    return {"bench": "gathers", "n_gallery": args.n_gallery, "dim": args.dim, "ns_per_pair": out}


def survivors_bench(args) -> dict:
    """The bfloat16 scan's seconds with its survivor kernels compiled and as numpy code, alternated
    in one process on the bench workspace's first 4,096 queries (the fastest of ``--repeats``)."""
    import torch

    from cir_mine.miner.accel import survivors
    from cir_mine.miner.accel.bf16 import Bf16Scan

    ws = workspace(args.root, args.n_gallery, args.n_queries, args.dim)
    xb, xq = queries(ws)
    xq = xq[:4096]
    scan = Bf16Scan(np.ascontiguousarray(xb))
    scan.prepare()
    compiled = survivors.KERNELS
    rows = []
    for depth in (216, 828, 2048):
        best = {}
        for _ in range(args.repeats):
            for name, kernels in (("compiled", compiled), ("numpy", None)):
                survivors.KERNELS = kernels
                t = time.perf_counter()
                with torch.inference_mode():
                    scan(xq, depth)
                best[name] = min(best.get(name, 1e9), time.perf_counter() - t)
        survivors.KERNELS = compiled
        us = {k: round(v / len(xq) * 1e6, 1) for k, v in best.items()}
        rows.append(
            {"depth": depth, "us_per_query": us, "numpy_over_compiled": round(best["numpy"] / best["compiled"], 2)}
        )
    return {
        "bench": "survivors",
        "n_gallery": args.n_gallery,
        "dim": args.dim,
        "queries": len(xq),
        "isas": compiled.isas() if compiled is not None else [],
        "rows": rows,
    }


def _rescore_after(xb, xq, I, k):
    """exact_rescore as two steps: every score (gathered_dot, window by window), then topk_desc."""
    from cir_mine.miner.core.search import exact

    return exact.topk_desc(exact.gathered_dot(xb, I, xq), I, k)


def windows_bench(args) -> dict:
    """gathered_dot of the scan's rows window by window and in one call, and exact_rescore with its
    top-k from the windows' sort keys and as topk_desc after gathered_dot, alternated in one process."""
    from cir_mine.miner.accel.bf16 import Bf16Scan
    from cir_mine.miner.core.search import exact

    ws = workspace(args.root, args.n_gallery, args.n_queries, args.dim)
    xb, xq = queries(ws)
    xb, xq = np.ascontiguousarray(xb, np.float32), np.ascontiguousarray(xq[:4096], np.float32)
    scan = Bf16Scan(xb)
    scan.prepare()
    compiled = exact.WINDOWS
    rows = []
    for k in (200, 400, 800):  # a cut at k, searched cut_depth(k) deep, as mining asks
        depth = exact.cut_depth(k)
        _, I = scan(xq, depth, k)
        best, got = {}, {}
        for _ in range(args.repeats):
            for name, kernels in (("windows", compiled), ("one call", None)):
                exact.WINDOWS = kernels
                t = time.perf_counter()
                got[name] = exact.gathered_dot(xb, I, xq)
                best[name] = min(best.get(name, 1e9), time.perf_counter() - t)
            exact.WINDOWS = compiled
            for name, top in (("top-k from keys", exact.exact_rescore), ("top-k after", _rescore_after)):
                t = time.perf_counter()
                got[name] = top(xb, xq, I, k)
                best[name] = min(best.get(name, 1e9), time.perf_counter() - t)
        exact.WINDOWS = compiled
        keys, after = got["top-k from keys"], got["top-k after"]
        rows.append(
            {
                "depth": depth,
                "rows_per_query": round(float((I >= 0).sum(1).mean()), 1),
                "ms": {k: round(v * 1e3, 1) for k, v in best.items()},
                "one_call_over_windows": round(best["one call"] / best["windows"], 2),
                "same_bits": bool(np.array_equal(got["windows"].view(np.int32), got["one call"].view(np.int32))),
                "rescore_after_over_keys": round(best["top-k after"] / best["top-k from keys"], 2),
                "same_top": bool(
                    np.array_equal(keys[1], after[1])
                    and np.array_equal(keys[0].view(np.int32), after[0].view(np.int32))
                ),
            }
        )
    return {"bench": "windows", "n_gallery": args.n_gallery, "dim": args.dim, "queries": len(xq), "rows": rows}


def pages(args) -> dict:
    """Seconds to fill 1 GiB that numpy allocates right after freeing the same amount, and after
    a 5 s pause (a VM that reports free pages to its host hands them back in between, and faults
    them in from the host again), alternated --repeats times."""
    size = 1 << 27  # float64 values: 1 GiB

    def fill() -> tuple:
        t = time.perf_counter()
        a = np.ones(size)
        return time.perf_counter() - t, a

    first, a = fill()
    runs: dict = {"at once": [], "after 5 s": []}
    for _ in range(args.repeats):
        for name, wait in (("at once", 0.0), ("after 5 s", 5.0)):
            del a
            time.sleep(wait)
            secs, a = fill()
            runs[name].append(round(secs, 3))
    return {"bench": "pages", "gib": 1, "first_fill_s": round(first, 3), "refill_s": runs}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "bench",
        choices=["speed", "memory", "st", "kernels", "read", "gathers", "speed-one", "survivors", "windows", "pages"],
    )
    p.add_argument("--n-gallery", type=int, default=200_000)
    p.add_argument("--n-queries", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("-k", type=int, default=100)
    p.add_argument("--candidates", type=int, default=None, help="speed: search depth per query (default: the config's)")
    p.add_argument("--no-deepen", action="store_true", help="speed: single pass (max_candidates None)")
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="speed: bare and mined runs alternated this many times, the fastest of each kept; read: "
        "loads per pool, alternated",
    )
    p.add_argument(
        "--select-threads",
        type=int,
        default=None,
        help="speed: threads guarding and selecting a batch (default: one per core, schedule.select_threads)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="speed: each run of each side in a process of its own (as a user runs the command and a script)",
    )
    p.add_argument("--side", choices=["bare", "mine"], help="speed-one: the side to time")
    p.add_argument("--queries", type=Path, help="speed-one: the queries (.npy)")
    p.add_argument("--delta-lo", type=float, default=0.02)
    p.add_argument("--delta-hi", type=float, default=0.2)
    p.add_argument("--root", type=Path, default=Path("/tmp/cir-mine-bench"))
    args = p.parse_args()
    print(
        json.dumps(
            {
                "speed": speed,
                "memory": memory,
                "st": st,
                "kernels": kernels,
                "read": read,
                "gathers": gathers,
                "speed-one": speed_one,
                "survivors": survivors_bench,
                "windows": windows_bench,
                "pages": pages,
            }[args.bench](args)
        ),
        flush=True,
    )


if __name__ == "__main__":
    import pyarrow as pa

    from cir_mine.data.memory import prefer_fast_pool

    SCRIPT_POOL = pa.default_memory_pool()
    prefer_fast_pool()  # Arrow's memory pool, as the command line sets it
    main()
