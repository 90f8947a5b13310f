"""In-memory builders for tests: grouping a table by query, and a deterministic stand-in for the miner
(negatives tables without the mining core). On-disk layouts are in tests/fixtures.py."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from cir_mine.data.workspace import Workspace
from cir_mine.miner.core.tables import NEGATIVES_SCHEMA


def by_query(table) -> dict:
    """query_id -> list of row dicts, in table order."""
    out: dict = {}
    for r in table.to_pylist():
        out.setdefault(r["query_id"], []).append(r)
    return out


def fake_negatives(
    ws: Workspace,
    split: str = "train",
    query_emb=None,
    k: int = 4,
    mining_round: int = 0,
    seed: int = 0,
    strategies=("random", "hardest"),
) -> tuple[pa.Table, dict]:
    """Per query and strategy, k negatives: 'random' uniform, 'hardest' top-scored non-targets.

    query_emb: float32[m, d] (default normalize(ref + text)). Returns (table, footer meta).
    """
    g, t = ws.load(split)
    ref = g.embeddings[g.rows(t.ref_ids.tolist(), t.categories.tolist())]
    tgt_rows = g.rows(t.target_ids.tolist(), t.categories.tolist())
    if query_emb is None:
        q = ref + t.text_embeddings
        query_emb = q / np.linalg.norm(q, axis=1, keepdims=True)
    S = query_emb @ g.embeddings.T
    ts = S[np.arange(len(t)), tgt_rows]
    rng = np.random.default_rng([seed, mining_round])
    cols = {n: [] for n in NEGATIVES_SCHEMA.names}
    order = np.argsort(-S, axis=1)[:, : 4 * k + 4]
    for i in range(len(t)):
        bad = {t.target_ids[i], *t.extra_positive_ids[i]}
        picks = {}
        if "random" in strategies:
            picks["random"] = [r for r in rng.choice(len(g), 2 * k, replace=False) if g.image_ids[r] not in bad][:k]
        if "hardest" in strategies:
            picks["hardest"] = [r for r in order[i] if g.image_ids[r] not in bad][:k]
        for s, rows in picks.items():
            for r in rows:
                for n, v in (
                    ("query_id", t.query_ids[i]),
                    ("ref_id", t.ref_ids[i]),
                    ("target_id", t.target_ids[i]),
                    ("neg_id", g.image_ids[r]),
                    ("neg_category", g.categories[r]),
                    ("strategy", s),
                    ("rank", -1),
                    ("score", S[i, r]),
                    ("target_score", ts[i]),
                    ("delta", ts[i] - S[i, r]),
                    ("round", mining_round),
                    ("category_match", g.categories[r] == t.categories[i]),
                    ("attr_overlap", 0.0),
                    ("seed", seed),
                ):
                    cols[n].append(v)
    table = pa.table({n: pa.array(v, type=NEGATIVES_SCHEMA.field(n).type) for n, v in cols.items()})
    meta = {
        "config": {"strategies": list(strategies), "k": k},
        "manifest_hash": ws.manifest_hash(),
        "split": split,
        "round": mining_round,
    }
    return table, meta


def brute_force_search(xb: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The search oracle: the full score matrix, stable descending sort."""
    S = xq @ xb.T
    I = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(S, I, axis=1), I


# The torch back-end on torch's CPU device, as the mining tests run it beside cfg.index's own
# back-ends: fp32 with the selection kernels raced (FAISS's heaps win on most CPUs), and bf16 with
# torch's top-k, the kernel a GPU runs (so every strategy and guard test covers the GPU's path).
TORCH_BACKENDS = {"torch-fp32": ("fp32", None), "torch-bf16": ("bf16", ("topk",))}


def search_options(index: str) -> tuple[dict, dict]:
    """A test's index name -> (MineConfig options, mine_negatives keyword arguments): a torch
    back-end is passed as a factory, as the device rule's is (``index=device_search``); any other
    name is ``cfg.index``."""
    if index in TORCH_BACKENDS:
        from cir_mine.miner.accel.search import TorchSearch

        precision, kernels = TORCH_BACKENDS[index]
        return {}, {"index": lambda xb, cfg: TorchSearch(xb, "cpu", precision, kernels=kernels)}
    return {"index": index}, {}


def bf16_search(xb: np.ndarray, **kw):
    """Exact search whose candidates all come from the bfloat16 scan (the device rule's CPU kernel)."""
    from cir_mine.miner.accel.bf16 import Bf16Scan
    from cir_mine.miner.core.search.backends import ExactSearch

    return ExactSearch(xb, device="cpu", kernels=("bf16",), scans={"bf16": Bf16Scan(xb)}, **kw)
