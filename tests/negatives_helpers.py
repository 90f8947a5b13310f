"""Small helpers for the negatives tests: tiny hand-made workspaces and reference checks."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cir_mine.data.workspace import Workspace, gallery_table, l2_normalize, triplets_table, write_table


def tiny_workspace(root: Path, gallery_emb: np.ndarray, ids, cats, attrs, queries: list[dict], split="train") -> Workspace:
    """Write a workspace from explicit arrays; each query dict has ref, target, text (float[d]) and
    optional extra / verified id lists."""
    ws = Workspace(root)
    root.mkdir(parents=True, exist_ok=True)
    write_table(gallery_table(ids, cats, attrs, l2_normalize(gallery_emb)), ws.gallery_path(split))
    text = l2_normalize(np.stack([q["text"] for q in queries]).astype(np.float32))
    write_table(triplets_table(
        [f"q{i:03d}" for i in range(len(queries))], [q.get("category", cats[0]) for q in queries],
        [q["ref"] for q in queries], [q["target"] for q in queries],
        [[q.get("caption", "is red")] for q in queries], text,
        extra_positive_ids=[q.get("extra", []) for q in queries],
        verified_negative_ids=[q.get("verified", []) for q in queries]), ws.triplets_path(split))
    ws.write_manifest(source="test")
    return ws


def by_query(table) -> dict:
    """query_id -> list of row dicts, in table order."""
    out: dict = {}
    for r in table.to_pylist():
        out.setdefault(r["query_id"], []).append(r)
    return out
