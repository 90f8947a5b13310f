"""Run in a subprocess by tests/test_search_contract.py under a given BLAS kernel and thread count:
prints one JSON object of digests of search results and mined tables, which must be the same under
every kernel. Usage: python -m tests.search_probe WORKSPACE OUT_DIR"""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np


def near_ties(n=3000, d=128, nq=60, seed=9):
    """A gallery whose scores crowd within float32 rounding: many rows at one direction plus noise
    of order 1e-6, so a GEMM's summation order decides which of them pass a cut."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(d)
    xb = (
        base
        + 1e-6 * rng.standard_normal((n, d)) * (rng.random((n, 1)) < 0.7)
        + 0.3 * rng.standard_normal((n, d)) * (rng.random((n, 1)) >= 0.7)
    )
    xb = (xb / np.linalg.norm(xb, axis=1, keepdims=True)).astype(np.float32)
    xq = base + 0.05 * rng.standard_normal((nq, d))
    return xb, (xq / np.linalg.norm(xq, axis=1, keepdims=True)).astype(np.float32)


def digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def searches() -> dict:
    """Exact and IVF-Flat top-k of the near-tie gallery, in one batch and in batches of 7,
    by each candidate kernel (torch's on its CPU device included)."""
    from cir_mine.miner.core.search.backends import ExactSearch, Reranked
    from cir_mine.miner.core.search.build import build_index
    from cir_mine.miner.core.search.measure import KernelRace
    from tests.builders import bf16_search

    xb, xq = near_ties()
    out = {}
    ivf = build_index(xb, "IVF16,Flat", device="cpu")
    from cir_mine.miner.accel.search import TorchSearch

    for name, make in (
        ("flat-faiss", lambda: ExactSearch(xb, device="cpu", kernels=("faiss",))),
        ("flat-gemm", lambda: ExactSearch(xb, device="cpu", kernels=("gemm",))),
        ("flat-bf16", lambda: bf16_search(xb)),
        ("flat-torch-heap", lambda: TorchSearch(xb, "cpu", "fp32", kernels=("heap",))),
        ("flat-torch-bf16-topk", lambda: TorchSearch(xb, "cpu", "bf16", kernels=("topk",))),
        ("ivf-lists", lambda: _ivf(Reranked, KernelRace, ivf, xb, "lists")),
        ("ivf-faiss", lambda: _ivf(Reranked, KernelRace, ivf, xb, "faiss")),
    ):
        backend = make()
        for step in (len(xq), 7):
            parts = [backend.search(xq[s : s + step], 100) for s in range(0, len(xq), step)]
            out[f"{name}/{step}"] = digest(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return out


def _ivf(Reranked, KernelRace, index, xb, kernel):
    backend = Reranked(index, xb, 1.0, {"index": "ivf"})
    backend.race = KernelRace((kernel,))
    backend.set_params({"nprobe": 5})
    return backend


def tables(work: Path, out: Path) -> dict:
    """Mined tables of the workspace (exact and IVF-Flat; hardest and category-discrepant)."""
    from cir_mine.data.workspace import Workspace
    from cir_mine.miner.core.mine import MineConfig, mine_negatives

    ws = Workspace(work)
    res = {}
    for index in ("flat", "IVF16,Flat"):
        for strategy in ("hardest", "category-discrepant"):
            cfg = MineConfig.of(
                strategy=strategy, k=10, index=index, nprobe=None if index == "flat" else 4, query_batch=64
            )
            t = mine_negatives(ws, "train", cfg).table
            res[f"{index}/{strategy}"] = digest(
                *[
                    np.asarray(c.to_numpy(zero_copy_only=False)).astype(str)
                    if c.type == "string"
                    else c.to_numpy(zero_copy_only=False)
                    for c in t.columns
                ]
            )
    return res


def builds() -> dict:
    """The bytes of IVF indexes built in this process: over a gallery of repeated rows (exact ties
    between rows and between k-means centroids, as in a workspace whose images share tags) and over
    the near-tie gallery, each as a mining run builds it and as shards fill a trained one."""
    from cir_mine.miner.core.search.build import add_rows, build_index
    from cir_mine.miner.core.search.faiss_api import load_faiss

    faiss = load_faiss()
    rng = np.random.default_rng(5)
    base = rng.standard_normal((300, 48))
    dups = np.repeat(base, rng.integers(1, 12, 300), axis=0)
    dups = dups[rng.permutation(len(dups))]
    dups = (dups / np.linalg.norm(dups, axis=1, keepdims=True)).astype(np.float32)
    out = {}
    for name, xb, spec in (("repeated", dups, "IVF64,Flat"), ("near-ties", near_ties()[0], "IVF16,Flat")):
        out[name] = digest(faiss.serialize_index(build_index(xb, spec, device="cpu")))
        empty = build_index(xb, spec, device="cpu", add=False)
        add_rows(empty, xb[::-1].copy())
        out[f"{name}/shard"] = digest(faiss.serialize_index(empty))
    return out


if __name__ == "__main__":
    work, out = Path(sys.argv[1]), Path(sys.argv[2])
    print(json.dumps({"searches": searches(), "tables": tables(work, out), "builds": builds()}))
