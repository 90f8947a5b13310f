"""Generators of tiny datasets in the real on-disk layouts (used by conftest and benches)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

COLORS = {"black": (10, 10, 10), "white": (245, 245, 245), "red": (220, 30, 30), "blue": (30, 60, 220)}


def write_png(path: Path, rgb, size: int = 32, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb)[None, None, :] + rng.integers(-20, 20, (size, size, 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def make_fashioniq(root: Path, split: str = "train", n_per_cat: int = 6, images: bool = True,
                   ext: str = ".png") -> Path:
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
            caps.append({"candidate": asins[i], "target": asins[i + 1],
                         "captions": [f"is {tgt_color} with short sleeves", f"is {tgt_color}"]})
        (root / "captions").mkdir(parents=True, exist_ok=True)
        (root / "captions" / f"cap.{cat}.{split}.json").write_text(json.dumps(caps))
        tags = {a: [[cat], [], ["cotton"] if i % 2 else ["silk"], [], ["sleeve"], ["casual"]]
                for i, a in enumerate(asins)}
        (root / "tags").mkdir(parents=True, exist_ok=True)
        (root / "tags" / f"asin2attr.{cat}.{split}.json").write_text(json.dumps(tags))
        if images:
            for i, a in enumerate(asins):
                write_png(root / "images" / f"{a}{ext}", COLORS[colors[i % len(colors)]], seed=ci * 100 + i)
    return root


def make_cirr(root: Path, split: str = "val", n_images: int = 12, images: bool = True) -> Path:
    """A CIRR-layout folder (rc2): captions with target_soft and img_set, split file, PNGs."""
    root = Path(root)
    sub = "dev" if split == "val" else split
    names = [f"{sub}-{i}-0-img0" for i in range(n_images)]
    (root / "image_splits").mkdir(parents=True, exist_ok=True)
    (root / "image_splits" / f"split.rc2.{split}.json").write_text(
        json.dumps({n: f"./{sub}/{n}.png" for n in names}))
    caps = []
    for i in range(n_images - 2):
        members = [names[(i + j) % n_images] for j in range(6)]
        caps.append({"pairid": 1000 + i, "reference": names[i], "target_hard": names[i + 1],
                     "target_soft": {names[i + 1]: 1.0, names[i + 2]: 0.5, names[(i + 3) % n_images]: -1.0},
                     "caption": f"show {i + 2} dogs", "img_set": {"id": i, "members": members,
                                                                  "reference_rank": 0, "target_rank": 1}})
    (root / "captions").mkdir(parents=True, exist_ok=True)
    (root / "captions" / f"cap.rc2.{split}.json").write_text(json.dumps(caps))
    if images:
        for i, n in enumerate(names):
            write_png(root / sub / f"{n}.png", list(COLORS.values())[i % 4], seed=i)
    return root


# A tiny open_clip architecture (issue 3): random weights embed 32x32 images on CPU in milliseconds.
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
    rows = [{"ref": names[i], "target": names[i + 2] + ".png", "caption": f"is {list(COLORS)[(i + 2) % 4]}",
             "category": "dress" if i % 2 == 0 else "top"} for i in range(n_images - 2)]
    if fmt == "csv":
        lines = ["ref,target,caption,category"] + [f"{r['ref']},{r['target']},{r['caption']},{r['category']}" for r in rows]
        (root / "triplets.csv").write_text("\n".join(lines) + "\n")
    else:
        (root / "triplets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def snapshot(*roots) -> dict:
    """{path: sha256 of the bytes} of every file under ``roots`` (files or folders, links followed):
    equal before and after a command means the command left its inputs byte-identical."""
    import hashlib

    out = {}
    for root in map(Path, roots):
        for p in ([root] if root.is_file() else sorted(x for x in root.rglob("*") if x.is_file())):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def tree(root: Path) -> list:
    """Every path under ``root`` (relative, sorted), to check that a failed command left nothing behind."""
    root = Path(root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []
