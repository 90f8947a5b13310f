"""GPU benchmark: embedding and exact mining on one GPU through torch, one markdown table.

  bash bench/gpu.sh                      # one GPU, <= 8 minutes: ViT-B-32 fp16, 1M x 512 gallery, 20k queries
  bash bench/gpu.sh --smoke              # CPU, tiny sizes (what tests/test_bench_gpu.py runs)

Embedding (random weights, images/s, the same batches and precision for every row):
- ``bare encode_image``: ``model.encode_image`` under autocast on pixels already on the device,
  nothing else (the ceiling);
- ``cir-mine forward``: :func:`launch_images` on uint8 batches from pinned host memory, the way
  ``embed_images`` feeds it (normalization on the device, channels-last where chosen, each batch's
  embeddings copied back while the next one runs);
- ``cir-mine end-to-end``: ``embed_images`` on JPEG files (decoding workers, shards written).

Mining (an in-memory synthetic workspace: clustered unit rows, composed queries off the gallery's
distribution), every query searched at the depth the miner searches a first batch at:
- ``bare torch GEMM + top-k``: ``torch.topk(q @ G.T)`` of every query, the gallery on the device in
  the back-end's precision (the floor any exact GPU search pays);
- ``TorchSearch.search``: candidates on the device, the cut decided on exact host scores;
- ``mine_negatives`` midzone through the same back-end (next batch searched while the host guards
  the current one), with each stage's share of its wall time (``search`` is the device's scan and
  the wait for it, ``rerank`` exact host scores; with prefetch both overlap the guards and selection).

Each timed row is the best of ``--repeats``. A section that fails writes its error into the table
and the script exits 1 after writing it, so one run on a lent machine reports all it can. Prints the
table and writes it to ``--out``; the last line of stdout is the same rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def timed(fn, repeats: int = 1, sync=lambda: None) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def synthetic_workspace(root: Path, n: int, m: int, d: int, seed: int = 0):
    """A workspace on disk of ``n`` unit gallery rows in clusters and ``m`` composed queries:
    normalize(ref + text) with the text a direction toward the target plus noise, so queries sit off
    the gallery's distribution (as CIR queries do)."""
    from cir_mine.data.workspace import Workspace, gallery_table, triplets_table, write_table

    xb, ids, ref, tgt, text = synthetic_arrays(n, m, d, seed)
    ws = Workspace(root)
    root.mkdir(parents=True, exist_ok=True)
    write_table(gallery_table(ids, ["c"] * n, [[] for _ in range(n)], xb), ws.gallery_path("train"))
    write_table(
        triplets_table(
            [f"q{i:06d}" for i in range(m)],
            ["c"] * m,
            [ids[i] for i in ref],
            [ids[i] for i in tgt],
            [["is different"]] * m,
            text,
        ),
        ws.triplets_path("train"),
    )
    ws.write_manifest(source="synthetic")
    return ws


def synthetic_arrays(n: int, m: int, d: int, seed: int = 0):
    """(gallery float32[n, d] unit rows, ids, reference rows int64[m], target rows int64[m], text float32[m, d])."""
    from cir_mine.data.workspace import l2_normalize

    rng = np.random.default_rng(seed)
    centers = l2_normalize(rng.standard_normal((max(8, n // 1000), d)).astype(np.float32))
    xb = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        xb[s:e] = l2_normalize(
            centers[rng.integers(0, len(centers), e - s)]
            + 0.6 * rng.standard_normal((e - s, d)).astype(np.float32) / np.sqrt(d) * 4
        )
    ids = [f"g{i:07d}" for i in range(n)]
    ref = rng.choice(n, m, replace=True)
    tgt = (ref + 1 + rng.integers(0, n - 1, m)) % n
    text = l2_normalize((xb[tgt] - xb[ref]) + 0.3 * rng.standard_normal((m, d)).astype(np.float32) / np.sqrt(d))
    return xb, ids, ref, tgt, text


def embed_rows(a, device: str) -> list:
    import torch

    from cir_mine.miner.encode.clip import (
        EncoderConfig,
        ImageRun,
        embed_images,
        input_shape,
        launch_images,
        load_encoder,
    )

    model = a.model
    if a.smoke:
        from tests.fixtures import write_tiny_clip_config

        model = str(write_tiny_clip_config(Path(tempfile.mkdtemp())))
    enc = load_encoder(EncoderConfig(model, "none", device, precision=a.embed_precision))
    name = str(enc.amp_dtype).replace("torch.", "") if enc.amp_dtype else "fp32"
    shape = input_shape(enc)
    g = torch.Generator(device="cpu").manual_seed(0)
    host = torch.randint(0, 256, (a.embed_n, *shape), dtype=torch.uint8, generator=g)
    host = host.pin_memory() if device == "cuda" else host
    from cir_mine.miner.encode.clip import normalize_pixels

    on_device = normalize_pixels(host.to(device), enc.mean_std)
    bs = a.embed_batch
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def bare():
        with torch.inference_mode(), enc.autocast():
            for s in range(0, a.embed_n, bs):
                enc.model.encode_image(on_device[s : s + bs])

    def ours():
        pending = None
        for s in range(0, a.embed_n, bs):
            out = launch_images(enc, host[s : s + bs])
            if pending is not None:
                pending.numpy()
            pending = out
        pending.numpy()

    rows = []
    bare()
    t_bare = timed(bare, a.repeats, sync)
    rows.append(
        (
            f"embed: bare encode_image ({enc.name}, {name}, batch {bs}, pixels on the device)",
            a.embed_n / t_bare,
            "images/s",
            "1.00x",
        )
    )
    ours()
    t = timed(ours, a.repeats, sync)
    rows.append(
        (
            f"embed: cir-mine forward (uint8 from pinned host memory{', channels-last' if enc.channels_last else ''})",
            a.embed_n / t,
            "images/s",
            f"{t_bare / t:.2f}x of bare",
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), a.files_n, a.image_size)
        run = ImageRun(bs, None, shard_size=a.files_n)
        t = float("inf")
        for r in range(a.repeats):
            t0 = time.perf_counter()
            embed_images(enc, paths, paths, Path(tmp) / f"shards{r}", run)
            t = min(t, time.perf_counter() - t0)
    from cir_mine.miner.encode.clip import default_workers

    rows.append(
        (
            f"embed: cir-mine end-to-end ({a.files_n} JPEG {a.image_size}px, {default_workers(enc.device)} workers)",
            a.files_n / t,
            "images/s",
            f"{t_bare * a.files_n / a.embed_n / t:.2f}x of bare",
        )
    )
    return rows


def write_jpegs(folder: Path, n: int, size: int) -> list:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=max(1, min(16, (os.cpu_count() or 2) - 1))) as pool:
        return list(pool.map(_jpeg, [(folder, i, size) for i in range(n)], chunksize=64))


def _jpeg(args) -> str:
    from PIL import Image

    folder, i, size = args
    rng = np.random.default_rng(i)
    arr = np.clip(rng.integers(0, 255, 3)[None, None] + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    p = folder / f"img{i:06d}.jpg"
    Image.fromarray(arr).save(p, quality=90)
    return str(p)


def mining_rows(a, device: str) -> list:
    import torch

    from cir_mine.data.workspace import Workspace
    from cir_mine.miner.accel.search import PRECISIONS, TorchSearch
    from cir_mine.miner.core.mine import MineConfig, mine_negatives
    from cir_mine.miner.core.prepare import prepare
    from cir_mine.miner.core.schedule import reserve_depth

    rows = []
    t = time.perf_counter()
    xb, ids, ref, tgt, text = synthetic_arrays(a.n_gallery, a.n_queries, a.dim)
    ws = Workspace.from_arrays(
        xb,
        ids,
        ref_ids=[ids[i] for i in ref],
        target_ids=[ids[i] for i in tgt],
        text_emb=text,
        captions=["is different"] * len(ref),
    )
    del xb
    loaded = ws.load("train")
    cfg = MineConfig.of(strategy="midzone", k=a.k, query_batch=a.query_batch, device=device)
    prep = prepare(ws, "train", cfg, None, 0, loaded)
    xq, xb = prep.qs.emb, prep.pool.xb
    rows.append(
        (f"setup: in-memory workspace {a.n_gallery} x {a.dim}, {a.n_queries} queries", time.perf_counter() - t, "s", "")
    )
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for precision in a.precisions:
        t = time.perf_counter()
        backend = TorchSearch(xb, device, precision)
        depth = reserve_depth(prep, cfg, backend)
        rows.append(
            (
                f"{precision}: TorchSearch opened (gallery {'on the device' if backend.gallery is not None else 'streamed'}, "
                f"{backend.memory >> 20} MiB budget)",
                time.perf_counter() - t,
                "s",
                "",
            )
        )
        dtype = PRECISIONS[precision][0]
        G = (
            backend.gallery
            if backend.gallery is not None and backend.gallery.dtype == dtype
            else torch.from_numpy(np.ascontiguousarray(xb)).to(device).to(dtype)
        )
        step = max(1, (1 << 31) // (4 * len(xb)))  # 2 GiB of float32 scores at a time

        def bare(G=G):
            with torch.inference_mode():
                for s in range(0, len(xq), step):
                    q = torch.from_numpy(xq[s : s + step]).to(device).to(dtype)
                    v, i = torch.topk((q @ G.T).float(), depth, dim=1)
                    v.cpu(), i.cpu()

        bare()
        t_bare = timed(bare, a.repeats, sync)
        rows.append((f"{precision}: bare torch GEMM + top-k, {len(xq)} queries at depth {depth}", t_bare, "s", "1.00x"))

        def search():
            for s in range(0, len(xq), a.query_batch):
                backend.search(xq[s : s + a.query_batch], depth)

        before = backend.clock.snapshot()
        search()
        t = timed(search, a.repeats, sync)
        after = backend.clock.snapshot()
        rerank = (after.get("rerank", 0) - before.get("rerank", 0)) / max(1, a.repeats + 1)
        rows.append(
            (
                f"{precision}: TorchSearch.search, same queries and depth",
                t,
                "s",
                f"{t / t_bare:.2f}x of bare; exact host re-rank {rerank / t:.0%}",
            )
        )
        if precision != a.precisions[0] and not a.smoke:
            continue  # mining runs in the first precision only
        best = None
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            res = mine_negatives(ws, "train", cfg, index=backend, loaded=loaded)
            wall = time.perf_counter() - t0
            best = (wall, res) if best is None or wall < best[0] else best
        wall, res = best
        tm = res.meta["timing"]
        share = ", ".join(f"{k} {tm[k + '_s'] / wall:.0%}" for k in ("search", "rerank", "guards", "select", "table"))
        rows.append(
            (
                f"{precision}: mine_negatives midzone k={a.k} (prefetch {'on' if res.meta['search']['prefetch'] else 'off'})",
                wall,
                "s",
                f"{wall / t_bare:.2f}x of bare; {share} of wall",
            )
        )
        del G, bare
    return rows


def table(rows: list, header: str) -> str:
    out = [header, "", "| measurement | value | unit | ratio / shares |", "| --- | --- | --- | --- |"]
    for name, v, unit, note in rows:
        value = f"{v:,.1f}" if unit == "images/s" else f"{v:.3f}" if isinstance(v, float) else str(v)
        out.append(f"| {name} | {value} | {unit} | {note} |")
    return "\n".join(out) + "\n"


def machine(device: str) -> str:
    import torch

    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        gpu = f"{p.name}, {p.total_memory / 2**30:.0f} GiB"
    else:
        gpu = "no GPU"
    return (
        f"{gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}); Python {platform.python_version()}; "
        f"{os.cpu_count()} CPUs"
    )


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU and tiny sizes (a test runs it)")
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--embed-precision", default="fp16", help="autocast of the embedding rows: fp16 | bf16 | fp32")
    ap.add_argument("--embed-n", type=int, default=4096, help="images per embedding pass (pixels in memory)")
    ap.add_argument("--files-n", type=int, default=4096, help="JPEG files of the end-to-end row")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--embed-batch", type=int, default=256)
    ap.add_argument("--n-gallery", type=int, default=1_000_000)
    ap.add_argument("--n-queries", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--query-batch", type=int, default=4096)
    ap.add_argument("--precisions", default="fp16,fp32", help="TorchSearch precisions (mining runs in the first)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("gpu-bench.md"))
    a = ap.parse_args(argv)
    a.precisions = a.precisions.split(",")
    if a.smoke:
        a.embed_n, a.files_n, a.image_size, a.embed_batch = 8, 8, 32, 4
        a.n_gallery, a.n_queries, a.dim, a.repeats, a.query_batch = 3000, 300, 32, 1, 128
        a.embed_precision, a.precisions = "bf16", ["fp32", "bf16"]
    import torch

    device = "cpu" if a.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.sh: torch sees no CUDA device; use --smoke on a CPU machine.")
    t = time.perf_counter()
    rows, failed = [], False
    for section in (embed_rows, mining_rows):
        try:
            rows += section(a, device)
        except Exception as e:  # noqa: BLE001 - reported in the table
            traceback.print_exc()
            rows.append(
                (f"{section.__name__} failed", type(e).__name__, "", str(e).splitlines()[0][:200] if str(e) else "")
            )
            failed = True
    md = table(
        rows,
        f"GPU benchmark ({'smoke, CPU' if a.smoke else device}; {machine(device)}; "
        f"{time.perf_counter() - t:.0f} s; `bench/gpu.sh {' '.join(argv if argv is not None else sys.argv[1:])}`)",
    )
    a.out.write_text(md)
    print(md)
    print(json.dumps({"bench": "gpu", "device": device, "rows": [list(r) for r in rows]}))
    if failed:
        raise SystemExit(1)
    return md


if __name__ == "__main__":
    from cir_mine.data.memory import prefer_fast_pool

    prefer_fast_pool()  # Arrow's memory pool, as the command line sets it
    main()
