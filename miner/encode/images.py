"""Image batches for the encoder: decoding (files, tar members, bytes) with the model's eval
transform in DataLoader workers, and the forward pass.

On a GPU batches arrive in pinned host memory from one decoding worker per spare CPU core, and each
batch's embeddings are copied back while the next batch runs, so the device does not wait for the
host.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from cir_mine.miner.encode.model import Encoder, normalize_pixels


class ImageFiles(torch.utils.data.Dataset):
    """Decodes and transforms one image per item (in DataLoader workers).

    Item ``i`` -> (pixels, i, error str): pixels are uint8[3, H, W] when ``uint8`` (the PIL stages
    only; normalization happens per batch) else float32[3, H, W]. An unreadable file gives zeros
    and a non-empty error; the caller drops it (never replaced by another image).
    """

    def __init__(
        self, paths: Sequence[Optional[str]], transform: Callable, shape: tuple[int, int, int], uint8: bool = False
    ):
        self.paths, self.transform, self.shape, self.uint8 = list(paths), transform, shape, uint8
        self.dtype = torch.uint8 if uint8 else torch.float32

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        x, err = load_pixels(self.paths[i], self.transform, self.shape, self.uint8)
        return x, i, err


def load_pixels(source, transform: Callable, shape: tuple[int, int, int], uint8: bool = False):
    """One image -> (pixels, error str): ``source`` is a file path, a ``TAR::MEMBER`` path (webdataset
    shards) or the encoded bytes. Pixels are uint8[3, H, W] (PIL stages only) when ``uint8`` else
    float32[3, H, W]; an unreadable image gives zeros and a non-empty error."""
    import io

    from PIL import Image

    from cir_mine.data.webdataset import is_member, read_member

    zeros = lambda: torch.zeros(shape, dtype=torch.uint8 if uint8 else torch.float32)  # noqa: E731
    if isinstance(source, (bytes, bytearray, memoryview, np.ndarray)):
        fp = io.BytesIO(bytes(source))
    elif is_member(source):
        try:
            fp = io.BytesIO(read_member(source))
        except (KeyError, OSError) as e:
            return zeros(), f"missing file {source} ({type(e).__name__})"
    elif not source or not os.path.isfile(source):
        return zeros(), f"missing file {source}"
    else:
        fp = source
    try:
        with Image.open(fp) as im:
            im.load()
            x = transform(im.convert("RGB"))
        if uint8:
            x = torch.from_numpy(np.array(x, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
        return zeros(), f"unreadable ({type(e).__name__}: {str(e)[:120]})"
    if tuple(x.shape) != shape:
        return zeros(), f"transform gave shape {tuple(x.shape)}"
    return x, ""


def _collate(items):
    xs, idx, err = zip(*items)
    return torch.stack(xs), torch.as_tensor(idx, dtype=torch.int64), list(err)


def input_shape(encoder: Encoder) -> tuple[int, int, int]:
    size = encoder.model.visual.image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (3, int(h), int(w))


@torch.inference_mode()
def forward_images(encoder: Encoder, pixels: torch.Tensor) -> np.ndarray:
    """float32[b, 3, H, W] (model input) or uint8[b, 3, H, W] (PIL stages only; normalized here, on
    the device) -> L2-normalized float32[b, d] numpy."""
    return launch_images(encoder, pixels).numpy()


class Embedded:
    """One batch's embeddings on their way to the host: on a GPU the copy goes to pinned memory
    without waiting, so the next batch is queued before :meth:`numpy` waits for this one."""

    def __init__(self, z: torch.Tensor):
        self.event = None
        if z.device.type == "cuda":
            self.host = torch.empty(z.shape, dtype=z.dtype, pin_memory=True)
            self.host.copy_(z, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = z

    def numpy(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.host.numpy()


@torch.inference_mode()
def launch_images(encoder: Encoder, pixels: torch.Tensor) -> "Embedded":
    """:func:`forward_images` without waiting for the device: -> :class:`Embedded`."""
    x = pixels.to(encoder.device, non_blocking=True)
    if x.dtype == torch.uint8:
        x = normalize_pixels(x, encoder.mean_std)
    if encoder.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with encoder.autocast():
        z = encoder.model.encode_image(x)
    return Embedded(torch.nn.functional.normalize(z.float(), dim=-1))


def default_workers(device: torch.device) -> int:
    """Decoding workers when none are asked for: on a GPU, one per CPU core the main process leaves
    (at most 16; a ViT-B-32 forward outruns one decoding core many times over), on the CPU 2 (the
    forward shares the cores; docs/benchmarks.md)."""
    if device.type != "cuda":
        return 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return int(max(2, min(16, cores - 1)))


def image_loader(encoder: Encoder, paths: Sequence[Optional[str]], batches: list[list[int]], workers: Optional[int]):
    """A DataLoader yielding (pixels uint8|float32[b, 3, H, W], rows int64[b], errors list[str]) for
    ``batches`` (lists of rows into ``paths``), decoded by ``workers`` processes (None:
    :func:`default_workers`), in pinned memory on a GPU."""
    workers = default_workers(encoder.device) if workers is None else workers
    split = encoder.pil_transform is not None
    dataset = ImageFiles(
        paths, encoder.pil_transform if split else encoder.preprocess, input_shape(encoder), uint8=split
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=encoder.device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
