"""Benchmarks of `cir-mine negatives` (numbers go to docs/benchmarks.md, section "Negatives").

  (a) speed:  python bench/negatives.py speed  --n-gallery 200000 --n-queries 50000 --dim 512 -k 100
      end-to-end midzone mining (load, index, search, guards, sampling, write) vs a bare
      faiss.IndexFlatIP.search of the same queries with the same k, measured in one process.
  (b) memory: python bench/negatives.py memory --n-gallery 1000000 --n-queries 2000 --dim 512 -k 100
      peak RSS of `cir-mine negatives` in a fresh process vs (gallery bytes + index bytes).
  (c) st:     python bench/negatives.py st --n-gallery 200000 --n-queries 10000 --dim 512 -k 100
      sentence-transformers mine_hard_negatives on the same embeddings (its embedding cache filled
      first, FAISS search, same candidate window and margin) vs cir-mine on the same workspace.
Workspaces are generated once under --root (default /tmp/cir-mine-bench) and reused.
"""
from __future__ import annotations

import argparse
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


def speed(args) -> dict:
    import faiss

    ws = workspace(args.root, args.n_gallery, args.n_queries, args.dim)
    xb, xq = queries(ws)
    index = faiss.IndexFlatIP(xb.shape[1])
    t = time.perf_counter()
    index.add(xb)
    t_add = time.perf_counter() - t
    t = time.perf_counter()
    index.search(xq, args.k)
    t_bare = time.perf_counter() - t
    del index, xb, xq
    cfg = MineConfig.of(strategy="midzone", k=args.k, delta_lo=args.delta_lo, delta_hi=args.delta_hi)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        res = mine_to_file(ws, "train", cfg, Path(tmp) / "negs.parquet")
        t_mine = time.perf_counter() - t
    return {"bench": "speed", "n_gallery": args.n_gallery, "n_queries": args.n_queries, "dim": args.dim,
            "k": args.k, "depth": res.meta["depth"], "faiss_threads": faiss.omp_get_max_threads(),
            "bare_add_s": round(t_add, 2), "bare_search_s": round(t_bare, 2), "mine_total_s": round(t_mine, 2),
            "mine_timing": res.meta["timing"], "rows": res.meta["n_rows"], "shortfall": res.meta["shortfall"]["count"],
            "ratio_total_vs_search": round(t_mine / t_bare, 3),
            "ratio_total_vs_add_search": round(t_mine / (t_add + t_bare), 3)}


def memory(args) -> dict:
    ws = workspace(args.root, args.n_gallery, args.n_queries, args.dim)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-c", "from cir_mine.cli import mine_main; mine_main()", "negatives", "--work", str(ws.root),
               "--strategy", "midzone", "-k", str(args.k), "--out", str(Path(tmp) / "negs.parquet"), "-q"]
        t = time.perf_counter()
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if r.returncode:
            raise SystemExit(r.stderr)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    gallery = args.n_gallery * args.dim * 4
    return {"bench": "memory", "n_gallery": args.n_gallery, "n_queries": args.n_queries, "dim": args.dim,
            "k": args.k, "peak_rss_gib": round(peak / 2 ** 30, 3), "gallery_plus_index_gib": round(2 * gallery / 2 ** 30, 3),
            "ratio": round(peak / (2 * gallery), 3), "wall_s": round(wall, 1), "summary": r.stdout.strip().splitlines()[0]}


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
    for kind, texts, emb in (("query", qtexts, xq), ("corpus", list(dict.fromkeys(corpus + t.target_ids.tolist())), xb)):
        h = hashlib.sha256(repr((name, None, None, texts)).encode()).hexdigest()
        np.save(cache / f"{kind}_embeddings_{h}.npy", emb)
    ds = Dataset.from_dict({"anchor": qtexts, "positive": t.target_ids.tolist()})
    t0, c0 = time.perf_counter(), _cpu()
    out = mine_hard_negatives(ds, _Precomputed(args.dim), corpus=corpus, range_max=depth, num_negatives=args.k,
                              absolute_margin=args.delta_lo, sampling_strategy="random", use_faiss=True,
                              faiss_batch_size=4096, output_format="n-tuple", cache_folder=str(cache), verbose=False)
    t_st, c_st = time.perf_counter() - t0, _cpu() - c0
    cfg = MineConfig.of(strategy="midzone", k=args.k, candidates=depth, delta_lo=args.delta_lo, delta_hi=2.0,
                     rho=None, dup_threshold=None)
    t0, c0 = time.perf_counter(), _cpu()
    res = mine_negatives(ws, "train", cfg)
    t_ours, c_ours = time.perf_counter() - t0, _cpu() - c0
    # the same window through an IVF index tuned to candidate recall 0.98 (index build included),
    # its recall and the overlap of its negatives with exact mining measured on 500 queries
    t0, c0 = time.perf_counter(), _cpu()
    ivf = mine_negatives(ws, "train", cfg.replace(index="ivf", check_recall=500))
    t_ivf, c_ivf = time.perf_counter() - t0, _cpu() - c0
    for f in cache.iterdir():
        os.remove(f)
    cache.rmdir()
    chk = ivf.meta["search"]["check"]
    return {"bench": "st", "n_gallery": args.n_gallery, "n_queries": args.n_queries, "dim": args.dim, "k": args.k,
            "window": f"ranks < {depth}, delta > {args.delta_lo}, random sampling",
            "st_rows": len(out), "st_s": round(t_st, 2), "st_cpu_s": round(c_st, 2), "st_candidate_recall": 1.0,
            "cir_mine_s": round(t_ours, 2), "cir_mine_cpu_s": round(c_ours, 2), "cir_mine_rows": res.meta["n_rows"],
            "cir_mine_candidate_recall": 1.0,
            "cir_mine_ivf_s": round(t_ivf, 2), "cir_mine_ivf_cpu_s": round(c_ivf, 2), "ivf_factory": ivf.meta["search"]["factory"],
            "ivf_params": ivf.meta["search"]["params"], "ivf_candidate_recall": chk["candidate_recall"],
            "ivf_negative_overlap": chk["negative_overlap"],
            "ratio_cir_mine_vs_st": round(t_ours / t_st, 3), "ratio_cir_mine_vs_st_cpu": round(c_ours / c_st, 3),
            "ratio_cir_mine_ivf_vs_st_cpu": round(c_ivf / c_st, 3)}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", choices=["speed", "memory", "st"])
    p.add_argument("--n-gallery", type=int, default=200_000)
    p.add_argument("--n-queries", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("-k", type=int, default=100)
    p.add_argument("--delta-lo", type=float, default=0.02)
    p.add_argument("--delta-hi", type=float, default=0.2)
    p.add_argument("--root", type=Path, default=Path("/tmp/cir-mine-bench"))
    args = p.parse_args()
    print(json.dumps({"speed": speed, "memory": memory, "st": st}[args.bench](args)), flush=True)


if __name__ == "__main__":
    main()
