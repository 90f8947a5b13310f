"""Image preprocessing before the CLIP image tower: open_clip's own, or CLIP4Cir's padded variants.

- ``clip``: the model's open_clip eval transform (resize the short side, centre crop, normalize);
- ``targetpad``: CLIP4Cir's default for FashionIQ and CIRR: an image whose long/short side ratio is
  above ``target_ratio`` (CLIP4Cir's ``--target-ratio``, 1.25 by default) is first padded with black,
  equally on both sides of its short side, to that ratio, so the centre crop keeps more of a long
  garment; then as ``clip``;
- ``squarepad``: every image padded to a square first (``targetpad`` at ratio 1).

Features a CLIP4Cir model was trained with only match when the gallery is embedded with the same
preprocessing (``cir-mine embed --preprocess targetpad``). Pad sizes are rounded down, as CLIP4Cir
rounds them, so the pixels equal its ``targetpad_transform``'s.
"""

from __future__ import annotations

from typing import Callable

from cir_mine.data.errors import UsageError

PREPROCESS = ("clip", "targetpad", "squarepad")
TARGET_RATIO = 1.25  # CLIP4Cir's --target-ratio default


class PadToRatio:
    """PIL image -> the image padded with black so that long side / short side <= ``ratio`` (images
    already at or below it, other than with ``always``, are returned as they are)."""

    def __init__(self, ratio: float, always: bool = False):
        self.ratio, self.always = float(ratio), always

    def __call__(self, image):
        from torchvision.transforms import functional as F

        w, h = image.size
        if not self.always and max(w, h) / min(w, h) < self.ratio:
            return image
        short = max(w, h) / self.ratio  # the short side the ratio asks for
        dx, dy = max(int((short - w) / 2), 0), max(int((short - h) / 2), 0)
        return F.pad(image, [dx, dy, dx, dy], fill=0, padding_mode="constant")

    def __repr__(self) -> str:
        return f"PadToRatio(ratio={self.ratio}, always={self.always})"


def check_preprocess(kind: str, target_ratio: float) -> None:
    if kind not in PREPROCESS:
        raise UsageError(f"preprocess {kind!r}: use {', '.join(PREPROCESS)}.", params=("preprocess",))
    if not target_ratio >= 1:
        raise UsageError(
            f"target_ratio must be at least 1 (got {target_ratio}); CLIP4Cir uses 1.25.", params=("target_ratio",)
        )


def image_transform(kind: str, base: Callable, size: tuple, mean_std: tuple, target_ratio: float = TARGET_RATIO):
    """The transform ``kind`` names (see the module doc). base: the model's open_clip eval transform
    (returned for ``clip``); size: (H, W) the image tower takes; mean_std: its Normalize (mean, std).
    The result ends with ToTensor + Normalize, so it splits into PIL stages and a batched normalize."""
    from torchvision import transforms as T

    check_preprocess(kind, target_ratio)
    if kind == "clip":
        return base
    pad = PadToRatio(target_ratio) if kind == "targetpad" else PadToRatio(1.0, always=True)
    return T.Compose(
        [
            pad,
            T.Resize(min(size), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(*mean_std),
        ]
    )


def describe(kind: str, target_ratio: float) -> str:
    """What the manifest records: ``clip``, ``targetpad:1.25`` or ``squarepad``."""
    return f"targetpad:{target_ratio:g}" if kind == "targetpad" else kind
