"""The CLIP4Cir side of the example: a FashionIQ dataset and a target-pad transform of the same shape
as CLIP4Cir's ``src/data_utils.py`` (written for this example; only the interface matches).

``FashionIQDataset(split, dress_types, mode, preprocess, root)``: ``.triplets`` is the caption files
of ``dress_types`` concatenated in that order, ``.image_names`` their image splits; in ``relative``
mode on the train split an item is ``(reference_image, target_image, captions)``, in ``classic``
mode ``(image_name, image)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, List

from torch.utils.data import Dataset

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalization
STD = (0.26862954, 0.26130258, 0.27577711)


class TargetPad:
    """Pad an image whose long/short side ratio is above ``ratio`` with black, on both sides of its
    short side, until the ratio is reached (pad sizes rounded down)."""

    def __init__(self, ratio: float):
        self.ratio = ratio

    def __call__(self, image):
        from torchvision.transforms import functional as F

        w, h = image.size
        if max(w, h) / min(w, h) < self.ratio:
            return image
        side = max(w, h) / self.ratio
        px, py = max(int((side - w) / 2), 0), max(int((side - h) / 2), 0)
        return F.pad(image, [px, py, px, py], 0, "constant")


def targetpad_transform(target_ratio: float, dim: int) -> Callable:
    from torchvision import transforms as T

    return T.Compose(
        [
            TargetPad(target_ratio),
            T.Resize(dim, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(dim),
            lambda im: im.convert("RGB"),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )


class FashionIQDataset(Dataset):
    def __init__(self, split: str, dress_types: List[str], mode: str, preprocess: Callable, root: str | Path):
        self.split, self.dress_types, self.mode, self.preprocess = split, list(dress_types), mode, preprocess
        self.root = Path(root)
        self.triplets: List[dict] = []
        self.image_names: List[str] = []
        for dress_type in self.dress_types:
            self.triplets += json.loads((self.root / "captions" / f"cap.{dress_type}.{split}.json").read_text())
            self.image_names += json.loads(
                (self.root / "image_splits" / f"split.{dress_type}.{split}.json").read_text()
            )

    def _image(self, name: str):
        from PIL import Image

        with Image.open(self.root / "images" / f"{name}.png") as im:
            return self.preprocess(im.convert("RGB"))

    def __getitem__(self, index):
        if self.mode == "classic":
            name = self.image_names[index]
            return name, self._image(name)
        t = self.triplets[index]
        return self._image(t["candidate"]), self._image(t["target"]), t["captions"]

    def __len__(self):
        return len(self.triplets) if self.mode == "relative" else len(self.image_names)
