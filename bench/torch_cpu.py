"""The torch search back-end on torch's CPU device against the numpy exact path, in one run.

    python bench/torch_cpu.py                                  # 100k x 256 gallery, 10k queries, midzone k=10
    python bench/torch_cpu.py --n-gallery 20000 --n-queries 2000 --repeats 1   # a quick look

On one synthetic workspace (bench/gpu.py's: clustered unit rows, composed queries off the gallery's
distribution), times, alternating the two back-ends and keeping each one's best of ``--repeats``
(the machine's load drifts):

- ``search``: every query searched at the depth the miner searches a first batch at (the reserve,
  4x the mining depth), in batches of ``--query-batch``: ``ExactSearch`` (FAISS's flat search or
  numpy's GEMM into FAISS's heaps, raced) against ``TorchSearch`` on the CPU device (fp32, its
  selection kernels raced);
- ``mine``: ``mine_negatives`` through each back-end (the same table: checked), with the footer's
  seconds per stage (search, rerank, guards, select, table), so the share of the post-search work
  beside the search shows.

Prints one JSON object and a markdown table; ``ratio`` is torch / numpy (the goal: at most 1.2).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu import synthetic_workspace  # noqa: E402


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-gallery", type=int, default=100_000)
    ap.add_argument("--n-queries", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--strategy", default="midzone")
    ap.add_argument("--query-batch", type=int, default=4096)
    ap.add_argument("--precision", default="fp32", help="the torch back-end's scores: fp32 | bf16 | fp16")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)

    import torch

    from cir_mine.miner.accel.search import TorchSearch
    from cir_mine.miner.core.mine import MineConfig, mine_negatives
    from cir_mine.miner.core.prepare import prepare
    from cir_mine.miner.core.schedule import reserve_depth
    from cir_mine.miner.core.search.backends import ExactSearch

    with tempfile.TemporaryDirectory() as tmp:
        ws = synthetic_workspace(Path(tmp) / "work", a.n_gallery, a.n_queries, a.dim)
        loaded = ws.load("train")
        cfg = MineConfig.of(strategy=a.strategy, k=a.k, query_batch=a.query_batch, device="cpu")
        prep = prepare(ws, "train", cfg, None, 0, loaded)
        xq, xb = prep.qs.emb, prep.pool.xb
        backends = {"numpy": ExactSearch(xb, device="cpu"), "torch": TorchSearch(xb, "cpu", a.precision)}
        depth = reserve_depth(prep, cfg, backends["numpy"])

        def search(backend):
            for s in range(0, len(xq), a.query_batch):
                backend.search(xq[s : s + a.query_batch], depth)

        for b in backends.values():  # the kernel races settle here
            search(b)
        best = {(what, name): (float("inf"), None) for what in ("search", "mine") for name in backends}
        tables = {}
        for _ in range(a.repeats):
            for name, b in backends.items():
                t = time.perf_counter()
                search(b)
                wall = time.perf_counter() - t
                best["search", name] = min(best["search", name], (wall, None), key=lambda x: x[0])
                t = time.perf_counter()
                res = mine_negatives(ws, "train", cfg, index=b, loaded=loaded)
                wall = time.perf_counter() - t
                if wall < best["mine", name][0]:
                    best["mine", name] = (wall, res.meta["timing"])
                tables[name] = res.table
    same = tables["numpy"].equals(tables["torch"])
    out = {
        "bench": "torch_cpu",
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "gallery": [a.n_gallery, a.dim],
        "queries": a.n_queries,
        "strategy": a.strategy,
        "k": a.k,
        "depth": depth,
        "precision": a.precision,
        "repeats": a.repeats,
        "same_table": bool(same),
        "search_s": {n: round(best["search", n][0], 3) for n in backends},
        "mine_s": {n: round(best["mine", n][0], 3) for n in backends},
        "search_ratio": round(best["search", "torch"][0] / best["search", "numpy"][0], 3),
        "mine_ratio": round(best["mine", "torch"][0] / best["mine", "numpy"][0], 3),
        "stages": {n: {k: v for k, v in best["mine", n][1].items() if k.endswith("_s")} for n in backends},
        "kernels": {n: b.measured().get("kernels") for n, b in backends.items()},
    }
    print(json.dumps(out))
    rows = [
        "| back-end | search (s) | mine (s) | search / rerank / guards / select / table (s) |",
        "| --- | --- | --- | --- |",
    ]
    for n in backends:
        st = out["stages"][n]
        rows.append(
            f"| {n} | {out['search_s'][n]:.2f} | {out['mine_s'][n]:.2f} | "
            + " / ".join(f"{st.get(k + '_s', 0):.2f}" for k in ("search", "rerank", "guards", "select", "table"))
            + " |"
        )
    rows.append(f"| ratio torch / numpy | {out['search_ratio']:.2f} | {out['mine_ratio']:.2f} | same table: {same} |")
    print("\n".join(rows))
    if not same:
        raise SystemExit("bench/torch_cpu.py: the two back-ends mined different tables")
    return out


if __name__ == "__main__":
    from cir_mine.data.memory import prefer_fast_pool

    prefer_fast_pool()  # Arrow's memory pool, as the command line sets it
    main()
