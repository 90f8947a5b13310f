"""A small FashionIQ-layout dataset and a tiny "fine-tuned CLIP" for the CLIP4Cir example.

``python examples/clip4cir/fixture.py OUT`` writes:

- ``OUT/fashionIQ_dataset/``: ``captions/cap.{dress,shirt,toptee}.train.json``,
  ``image_splits/split.{cat}.train.json`` and ``images/{ASIN}.png`` (product-photo shaped, taller
  than wide, so CLIP4Cir's target-pad transform pads them), in the release's layout. Each caption
  names its entry, so a test can tell items apart; one (candidate, target) pair is an entry of two
  categories, as 23 pairs of the real train split are.
- ``OUT/tiny-clip.json``: an open_clip model config (QuickGELU, as OpenAI's CLIP), 32x32 images.
- ``OUT/tuned_clip_best.pt``: its random weights saved as CLIP4Cir's ``clip_fine_tune.py`` saves a
  fine-tuned CLIP: ``{"epoch": E, "CLIP": state_dict}``.

No pretrained weights are needed (or downloaded): the example runs end to end on a CPU in seconds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

CATEGORIES = ("dress", "shirt", "toptee")
COLORS = {
    "black": (20, 20, 20),
    "white": (240, 240, 240),
    "red": (210, 40, 40),
    "blue": (40, 70, 210),
    "green": (40, 160, 70),
    "yellow": (230, 210, 40),
}
TINY_CLIP = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _image(path: Path, rgb, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = 48, 30  # portrait, long/short 1.6 > 1.25
    base = np.full((h, w, 3), 250, np.int64)
    top, bottom = 4 + seed % 5, h - 3 - seed % 4  # a garment-ish block on white
    base[top:bottom, 5 : w - 5] = rgb
    base += rng.integers(-12, 12, base.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(path)


def make_fixture(out: str | Path, per_category: int = 16, seed: int = 0) -> dict:
    """Write the dataset, the model config and the checkpoint under ``out``; returns their paths."""
    import torch

    out = Path(out)
    root = out / "fashionIQ_dataset"
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    first_pair = None
    for ci, cat in enumerate(CATEGORIES):
        asins = [f"B{ci}{i:08d}" for i in range(per_category)]
        colors = [names[int(c)] for c in rng.integers(0, len(names), per_category)]
        for i, a in enumerate(asins):
            _image(root / "images" / f"{a}.png", COLORS[colors[i]], seed=100 * ci + i)
        caps = []
        for j in range(2 * per_category):
            r, t = (int(x) for x in rng.choice(per_category, 2, replace=False))
            caps.append(
                {
                    "candidate": asins[r],
                    "target": asins[t],
                    "captions": [f"is {colors[t]} not {colors[r]}", f"{cat} entry {j}"],
                }
            )
        if first_pair is None:
            first_pair = caps[0]
        elif cat == "toptee":
            caps.append({**first_pair, "captions": ["is the same one", "toptee twin entry"]})
        (root / "captions").mkdir(parents=True, exist_ok=True)
        (root / "captions" / f"cap.{cat}.train.json").write_text(json.dumps(caps))
        (root / "image_splits").mkdir(parents=True, exist_ok=True)
        (root / "image_splits" / f"split.{cat}.train.json").write_text(json.dumps(asins))
    config = out / "tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    import open_clip

    open_clip.add_model_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model("tiny-clip")
    with torch.no_grad():  # random ViT features hardly depend on the image (cosine ~0.98)
        model.visual.class_embedding.zero_()  # without the class and position embeddings the
        model.visual.positional_embedding.zero_()  # class token averages the patches: colours embed apart
    checkpoint = out / "tuned_clip_best.pt"
    torch.save({"epoch": 3, "CLIP": model.state_dict()}, checkpoint)
    return {"root": root, "config": config, "checkpoint": checkpoint}


if __name__ == "__main__":
    paths = make_fixture(sys.argv[1] if len(sys.argv) > 1 else "clip4cir-fixture")
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
