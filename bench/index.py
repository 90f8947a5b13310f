"""Mining through an index (numbers go to docs/benchmarks.md, section "Mining through an index").

  (a) compare: python bench/index.py compare --n-gallery 1000000 --n-queries 20000 --dim 256 [--reuse-index] [--fresh]
      hardest top-50 mining through exact flat search, IVF and HNSW (exact re-ranking, default
      settings: tuned to candidate recall 0.98), each against exact mining: wall and CPU seconds,
      the share of each query's hardest-50 negatives equal to exact mining's, the recall report;
      the index is built into the workspace (`cir-mine index`), timed apart (it is built once and
      reused by every round), and mined through as `--index workspace` (loading and tuning counted);
      and single-pass exact mining (no deepening) against the bare faiss.IndexFlatIP search at the
      same depth.
  (b) deepen:  python bench/index.py deepen --n-gallery 100000 --n-queries 10000 --dim 256
      midzone k=10 with and without deepening: the deepening passes' seconds against a full search.
  (c) lists:   python bench/index.py lists --n-gallery 1000000 --n-queries 20000 --dim 256 --nprobe 64
      IVF-Flat candidates of the composed queries (the same exact coarse assignment for all) at
      depth 200 and 2048: FAISS contrib's big_batch_search with a numpy pairwise-score function
      (the baseline), FAISS's own search of the assigned lists, and the list-major kernel; then the
      back-end's exact top-k (kernel race, exact cut) at the same depths; and the back-end's search
      at a deepening run's reserve depth (800, batches of 4096) against its deepest (2048, batches
      of 1600), both probing --deep-nprobe lists as a tuned run does (LISTS_DEEP_SHARE).
  (d) build:   python bench/index.py build --n-gallery 1000000 --n-queries 20000 --dim 256
      an IVF-Flat over the gallery (the `ivf` factory string) trained and filled by cir-mine's
      builder (exact k-means assignment, rows added to their exact nearest lists) and by FAISS's
      own `train` and `add`, alternated in one process: seconds of each step, and the SHA-256 of
      each index file (cir-mine's is the same under every OPENBLAS_CORETYPE; compare runs).
All ratios come from one process and one workspace (generated once under --root and reused).
CPU seconds are the process's user + system time (all threads), the fair measure on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cir_mine.data.synthetic import SynthConfig, generate  # noqa: E402
from cir_mine.data.workspace import Workspace  # noqa: E402
from cir_mine.miner.core.mine import MineConfig, mine_negatives  # noqa: E402
from cir_mine.miner.accel import device_search  # noqa: E402  (what cir-mine negatives hands the core)
from cir_mine.miner.encode.index import index_workspace  # noqa: E402


def workspace(root: Path, n: int, m: int, d: int) -> Workspace:
    path = root / f"synth-{n}-{m}-{d}"
    if not (path / "manifest.json").exists():
        t = time.perf_counter()
        generate(SynthConfig(n_gallery=n, n_triplets=m, dim=d, seed=0), path)
        print(f"generated {path} in {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
    return Workspace(path)


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Clock:
    def __enter__(self):
        self.w, self.c = time.perf_counter(), cpu()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = round(time.perf_counter() - self.w, 2), round(cpu() - self.c, 2)


def neg_sets(table) -> dict:
    out: dict = {}
    for q, n in zip(table.column("query_id").to_pylist(), table.column("neg_id").to_pylist()):
        out.setdefault(q, set()).add(n)
    return out


def overlap(a: dict, ref: dict) -> float:
    """Share of exact mining's negatives (per query, pooled) that ``a`` also picked."""
    hit = sum(len(a.get(q, set()) & s) for q, s in ref.items())
    return round(hit / max(1, sum(len(s) for s in ref.values())), 4)


def compare(args) -> dict:
    import faiss

    ws = workspace(args.root, args.n_gallery, args.n_queries, args.dim)
    loaded = ws.load("train")
    g = loaded[0]
    base = dict(strategy="hardest", k=args.k, check_recall=args.check_recall)
    # each finished row is kept under --root, so an interrupted run resumes at the next row
    done_path = ws.root / f"compare-k{args.k}-c{args.check_recall}.json"
    if args.fresh and done_path.exists():
        done_path.replace(done_path.with_suffix(f".{int(time.time())}.json"))
    done = json.loads(done_path.read_text()) if done_path.exists() else {}

    def keep(name, row, negs):
        done[name] = {"row": row, "negs": {q: sorted(v) for q, v in negs.items()}}
        done_path.write_text(json.dumps(done))
        print(json.dumps({name: row}), file=sys.stderr, flush=True)

    rows = {}
    if "flat" not in done:
        with Clock() as c:
            exact = mine_negatives(ws, "train", MineConfig.of(**base), loaded=loaded, index=device_search)
        keep(
            "flat",
            {
                "wall_s": c.wall,
                "cpu_s": c.cpu,
                "timing": exact.meta["timing"],
                "overlap": 1.0,
                "depth": exact.meta["depth"],
            },
            neg_sets(exact.table),
        )
        del exact
    rows["flat"] = done["flat"]["row"]
    ref = {q: set(v) for q, v in done["flat"]["negs"].items()}
    depth = rows["flat"]["depth"]
    for kind in args.indexes:
        if kind in done:
            rows[kind] = done[kind]["row"]
            continue
        saved = ws.root / "index.train.faiss.json"
        prior = json.loads(saved.read_text()) if saved.exists() else {}
        if args.reuse_index and prior.get("spec") == kind:
            # the index an earlier run built into this workspace (its build timed then); mining
            # checks it against the gallery's hash and refuses a stale one
            b, meta = None, prior
        else:
            with Clock() as b:
                # built once into the workspace, as `cir-mine index --index KIND` does; every round reuses it
                meta = index_workspace(ws.root, "train", kind, device=args.device)
        factory = meta["factory"]
        cfg = MineConfig.of(**base, index="workspace", device=args.device)
        with Clock() as c:
            # loading, tuning and mining, as `cir-mine negatives --index workspace` does
            res = mine_negatives(ws, "train", cfg, loaded=loaded, index=device_search)
        tuning = res.meta["search"]["tuning"]
        rows[kind] = {
            "factory": factory,
            "build_wall_s": b and b.wall,
            "build_cpu_s": b and b.cpu,
            "wall_s": c.wall,
            "cpu_s": c.cpu,
            "timing": res.meta["timing"],
            "tuning": tuning,
            "check": res.meta["search"].get("check"),
            "overlap": overlap(neg_sets(res.table), ref),
            "speedup_cpu": round(rows["flat"]["cpu_s"] / c.cpu, 2),
            "speedup_wall": round(rows["flat"]["wall_s"] / c.wall, 2),
            "speedup_cpu_with_build": b and round(rows["flat"]["cpu_s"] / (c.cpu + b.cpu), 2),
        }
        check = rows[kind]["check"]
        if check:  # the recall check is a measurement the run was asked for, not mining
            rows[kind]["speedup_wall_without_check"] = round(rows["flat"]["wall_s"] / (c.wall - check["seconds"]), 2)
        keep(kind, rows[kind], {})
        del res
    if args.no_single_pass:
        return {
            "bench": "index-compare",
            "n_gallery": args.n_gallery,
            "n_queries": args.n_queries,
            "dim": args.dim,
            "k": args.k,
            "depth": depth,
            "faiss_threads": faiss.omp_get_max_threads(),
            "rows": rows,
        }
    # single pass: exact mining without deepening vs the bare flat search at the same depth
    xb = g.embeddings
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    from cir_mine.miner.core.prepare import prepare

    prep = prepare(ws, "train", MineConfig.of(**base), None, 0, loaded)
    with Clock() as bare:
        for s in range(0, prep.m, 4096):
            index.search(prep.qs.emb[s : s + 4096], depth)
    del index
    with Clock() as single:
        sp = mine_negatives(
            ws,
            "train",
            MineConfig.of(strategy="hardest", k=args.k, max_candidates=None),
            loaded=loaded,
            index=device_search,
        )
    return {
        "bench": "index-compare",
        "n_gallery": args.n_gallery,
        "n_queries": args.n_queries,
        "dim": args.dim,
        "k": args.k,
        "depth": depth,
        "faiss_threads": faiss.omp_get_max_threads(),
        "rows": rows,
        "single_pass": {
            "bare_search_wall_s": bare.wall,
            "bare_search_cpu_s": bare.cpu,
            "mine_wall_s": single.wall,
            "mine_cpu_s": single.cpu,
            "timing": sp.meta["timing"],
            "ratio_cpu": round(single.cpu / bare.cpu, 3),
            "ratio_wall": round(single.wall / bare.wall, 3),
        },
    }


def deepen(args) -> dict:
    ws = workspace(args.root, args.n_gallery, args.n_queries, args.dim)
    loaded = ws.load("train")
    out = {}
    for name, mc in (("single", None), ("deepen", 2048)):
        with Clock() as c:
            r = mine_negatives(
                ws,
                "train",
                MineConfig.of(strategy="midzone", k=10, max_candidates=mc),
                loaded=loaded,
                index=device_search,
            )
        out[name] = {
            "wall_s": c.wall,
            "cpu_s": c.cpu,
            "timing": r.meta["timing"],
            "deepened": r.meta["deepened_queries"],
            "depth": r.meta["depth"],
            "shortfall": r.meta["shortfall"]["count"],
        }
    s, d = out["single"], out["deepen"]
    out["extra_cpu_vs_single"] = round((d["cpu_s"] - s["cpu_s"]) / s["cpu_s"], 3)
    out["extra_wall_vs_single"] = round((d["wall_s"] - s["wall_s"]) / s["wall_s"], 3)
    return {"bench": "index-deepen", "n_gallery": args.n_gallery, "n_queries": args.n_queries, "dim": args.dim, **out}


def lists(args) -> dict:
    """IVF-Flat candidate kernels against FAISS contrib's big_batch_search (see the module docstring)."""
    import contextlib
    import io

    import faiss
    from faiss.contrib.big_batch_search import big_batch_search

    from cir_mine.miner.core.prepare import prepare
    from cir_mine.miner.core.search.backends import Reranked
    from cir_mine.miner.core.search.lists import ListLayout, coarse_assign, list_major_search

    ws = workspace(args.root, args.n_gallery, args.n_queries, args.dim)
    loaded = ws.load("train")
    xb = loaded[0].embeddings
    saved = ws.root / "index.train.faiss.json"
    if not (saved.exists() and json.loads(saved.read_text()).get("spec") == "ivf"):
        index_workspace(ws.root, "train", "ivf", device="cpu")
    index = faiss.read_index(str(ws.index_path("train")))
    ivf = faiss.downcast_index(index)
    xq = prepare(ws, "train", MineConfig.of(strategy="hardest"), None, 0, loaded).qs.emb
    layout = ListLayout.of(ivf)
    with Clock() as c:
        Dq, Iq = coarse_assign(ivf, xq, args.nprobe, layout.centroids)
    rows = {"assign": {"wall_s": c.wall, "cpu_s": c.cpu}}
    backend = Reranked(index, xb, 1.0, {"index": "ivf"})
    for depth in (200, 2048):
        out = {}
        with Clock() as c, contextlib.redirect_stdout(io.StringIO()):
            ivf.nprobe = args.nprobe
            big_batch_search(
                ivf,
                xq,
                depth,
                method="pairwise_distances",
                q_assign=Iq.copy(),
                pairwise_distances=lambda a, b, metric=None: a @ b.T,
            )
        out["big_batch_search"] = {"wall_s": c.wall, "cpu_s": c.cpu}
        with Clock() as c:
            for s in range(0, len(xq), 4096):
                backend._preassigned(xq[s : s + 4096], depth, Iq[s : s + 4096], Dq[s : s + 4096])
        out["faiss_preassigned"] = {"wall_s": c.wall, "cpu_s": c.cpu}
        with Clock() as c:
            for s in range(0, len(xq), 4096):
                list_major_search(ivf, xq[s : s + 4096], depth, Iq[s : s + 4096], layout)
        out["list_major"] = {"wall_s": c.wall, "cpu_s": c.cpu}
        with Clock() as c:
            for s in range(0, len(xq), 4096):
                backend.search(xq[s : s + 4096], depth, nprobe=args.nprobe)
        out["backend_exact_topk"] = {"wall_s": c.wall, "cpu_s": c.cpu, **backend.measured()}
        base = out["big_batch_search"]["cpu_s"]
        for v in out.values():
            v["cpu_vs_big_batch_search"] = round(v["cpu_s"] / base, 3)
        rows[f"depth {depth}"] = out
    rows["deepest_vs_reserve"] = _deep_cost(backend, xq, args.deep_nprobe)
    return {
        "bench": "index-lists",
        "n_gallery": args.n_gallery,
        "n_queries": len(xq),
        "dim": args.dim,
        "nlist": int(ivf.nlist),
        "nprobe": args.nprobe,
        "faiss_threads": faiss.omp_get_max_threads(),
        "rows": rows,
    }


def _deep_cost(backend, xq, nprobe: int, n: int = 8000) -> dict:
    """CPU µs per query of the back-end's search at the reserve depth (800, batches of 4096) and at
    the deepest (2048, batches of 1600, as the schedule sizes them), both probing ``nprobe`` lists,
    alternated twice; the best of each and their ratio."""
    best = {800: float("inf"), 2048: float("inf")}
    for _ in range(2):
        for depth, step in ((800, 4096), (2048, 1600)):
            with Clock() as c:
                for s in range(0, min(n, len(xq)), step):
                    backend.search(xq[s : min(s + step, n)], depth, nprobe=nprobe)
            best[depth] = min(best[depth], c.cpu * 1e6 / min(n, len(xq)))
    return {
        "nprobe": nprobe,
        "us_800": round(best[800], 1),
        "us_2048": round(best[2048], 1),
        "ratio": round(best[2048] / best[800], 3),
    }


def build(args) -> dict:
    """cir-mine's IVF build against FAISS's own (see the module docstring)."""
    import hashlib

    from cir_mine.miner.core.search.build import TRAIN_PER_LIST, add_rows, build_index, factory_string, sample_rows
    from cir_mine.miner.core.search.faiss_api import load_faiss

    faiss = load_faiss()
    ws = workspace(args.root, args.n_gallery, args.n_queries, args.dim)
    xb = ws.load("train")[0].embeddings
    fs = factory_string("ivf", *xb.shape)
    out = {"factory": fs}
    for name in ("cir-mine", "faiss"):
        with Clock() as train:
            if name == "cir-mine":
                index = build_index(xb, "ivf", device="cpu", add=False)
            else:
                index = faiss.index_factory(xb.shape[1], fs, faiss.METRIC_INNER_PRODUCT)
                ivf = faiss.extract_index_ivf(index)
                ivf.cp.niter, ivf.cp.max_points_per_centroid = 10, TRAIN_PER_LIST
                rows = sample_rows(len(xb), max(TRAIN_PER_LIST * ivf.nlist, 65_536), 0, 7)
                index.train(xb[rows])
        with Clock() as add:
            add_rows(index, xb) if name == "cir-mine" else index.add(xb)
        sha = hashlib.sha256(faiss.serialize_index(index).tobytes()).hexdigest()[:16]
        out[name] = {
            "train_wall_s": train.wall,
            "train_cpu_s": train.cpu,
            "add_wall_s": add.wall,
            "add_cpu_s": add.cpu,
            "sha256": sha,
        }
        del index
    return {"bench": "index-build", "n_gallery": args.n_gallery, "dim": args.dim, **out}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", choices=["compare", "deepen", "lists", "build"])
    p.add_argument("--nprobe", type=int, default=64, help="lists: lists probed per query")
    p.add_argument(
        "--deep-nprobe", type=int, default=173, help="lists: lists probed in the reserve-against-deepest rows"
    )
    p.add_argument("--n-gallery", type=int, default=1_000_000)
    p.add_argument("--n-queries", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("-k", type=int, default=50)
    p.add_argument("--indexes", nargs="+", default=["ivf", "hnsw"])
    p.add_argument("--check-recall", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--no-single-pass", action="store_true", help="compare: skip the single-pass vs bare flat search rows"
    )
    p.add_argument(
        "--reuse-index",
        action="store_true",
        help="compare: mine through the index an earlier run built into the workspace when it is of the same kind "
        "(its build is not timed again)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="compare: measure every row again (the finished rows kept under --root are set aside)",
    )
    p.add_argument("--root", type=Path, default=Path("/tmp/cir-mine-bench"))
    args = p.parse_args()
    print(
        json.dumps({"compare": compare, "deepen": deepen, "lists": lists, "build": build}[args.bench](args)), flush=True
    )


if __name__ == "__main__":
    from cir_mine.data.memory import prefer_fast_pool

    prefer_fast_pool()  # Arrow's memory pool, as the command line sets it
    main()
