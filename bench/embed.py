"""Embed throughput: the full input pipeline vs the bare model forward, in one run.

    python bench/embed.py --model tiny --n 2048 --batch-size 64 --workers 1
    python bench/embed.py --model ViT-B-32 --n 192 --batch-size 32 --workers 1

Writes N JPEG files (``--image-size`` square, random product-like colours) to a temp folder, then
times, on the same device with the same batch size and random weights:

- ``end-to-end``: ``cir_mine.miner.encode.local.embed_images`` on the files (DataLoader workers decode + transform,
  main process forwards, shards written), from the call to the returned array;
- ``bare forward``: ``cir_mine.miner.encode.images.forward_images`` over the same images already decoded and
  transformed into one tensor (identical pixels, identical batches);
- ``encode_image``: the model's own ``encode_image`` on those tensors, already on the device, under
  the same autocast, nothing else (no normalization, no copy back): the ceiling of the forward.

The two are timed alternately, ``--repeats`` times each, keeping each one's best (the machine's
load drifts); the input pipeline alone (DataLoader, no model) is timed the same way. Prints
images/s for each, ``ratio`` = end-to-end / bare forward (target >= 0.85: the input pipeline is not
the bottleneck), and ``ratio_to_slower_of_forward_and_decode`` = end-to-end / min(bare forward,
decode only): how close the overlap of decoding and forward comes to the slower of the two.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cir_mine.miner.encode.clip import EncoderConfig, ImageRun, embed_images, forward_images, image_loader, load_encoder
from tests.fixtures import write_tiny_clip_config  # noqa: E402


def write_images(folder: Path, n: int, size: int) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        base = rng.integers(0, 255, 3)
        arr = np.clip(base[None, None] + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        p = folder / f"img{i:06d}.jpg"
        Image.fromarray(arr).save(p, quality=90)
        paths.append(str(p))
    return paths


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (tests' 32x32 config) or an open_clip model name")
    ap.add_argument("--n", type=int, default=2048, help="images")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=256, help="side of the JPEG files")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto", help="auto | fp32 | fp16 | bf16 (autocast)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating timed passes of each; best is kept")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = str(write_tiny_clip_config(tmp)) if args.model == "tiny" else args.model
        enc = load_encoder(EncoderConfig(model, "none", args.device, precision=args.precision))
        (tmp / "img").mkdir()
        paths = write_images(tmp / "img", args.n, args.image_size)
        run = ImageRun(args.batch_size, args.workers, shard_size=args.n)

        # Pre-decode with the model's own transform (identical tensors), then warm up.
        from PIL import Image

        pixels = torch.stack([enc.preprocess(Image.open(p).convert("RGB")) for p in paths])
        forward_images(enc, pixels[: args.batch_size])

        batches = [list(range(s, min(args.n, s + args.batch_size))) for s in range(0, args.n, args.batch_size)]
        # Alternate the measurements (best of --repeats each): load on a shared machine drifts.
        t_bare = t_e2e = t_decode = t_model = float("inf")
        on_device = pixels.to(enc.device)
        sync = torch.cuda.synchronize if enc.device.type == "cuda" else (lambda: None)
        for r in range(args.repeats):
            # The input pipeline alone (decode + transform in workers, no model).
            t0 = time.perf_counter()
            for _ in image_loader(enc, paths, batches, args.workers):
                pass
            t_decode = min(t_decode, time.perf_counter() - t0)

            t0 = time.perf_counter()
            with torch.inference_mode(), enc.autocast():
                for s in range(0, args.n, args.batch_size):
                    enc.model.encode_image(on_device[s : s + args.batch_size])
            sync()
            t_model = min(t_model, time.perf_counter() - t0)

            t0 = time.perf_counter()
            bare = [forward_images(enc, pixels[s : s + args.batch_size]) for s in range(0, args.n, args.batch_size)]
            t_bare = min(t_bare, time.perf_counter() - t0)

            t0 = time.perf_counter()
            emb, errors = embed_images(enc, paths, paths, tmp / f"shards{r}", run)
            t_e2e = min(t_e2e, time.perf_counter() - t0)

    assert not any(errors)
    np.testing.assert_allclose(emb, np.concatenate(bare), atol=1e-4)
    out = {
        "model": enc.name,
        "device": str(enc.device),
        "n": args.n,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "image_size": args.image_size,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "precision": str(enc.amp_dtype or "fp32"),
        "encode_image_per_s": round(args.n / t_model, 1),
        "bare_images_per_s": round(args.n / t_bare, 1),
        "end_to_end_images_per_s": round(args.n / t_e2e, 1),
        "ratio": round(t_bare / t_e2e, 3),
        "decode_only_images_per_s": round(args.n / t_decode, 1),
        "ratio_to_slower_of_forward_and_decode": round(max(t_bare, t_decode) / t_e2e, 3),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    from cir_mine.data.memory import prefer_fast_pool

    prefer_fast_pool()  # Arrow's memory pool, as the command line sets it
    main()
