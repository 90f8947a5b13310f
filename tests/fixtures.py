"""Tiny datasets written in the real on-disk layouts: dataset folders (FashionIQ, CIRR, folder), PNGs,
workspaces from explicit arrays, negatives tables, a tiny open_clip config. In-memory tables and the
fake miner are in tests/builders.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from cir_mine.data.workspace import Workspace, gallery_table, l2_normalize, triplets_table, write_table
from cir_mine.miner.core.attributes import attr_overlap
from cir_mine.miner.core.tables import write_negatives

COLORS = {"black": (10, 10, 10), "white": (245, 245, 245), "red": (220, 30, 30), "blue": (30, 60, 220)}


def write_png(path: Path, rgb, size: int = 32, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb)[None, None, :] + rng.integers(-20, 20, (size, size, 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def make_fashioniq(
    root: Path, split: str = "train", n_per_cat: int = 6, images: bool = True, ext: str = ".png"
) -> Path:
    """A FashionIQ-layout folder: captions, image_splits, tags and (optionally) PNG images."""
    root = Path(root)
    colors = list(COLORS)
    for ci, cat in enumerate(("dress", "shirt", "toptee")):
        asins = [f"B{ci}{i:08d}" for i in range(n_per_cat)]
        (root / "image_splits").mkdir(parents=True, exist_ok=True)
        (root / "image_splits" / f"split.{cat}.{split}.json").write_text(json.dumps(asins))
        caps = []
        for i in range(n_per_cat - 1):
            tgt_color = colors[(i + 1) % len(colors)]
            caps.append(
                {
                    "candidate": asins[i],
                    "target": asins[i + 1],
                    "captions": [f"is {tgt_color} with short sleeves", f"is {tgt_color}"],
                }
            )
        (root / "captions").mkdir(parents=True, exist_ok=True)
        (root / "captions" / f"cap.{cat}.{split}.json").write_text(json.dumps(caps))
        tags = {
            a: [[cat], [], ["cotton"] if i % 2 else ["silk"], [], ["sleeve"], ["casual"]] for i, a in enumerate(asins)
        }
        (root / "tags").mkdir(parents=True, exist_ok=True)
        (root / "tags" / f"asin2attr.{cat}.{split}.json").write_text(json.dumps(tags))
        if images:
            for i, a in enumerate(asins):
                write_png(root / "images" / f"{a}{ext}", COLORS[colors[i % len(colors)]], seed=ci * 100 + i)
    return root


def add_twin_query(root: Path, split: str = "train", src: str = "dress", dst: str = "toptee") -> None:
    """Append to ``cap.{dst}.{split}.json`` a copy of ``cap.{src}``'s entry 0 (other captions): the
    same (candidate, target) pair in two categories, as 23 pairs of the real FashionIQ train split are."""
    caps = json.loads((root / "captions" / f"cap.{src}.{split}.json").read_text())
    path = root / "captions" / f"cap.{dst}.{split}.json"
    mine = json.loads(path.read_text())
    mine.append({**caps[0], "captions": ["is the same one", "twin"]})
    path.write_text(json.dumps(mine))


class Clip4CirFashionIQ:
    """The shape of CLIP4Cir's ``FashionIQDataset(split, dress_types, 'relative', preprocess)`` in val
    mode: ``.triplets`` (the caption files concatenated in ``dress_types`` order), ``.dress_types``,
    ``.split``; item i -> (candidate name, target name, captions)."""

    def __init__(self, root: Path, split: str, dress_types):
        self.split, self.dress_types, self.triplets = split, list(dress_types), []
        for cat in dress_types:
            self.triplets += json.loads((Path(root) / "captions" / f"cap.{cat}.{split}.json").read_text())

    def __len__(self):
        return len(self.triplets)

    def __getitem__(self, i):
        e = self.triplets[i]
        return e["candidate"], e["target"], e["captions"]


class Clip4CirCIRR:
    """The shape of CLIP4Cir's ``CIRRDataset(split, 'relative', preprocess)`` in val mode."""

    def __init__(self, root: Path, split: str):
        self.split = split
        self.triplets = json.loads((Path(root) / "captions" / f"cap.rc2.{split}.json").read_text())

    def __len__(self):
        return len(self.triplets)

    def __getitem__(self, i):
        e = self.triplets[i]
        return e["reference"], e["target_hard"], e["caption"], e["img_set"]["members"]


def dataset_workspace(
    root: Path, work: Path, dataset: str = "fashioniq", split: str = "train", dim: int = 16, seed: int = 0
) -> Workspace:
    """A workspace of a FashionIQ- or CIRR-layout folder's records with seeded random unit embeddings
    (query ids, categories and names as `cir-mine embed` writes them; no encoder)."""
    from cir_mine.data.adapters import load_dataset

    images, queries = load_dataset(dataset, root, split)
    rng = np.random.default_rng(seed)
    emb = l2_normalize(rng.standard_normal((len(images), dim)).astype(np.float32))
    ws = Workspace(work)
    work.mkdir(parents=True, exist_ok=True)
    write_table(
        gallery_table(
            [r.image_id for r in images], [r.category for r in images], [list(r.attributes) for r in images], emb
        ),
        ws.gallery_path(split),
    )
    text = l2_normalize(rng.standard_normal((len(queries), dim)).astype(np.float32))
    write_table(
        triplets_table(
            [q.query_id for q in queries],
            [q.category for q in queries],
            [q.ref_id for q in queries],
            [q.target_id for q in queries],
            [list(q.captions) for q in queries],
            text,
            extra_positive_ids=[list(q.extra_positive_ids) for q in queries],
            verified_negative_ids=[list(q.verified_negative_ids) for q in queries],
            img_set=[list(q.img_set) for q in queries],
        ),
        ws.triplets_path(split),
    )
    ws.write_manifest(source="test")
    return ws


def make_cirr(root: Path, split: str = "val", n_images: int = 12, images: bool = True) -> Path:
    """A CIRR-layout folder (rc2): captions with target_soft and img_set, split file, PNGs."""
    root = Path(root)
    sub = "dev" if split == "val" else split
    names = [f"{sub}-{i}-0-img0" for i in range(n_images)]
    (root / "image_splits").mkdir(parents=True, exist_ok=True)
    (root / "image_splits" / f"split.rc2.{split}.json").write_text(json.dumps({n: f"./{sub}/{n}.png" for n in names}))
    caps = []
    for i in range(n_images - 2):
        members = [names[(i + j) % n_images] for j in range(6)]
        caps.append(
            {
                "pairid": 1000 + i,
                "reference": names[i],
                "target_hard": names[i + 1],
                "target_soft": {names[i + 1]: 1.0, names[i + 2]: 0.5, names[(i + 3) % n_images]: -1.0},
                "caption": f"show {i + 2} dogs",
                "img_set": {"id": i, "members": members, "reference_rank": 0, "target_rank": 1},
            }
        )
    (root / "captions").mkdir(parents=True, exist_ok=True)
    (root / "captions" / f"cap.rc2.{split}.json").write_text(json.dumps(caps))
    if images:
        for i, n in enumerate(names):
            write_png(root / sub / f"{n}.png", list(COLORS.values())[i % 4], seed=i)
    return root


# A tiny open_clip architecture: random weights embed 32x32 images on CPU in milliseconds.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_tiny_clip_config(path: Path, name: str = "cir-tiny-clip") -> Path:
    """Write the tiny open_clip model config as ``{dir}/{name}.json`` (registered under ``name``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    out = path / f"{name}.json"
    out.write_text(json.dumps(TINY_CLIP))
    return out


def make_folder(root: Path, n_images: int = 8, fmt: str = "csv") -> Path:
    """A folder dataset: PNGs in two sub-folders plus triplets.{csv|jsonl} naming them by id."""
    root = Path(root)
    names = [f"{'tops' if i % 2 else 'dresses'}/img{i:03d}" for i in range(n_images)]
    for i, n in enumerate(names):
        write_png(root / f"{n}.png", list(COLORS.values())[i % 4], seed=500 + i)
    rows = [
        {
            "ref": names[i],
            "target": names[i + 2] + ".png",
            "caption": f"is {list(COLORS)[(i + 2) % 4]}",
            "category": "dress" if i % 2 == 0 else "top",
        }
        for i in range(n_images - 2)
    ]
    if fmt == "csv":
        lines = ["ref,target,caption,category"] + [
            f"{r['ref']},{r['target']},{r['caption']},{r['category']}" for r in rows
        ]
        (root / "triplets.csv").write_text("\n".join(lines) + "\n")
    else:
        (root / "triplets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


# ------------------------------------------------------------------------------------------------
# Workspaces and negatives tables


def tiny_workspace(
    root: Path, gallery_emb: np.ndarray, ids, cats, attrs, queries: list[dict], split="train"
) -> Workspace:
    """Write a workspace from explicit arrays; each query dict has ref, target, text (float[d]) and
    optional extra / verified id lists."""
    ws = Workspace(root)
    root.mkdir(parents=True, exist_ok=True)
    write_table(gallery_table(ids, cats, attrs, l2_normalize(gallery_emb)), ws.gallery_path(split))
    text = l2_normalize(np.stack([q["text"] for q in queries]).astype(np.float32))
    write_table(
        triplets_table(
            [f"q{i:03d}" for i in range(len(queries))],
            [q.get("category", cats[0]) for q in queries],
            [q["ref"] for q in queries],
            [q["target"] for q in queries],
            [[q.get("caption", "is red")] for q in queries],
            text,
            extra_positive_ids=[q.get("extra", []) for q in queries],
            verified_negative_ids=[q.get("verified", []) for q in queries],
        ),
        ws.triplets_path(split),
    )
    ws.write_manifest(source="test")
    return ws


def make_negatives(
    work: Path,
    out: Path,
    split: str = "train",
    k: int = 5,
    strategy: str = "random",
    seed: int = 0,
    mining_round: int = 0,
    n_queries: int | None = None,
    drop: int = 0,
    guards: dict | None = None,
    guards_per_query: dict | None = None,
) -> Path:
    """A valid negatives table written to ``out`` without the miner (for stats/sql/inspect/report).

    Scores come from the zero-shot query ``normalize(ref_emb + text_emb)``; ``strategy="random"`` picks
    uniform gallery items, ``strategy="hardest"`` the top of the ranking; target, reference and extra
    positives are never picked. ``drop`` queries get fewer than k rows and are recorded as shortfall."""
    ws = Workspace(work)
    g, t = ws.load(split)
    rng = np.random.default_rng(seed)
    nq = len(t) if n_queries is None else min(n_queries, len(t))
    ref_rows = g.rows(t.ref_ids[:nq], t.categories[:nq])
    tgt_rows = g.rows(t.target_ids[:nq], t.categories[:nq])
    q = l2_normalize(g.embeddings[ref_rows] + t.text_embeddings[:nq])
    scores = q @ g.embeddings.T  # float32[nq, n]
    order = np.argsort(-scores, axis=1, kind="stable")
    rank_of = np.empty_like(order)
    np.put_along_axis(rank_of, order, np.arange(order.shape[1])[None, :], axis=1)
    cols = {
        c: []
        for c in (
            "query_id",
            "ref_id",
            "target_id",
            "neg_id",
            "neg_category",
            "strategy",
            "rank",
            "score",
            "target_score",
            "delta",
            "round",
            "category_match",
            "attr_overlap",
            "seed",
        )
    }
    short = []
    for i in range(nq):
        banned = {t.ref_ids[i], t.target_ids[i], *t.extra_positive_ids[i]}
        if strategy == "hardest":
            cand = [r for r in order[i, : k + len(banned) + 5] if g.image_ids[r] not in banned]
        else:
            cand = [r for r in rng.permutation(len(g))[: k + len(banned) + 5] if g.image_ids[r] not in banned]
        kk = k - 1 if i < drop else k
        if kk < k:
            short.append(str(t.query_ids[i]))
        ts = float(scores[i, tgt_rows[i]])
        for r in cand[:kk]:
            cols["query_id"].append(t.query_ids[i])
            cols["ref_id"].append(t.ref_ids[i])
            cols["target_id"].append(t.target_ids[i])
            cols["neg_id"].append(g.image_ids[r])
            cols["neg_category"].append(g.categories[r])
            cols["strategy"].append(strategy)
            cols["rank"].append(int(rank_of[i, r]))
            cols["score"].append(float(scores[i, r]))
            cols["target_score"].append(ts)
            cols["delta"].append(ts - float(scores[i, r]))
            cols["round"].append(mining_round)
            cols["category_match"].append(bool(g.categories[r] == g.categories[tgt_rows[i]]))
            cols["attr_overlap"].append(attr_overlap(g.attributes[r], g.attributes[tgt_rows[i]]))
            cols["seed"].append(seed)
    meta = {
        "manifest_hash": ws.manifest_hash(),
        "split": split,
        "round": mining_round,
        "config": {"strategy": strategy, "k": k, "seed": seed},
        "shortfall": {"count": len(short), "query_ids": short},
        "guards": guards if guards is not None else {"target": nq, "reference": nq, "extra_positive": 3},
    }
    if guards_per_query is not None:
        meta["guards_per_query"] = guards_per_query
    write_negatives(pa.table(cols), out, meta)
    return Path(out)


def make_image_work(
    root: Path, n: int = 24, n_queries: int = 6, dim: int = 16, seed: int = 0, absolute: bool = False
) -> tuple[Path, Path]:
    """A workspace whose gallery has a ``path`` column pointing at real PNGs.

    Returns (work, images_root); paths are relative to images_root unless ``absolute``.
    """
    root = Path(root)
    images, work = root / "images", root / "work"
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colors = list(COLORS)
    ids = [f"img{i:03d}" for i in range(n)]
    cats = [("dress", "shirt")[i % 2] for i in range(n)]
    attrs = [[f"color:{colors[i % 4]}", f"sleeve:{('short', 'long')[(i // 4) % 2]}"] for i in range(n)]
    rel = [f"{cats[i]}/{ids[i]}.png" for i in range(n)]
    for i in range(n):
        write_png(images / rel[i], COLORS[colors[i % 4]], size=48, seed=i)
    paths = [str(images / p) for p in rel] if absolute else rel
    emb = l2_normalize(rng.normal(size=(n, dim)).astype(np.float32))
    write_table(gallery_table(ids, cats, attrs, emb, paths=paths), work / "gallery.train.parquet")
    qi = np.arange(n_queries)
    text = l2_normalize(rng.normal(size=(n_queries, dim)).astype(np.float32))
    write_table(
        triplets_table(
            [f"q{i}" for i in qi],
            [cats[2 * i] for i in qi],
            [ids[2 * i] for i in qi],
            [ids[2 * i + 2] for i in qi],
            [[f"is {colors[(2 * i + 2) % 4]}"] for i in qi],
            text,
        ),
        work / "triplets.train.parquet",
    )
    return work, images


def snapshot(*roots) -> dict:
    """{path: sha256 of the bytes} of every file under ``roots`` (files or folders, links followed):
    equal before and after a command means the command left its inputs byte-identical."""
    import hashlib

    out = {}
    for root in map(Path, roots):
        for p in [root] if root.is_file() else sorted(x for x in root.rglob("*") if x.is_file()):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def tree(root: Path) -> list:
    """Every path under ``root`` (relative, sorted), to check that a failed command left nothing behind."""
    root = Path(root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def tiny_synth(out, *extra) -> list:
    """`cir-mine synth` arguments of the small world the reliability tests write (300 images,
    60 queries, d=16), with ``extra`` options (a seed, a split, --overwrite)."""
    return ["synth", "--out", out, "--n-gallery", "300", "--n-triplets", "60", "--dim", "16", *extra, "-q"]
