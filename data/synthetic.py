"""A synthetic CIR world with known ground truth, written in the workspace format.

Image embedding of an item with category c and attribute values a_g (one per group g)::

    x = normalize(w_cat * C[c] + sum_g salience_g * A[g][a_g] + item_noise * eps)

A triplet picks a reference and changes 1..max_changes attribute groups; its target is another
gallery item with the reference's attributes except the changed ones (so many near-miss candidates
that differ from the target in one group exist, as in real CIR data). The text embedding is built
from the change it describes::

    t = normalize(offset * O + sum_{g changed} (A[g][new] - forget * A[g][old]) + text_noise * eps)

and the captions say the change ("is red and sleeveless"). Gallery items with exactly the target's
category and attributes are recorded as ``extra_positive_ids`` (true positives a miner must never
return as negatives). The world (directions) depends on ``seed`` only; the items depend on
``seed`` and ``split``, so ``train`` and ``val`` of one seed share a world. Generation is chunked:
memory holds one chunk of embeddings plus small integer arrays, whatever the gallery size.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cir_mine.data.errors import UsageError
from cir_mine.data.checks import check_numbers, check_range
from cir_mine.data.io import atomic_path, check_output_dir, write_job
from cir_mine.data.parquet import dictionary_columns
from cir_mine.data.progress import Progress
from cir_mine.data.workspace import Workspace, gallery_schema, gallery_table, l2_normalize, triplets_table, write_table

CATEGORIES = ("dress", "shirt", "toptee")
GROUPS: dict[str, tuple[str, ...]] = {
    "color": ("black", "white", "red", "blue", "green", "yellow", "pink", "purple", "grey", "beige"),
    "sleeve": ("sleeveless", "short", "three-quarter", "long"),  # ordinal (short -> long)
    "pattern": ("solid", "striped", "floral", "plaid", "polka-dot", "graphic"),
    "length": ("mini", "knee-length", "midi", "maxi"),  # ordinal (short -> long)
    "neckline": ("v-neck", "crew-neck", "scoop-neck", "turtleneck", "off-shoulder"),
}
DEFAULT_SALIENCE = {"color": 1.0, "sleeve": 0.8, "pattern": 0.8, "length": 0.6, "neckline": 0.5}
CHUNK = 65536


@dataclass(frozen=True)
class SynthConfig:
    # fmt: off
    n_gallery: int = 20000            # gallery images (targets included)
    n_triplets: int = 5000            # queries (reference + caption -> target); each target is a distinct gallery item
    dim: int = 128                    # embedding dimension
    seed: int = 0                     # world seed (directions) and item seed (same seed, same files)
    split: str = "train"              # split name (gallery.{split}.parquet); items are drawn per split from one world
    category_weight: float = 1.2      # weight of the category direction
    salience: dict = field(default_factory=lambda: dict(DEFAULT_SALIENCE))  # weight per attribute group
    item_noise: float = 2.0           # norm of the per-image noise (look variation)
    text_noise: float = 1.0           # norm of the per-caption noise
    text_offset: float = 1.0          # modality offset between text and image embeddings
    forget: float = 0.5               # how much of the old value the text removes
    max_changes: int = 2              # groups changed per triplet (1..max_changes)
    unmentioned_change: float = 0.15  # chance the target also differs in a group the text omits
    max_extra_positives: int = 20     # cap on recorded exact-attribute twins of the target
    # fmt: on

    def validate(self) -> "SynthConfig":
        check_numbers(self)
        for name in ("item_noise", "text_noise"):
            check_range(name, getattr(self, name), 0.0)
        check_range("unmentioned_change", self.unmentioned_change, 0.0, 1.0)
        for g, w in self.salience.items():
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise UsageError(f"salience {g}={w}: weights must be finite numbers >= 0.", params=("salience",))
        if self.n_gallery < 2 or self.n_triplets < 1:
            raise UsageError("n_gallery must be >= 2 and n_triplets >= 1.", params=("n_gallery", "n_triplets"))
        if self.n_triplets > self.n_gallery // 2:
            raise UsageError(
                f"n_triplets ({self.n_triplets}) must be at most half of n_gallery "
                f"({self.n_gallery}): each target is its own gallery item.",
                params=("n_triplets", "n_gallery"),
            )
        if self.dim < 8:
            raise UsageError("dim must be at least 8.", params=("dim",))
        if not 1 <= self.max_changes <= len(GROUPS):
            raise UsageError(f"max_changes must be in 1..{len(GROUPS)}.")
        unknown = set(self.salience) - set(GROUPS)
        if unknown:
            raise UsageError(
                f"unknown attribute group(s) in salience: {', '.join(sorted(unknown))}; groups are {', '.join(GROUPS)}."
            )
        return self


def keyed_rng(*key) -> np.random.Generator:
    """A generator seeded by ``key`` (ints and strings, strings hashed): one independent stream per key."""
    words = [int(hashlib.sha256(str(k).encode()).hexdigest()[:8], 16) if isinstance(k, str) else int(k) for k in key]
    return np.random.default_rng(words)


@dataclass
class World:
    """The directions of one synthetic world (depends on seed and dim only)."""

    # fmt: off
    category_dirs: np.ndarray          # float32[n_cat, d]
    attr_dirs: dict                    # group -> float32[n_values, d]
    text_offset_dir: np.ndarray        # float32[d]
    # fmt: on

    @classmethod
    def make(cls, seed: int, dim: int) -> "World":
        rng = keyed_rng(seed, "world", dim)
        unit = lambda n: l2_normalize(rng.standard_normal((n, dim)).astype(np.float32))
        cats = unit(len(CATEGORIES))
        attrs = {g: unit(len(v)) for g, v in GROUPS.items()}
        return cls(cats, attrs, unit(1)[0])


def attribute_strings(values: np.ndarray) -> list[str]:
    """uint8[n_groups] -> ["color:red", ...]."""
    return [f"{g}:{GROUPS[g][int(v)]}" for g, v in zip(GROUPS, values)]


def image_embeddings(
    world: World, cfg: SynthConfig, cats: np.ndarray, vals: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """cats: int[n], vals: uint8[n, n_groups] -> float32[n, d] unit rows."""
    x = cfg.category_weight * world.category_dirs[cats]
    for gi, g in enumerate(GROUPS):
        x = x + cfg.salience.get(g, 0.0) * world.attr_dirs[g][vals[:, gi]]
    noise = rng.standard_normal(x.shape).astype(np.float32) / np.sqrt(cfg.dim)
    return l2_normalize(x + cfg.item_noise * noise)


# ------------------------------------------------------------------------------------------------
# Captions


def phrase(group: str, old: str, new: str, style: int) -> str:
    """One caption phrase saying that ``group`` changes from ``old`` to ``new``."""
    if group == "color":
        return (f"is {new}", f"is {new} colored", f"is in {new}")[style % 3]
    if group == "sleeve":
        if style % 3 == 2:
            order = GROUPS["sleeve"]
            return "has longer sleeves" if order.index(new) > order.index(old) else "has shorter sleeves"
        if new == "sleeveless":
            return ("is sleeveless", "has no sleeves")[style % 2]
        return f"has {new} sleeves"
    if group == "pattern":
        if new == "solid":
            return ("is solid", "has no pattern", "is a solid color")[style % 3]
        return (f"is {new}", f"has a {new} pattern", f"is {new}")[style % 3]
    if group == "length":
        if style % 3 == 2:
            order = GROUPS["length"]
            return "is longer" if order.index(new) > order.index(old) else "is shorter"
        return (f"is {new}", f"is a {new} length")[style % 2]
    if group == "neckline":
        return (f"has a {new} neckline", f"has a {new}")[style % 2]
    raise KeyError(group)


def captions_for(changes: list[tuple[str, str, str]], rng: np.random.Generator) -> tuple[str, str]:
    """Two FashionIQ-style captions for a list of (group, old, new) changes."""
    out = []
    for _ in range(2):
        order = rng.permutation(len(changes))
        parts = [phrase(*changes[i], style=int(rng.integers(0, 6))) for i in order]
        out.append(" and ".join(parts))
    return out[0], out[1]


# ------------------------------------------------------------------------------------------------
# Generation


@dataclass
class SynthPlan:
    """Integer description of a split: categories, attribute values and the triplets."""

    # fmt: off
    cats: np.ndarray            # int[n] category index per gallery row
    vals: np.ndarray            # uint8[n, n_groups] attribute value per gallery row
    ref_rows: np.ndarray        # int[m]
    target_rows: np.ndarray     # int[m]
    changed: np.ndarray         # bool[m, n_groups] groups the caption mentions
    prefix: str
    # fmt: on


def plan(cfg: SynthConfig) -> SynthPlan:
    rng = keyed_rng(cfg.seed, "items", cfg.split)
    n, m, ng = cfg.n_gallery, cfg.n_triplets, len(GROUPS)
    sizes = np.array([len(v) for v in GROUPS.values()])
    n_base = n - m
    cats = rng.integers(0, len(CATEGORIES), size=n)
    vals = (rng.random((n, ng)) * sizes).astype(np.uint8)
    ref_logical = rng.integers(0, n_base, size=m)
    changed = np.zeros((m, ng), dtype=bool)
    n_change = rng.integers(1, cfg.max_changes + 1, size=m)
    for j in range(m):
        changed[j, rng.choice(ng, size=n_change[j], replace=False)] = True
    tgt_logical = np.arange(n_base, n)
    cats[tgt_logical] = cats[ref_logical]
    tv = vals[ref_logical].copy()
    # mentioned changes: a different value in each changed group
    shift = (1 + (rng.random((m, ng)) * (sizes - 1))).astype(np.int64)
    tv = np.where(changed, (tv + shift) % sizes, tv)
    # unmentioned changes: sometimes the target differs in a group the caption does not name
    silent = rng.random(m) < cfg.unmentioned_change
    silent_group = rng.integers(0, ng, size=m)
    silent_shift = (1 + (rng.random(m) * (sizes[silent_group] - 1))).astype(np.int64)
    rows = np.flatnonzero(silent & ~changed[np.arange(m), silent_group])
    g = silent_group[rows]
    tv[rows, g] = (tv[rows, g] + silent_shift[rows]) % sizes[g]
    vals[tgt_logical] = tv.astype(np.uint8)
    # shuffle so that targets are not a block at the end of the gallery
    perm = rng.permutation(n)  # logical item -> row
    inv = np.empty(n, dtype=np.int64)
    inv[perm] = np.arange(n)
    cats_rows, vals_rows = cats[inv], vals[inv]
    return SynthPlan(
        cats_rows, vals_rows, perm[ref_logical], perm[tgt_logical], changed, prefix=f"s{cfg.seed}-{cfg.split}"
    )


def image_ids(p: SynthPlan, rows: np.ndarray) -> list[str]:
    return [f"{p.prefix}-{int(r):07d}" for r in rows]


def extra_positives(p: SynthPlan, cap: int) -> list[list[str]]:
    """Per triplet, gallery items whose category and attributes equal the target's (target excluded)."""
    sizes = np.array([len(v) for v in GROUPS.values()], dtype=np.int64)
    code = p.cats.astype(np.int64)
    for gi in range(len(GROUPS)):
        code = code * sizes[gi] + p.vals[:, gi]
    order = np.argsort(code, kind="stable")
    sorted_code = code[order]
    tc = code[p.target_rows]
    lo = np.searchsorted(sorted_code, tc, side="left")
    hi = np.searchsorted(sorted_code, tc, side="right")
    out = []
    for j in range(len(tc)):
        rows = [int(r) for r in order[lo[j] : hi[j]] if r != p.target_rows[j]][:cap]
        out.append(image_ids(p, np.asarray(rows, dtype=np.int64)))
    return out


def generate(cfg: SynthConfig, out: str | Path, progress: Progress = None, overwrite: bool = True) -> dict:
    """Write ``gallery.{split}.parquet``, ``triplets.{split}.parquet`` and the manifest to ``out``
    (``progress``: see :mod:`cir_mine.data.progress`; items are images and triplets).

    All or nothing: a failure (a full disk, a read-only folder) or an interruption (Ctrl-C, SIGTERM:
    :class:`~cir_mine.data.errors.Interrupted`) leaves the workspace as it was. An
    existing split is replaced only with ``overwrite``; a split of another dimension than the
    workspace's other splits is refused.
    """
    cfg.validate()
    check_output_dir(out)
    ws = Workspace(out)
    with write_job(ws.root, "cir-mine synth"):
        ws.check_new_split(cfg.split, cfg.dim, overwrite, flag="out")
        world = World.make(cfg.seed, cfg.dim)
        p = plan(cfg)
        n = cfg.n_gallery
        total = n + cfg.n_triplets
        with atomic_path(ws.gallery_path(cfg.split)) as tmp:
            schema = gallery_schema(cfg.dim)
            with pq.ParquetWriter(tmp, schema, use_dictionary=dictionary_columns(schema)) as writer:
                for start in range(0, n, CHUNK):
                    rows = np.arange(start, min(n, start + CHUNK))
                    emb = image_embeddings(
                        world, cfg, p.cats[rows], p.vals[rows], keyed_rng(cfg.seed, "noise", cfg.split, start // CHUNK)
                    )
                    writer.write_table(
                        gallery_table(
                            image_ids(p, rows),
                            [CATEGORIES[c] for c in p.cats[rows]],
                            [attribute_strings(v) for v in p.vals[rows]],
                            emb,
                        )
                    )
                    if progress:
                        progress(len(rows), total)
        table = triplets_for(cfg, world, p)
        write_table(table, ws.triplets_path(cfg.split), metadata={"synthetic_config": config_dict(cfg)})
        if progress:
            progress(cfg.n_triplets, total)
        return ws.write_manifest(
            source="synthetic",
            encoder={"name": "synthetic", "dim": cfg.dim},
            synthetic={
                **config_dict(cfg),
                "groups": {g: list(v) for g, v in GROUPS.items()},
                "categories": list(CATEGORIES),
            },
        )


def text_embeddings(
    world: World, cfg: SynthConfig, changes: list[list[tuple[str, str, str]]], rng: np.random.Generator
) -> np.ndarray:
    """The synthetic text encoder: per query a list of (group, old, new) -> float32[m, d] unit rows."""
    text = np.zeros((len(changes), cfg.dim), dtype=np.float32) + cfg.text_offset * world.text_offset_dir
    for j, ch in enumerate(changes):
        for g, old, new in ch:
            text[j] += world.attr_dirs[g][GROUPS[g].index(new)] - cfg.forget * world.attr_dirs[g][GROUPS[g].index(old)]
    text += cfg.text_noise * rng.standard_normal(text.shape).astype(np.float32) / np.sqrt(cfg.dim)
    return l2_normalize(text)


def triplets_for(cfg: SynthConfig, world: World, p: SynthPlan) -> pa.Table:
    rng = keyed_rng(cfg.seed, "text", cfg.split)
    names = list(GROUPS)
    ref_vals, tgt_vals = p.vals[p.ref_rows], p.vals[p.target_rows]
    changes, captions = [], []
    for j in range(cfg.n_triplets):
        ch = [
            (names[gi], GROUPS[names[gi]][int(ref_vals[j, gi])], GROUPS[names[gi]][int(tgt_vals[j, gi])])
            for gi in np.flatnonzero(p.changed[j])
        ]
        changes.append(ch)
        captions.append(captions_for(ch, rng))
    text = text_embeddings(world, cfg, changes, rng)
    return triplets_table(
        [f"{p.prefix}-q{j:06d}" for j in range(cfg.n_triplets)],
        [CATEGORIES[c] for c in p.cats[p.ref_rows]],
        image_ids(p, p.ref_rows),
        image_ids(p, p.target_rows),
        captions,
        text,
        extra_positive_ids=extra_positives(p, cfg.max_extra_positives),
    )


def config_from_manifest(manifest: dict) -> SynthConfig:
    """The SynthConfig a synthetic workspace was generated with (from its manifest)."""
    from dataclasses import fields

    raw = manifest.get("synthetic") or {}
    names = {f.name for f in fields(SynthConfig)}
    return SynthConfig(**{k: v for k, v in raw.items() if k in names})


def config_dict(cfg: SynthConfig) -> dict:
    from dataclasses import asdict

    return asdict(cfg)


def parse_salience(spec: Optional[str]) -> dict:
    """'color=1.0,sleeve=0.5' -> {...} merged over the defaults."""
    out = dict(DEFAULT_SALIENCE)
    if not spec:
        return out
    for part in spec.split(","):
        name, sep, val = part.partition("=")
        if not sep or name.strip() not in GROUPS:
            raise UsageError(
                f"bad salience entry {part!r}: use GROUP=WEIGHT with GROUP in {', '.join(GROUPS)}.",
                params=("salience",),
            )
        try:
            out[name.strip()] = float(val)
        except ValueError:
            raise UsageError(f"bad salience weight {val!r} for {name}: not a number.", params=("salience",)) from None
    return out
