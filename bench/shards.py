"""Per-shard search throughput: queries per second per core for one gallery shard, flat (exact) and
IVF-PQ with exact re-ranking (the ShardSearcher that --engine ray runs in each actor), plus the
exact merge of S per-shard lists. Numbers for docs/scale.md.

    nice -n 10 python bench/shards.py --rows 100000 --dim 512 --queries 1000 --train-sample 30000

One FAISS thread; CPU time (process_time) is reported beside wall time because on a shared machine
wall time includes waiting for a core. The gallery is a seeded Gaussian mixture (clusters like CLIP
embeddings have) and the queries are gallery-like points with extra noise (off the gallery, like
composed queries).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def mixture(n: int, d: int, centers: np.ndarray, noise: float, rng) -> np.ndarray:
    x = centers[rng.integers(0, len(centers), n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000, help="rows in the shard")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--depth", type=int, default=128, help="k per query (the miner's default depth)")
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--factory", default="ivfpq", help="approximate shard index (ivfpq: IVF{4 sqrt n},PQ{d/8})")
    ap.add_argument("--train-sample", type=int, default=100_000, help="rows sampled to train IVF-PQ once")
    ap.add_argument("--merge-shards", type=int, default=64, help="S for the merge timing")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import faiss

    from cir_mine.miner.core.search import factory_string
    from cir_mine.miner.core.search.topk import merge_topk
    from cir_mine.miner.distributed.shards import ShardConfig, ShardSearcher, train_shard_index

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    centers = rng.standard_normal((max(16, args.rows // 200), args.dim)).astype(np.float32)
    xb = mixture(args.rows, args.dim, centers, 0.6, rng)
    xq = mixture(args.queries, args.dim, centers, 0.9, rng)
    res = {"rows": args.rows, "dim": args.dim, "queries": args.queries, "depth": args.depth}

    flat = ShardSearcher(xb, 0)
    (Df, If), w, c = timed(lambda: flat.search(xq, args.depth))
    res["flat"] = {
        "wall_s": round(w, 2),
        "cpu_s": round(c, 2),
        "qps_per_core": round(args.queries / c, 1),
        "row_scores_per_core_s": float(f"{args.queries * args.rows / c:.3g}"),
    }

    cfg = ShardConfig(shards=1, index=args.factory, nprobe=args.nprobe, train_sample=min(args.rows, args.train_sample))
    trained, w, c = timed(lambda: train_shard_index(xb, cfg))
    shard, wa, ca = timed(lambda: ShardSearcher(xb, 0, trained, cfg.nprobe, cfg.overfetch, cfg.list_cover))
    fetch = args.depth * cfg.overfetch
    nprobe = shard.probes(fetch)
    shard.ivf.nprobe = nprobe
    (_, Ic), ws_, cs = timed(lambda: shard.index.search(xq, fetch))  # the candidate search alone
    (Da, Ia), w2, c2 = timed(lambda: shard.search(xq, args.depth))  # search + exact re-rank
    recall = float(np.mean([len(np.intersect1d(a, b)) / args.depth for a, b in zip(Ia, If)]))
    scanned = nprobe * args.rows / shard.ivf.nlist
    res["ivfpq"] = {
        "factory": factory_string(args.factory, args.rows, args.dim),
        "nprobe": nprobe,
        "fetch": fetch,
        "train_s": round(w, 2),
        "add_cpu_s": round(ca, 2),
        "search_cpu_s": round(cs, 2),
        "search_rerank_cpu_s": round(c2, 2),
        "wall_s": round(w2, 2),
        "qps_per_core": round(args.queries / c2, 1),
        "rerank_share": round(max(0.0, c2 - cs) / c2, 3),
        "codes_scanned_per_query": int(scanned),
        "codes_per_core_s": float(f"{args.queries * scanned / cs:.3g}"),
        "rerank_candidates_per_core_s": float(f"{args.queries * fetch / max(c2 - cs, 1e-9):.3g}"),
        f"recall_at_{args.depth}_vs_flat": round(recall, 4),
        "index_bytes_per_row": round(faiss.serialize_index(shard.index).size / args.rows, 1),
    }

    S = args.merge_shards
    parts = [(Df[:, : args.depth].copy(), If[:, : args.depth] + s * args.rows) for s in range(S)]
    _, w, c = timed(lambda: merge_topk(parts, args.depth))
    res["merge"] = {"shards": S, "cpu_s": round(c, 3), "queries_per_core_s": round(args.queries / c, 1)}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    from cir_mine.data.memory import prefer_fast_pool

    prefer_fast_pool()  # Arrow's memory pool, as the command line sets it
    main()
