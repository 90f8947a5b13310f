"""GPU benchmark: embed throughput and mining against the bare FAISS GPU search, one markdown table.

  bash bench/gpu.sh                      # one GPU, <= 8 minutes: ViT-B-32, 1M x 512 gallery, 20k queries
  bash bench/gpu.sh --smoke              # CPU, tiny sizes (what the test runs)

Embedding (random weights, synthetic pixels already on the device, so only the model is timed):
the bare ``model.encode_image`` forward in fp32 and under fp16 / bf16 autocast, against
cir-mine's ``forward_images`` (autocast as the encoder chooses, normalisation, copy to host).
Mining (a synthetic gallery of unit vectors and composed queries off the gallery's distribution):
the bare FAISS search (flat, and IVF at the tuned nprobe) of every query at the mining depth,
against ``mine_negatives`` through the same index (``--index flat`` / ``ivf``), with the search of
batch i+1 overlapped with the guards of batch i (prefetch) and without, and each part's share:
``search`` (inside the back-end, in the worker thread when overlapped), ``select`` (guards,
windows, sampling on the host). Prints the table and writes it to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def timed(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def embed_rows(args, device: str) -> list:
    import torch

    from cir_mine.miner.encode.clip import EncoderConfig, forward_images, input_shape, load_encoder

    model = args.model
    if args.smoke:
        from tests.fixtures import write_tiny_clip_config

        model = str(write_tiny_clip_config(Path(tempfile.mkdtemp())))
    enc = load_encoder(EncoderConfig(model, "none", device))
    g = torch.Generator(device="cpu").manual_seed(0)
    pixels = torch.randn(args.embed_n, *input_shape(enc), generator=g).to(device)
    bs = args.embed_batch
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def bare(dtype):
        def run():
            with torch.inference_mode():
                for s in range(0, args.embed_n, bs):
                    if dtype is None:
                        enc.model.encode_image(pixels[s:s + bs])
                    else:
                        with torch.autocast(device, dtype=dtype):
                            enc.model.encode_image(pixels[s:s + bs])
            sync()
        return run

    def ours():
        for s in range(0, args.embed_n, bs):
            forward_images(enc, pixels[s:s + bs])
        sync()

    rows = []
    dtypes = [("fp32", None)]
    if device == "cuda":
        dtypes += [("fp16 autocast", torch.float16)] + ([("bf16 autocast", torch.bfloat16)]
                                                        if torch.cuda.is_bf16_supported() else [])
    else:
        dtypes += [("bf16 autocast", torch.bfloat16)]
    for name, dt in dtypes:
        bare(dt)()                                            # warm-up
        t = timed(bare(dt), args.repeats)
        rows.append((f"embed: bare encode_image, {name}", args.embed_n / t, "images/s", ""))
    ours()
    t = timed(ours, args.repeats)
    amp = getattr(enc, "amp_dtype", None)
    ref = next((r for r in rows if (amp is None and "fp32" in r[0]) or (amp is not None and str(amp).split(".")[-1][:4] in r[0])), rows[0])
    rows.append((f"embed: cir-mine forward_images ({str(amp).split('.')[-1] if amp else 'fp32'})", args.embed_n / t,
                 "images/s", f"{(args.embed_n / t) / ref[1]:.2f}x of bare"))
    return rows


def synthetic_workspace(root: Path, n: int, m: int, d: int, seed: int = 0):
    """A gallery of unit vectors in clusters and composed queries: normalize(ref + text) with the text
    a random direction, so queries sit off the gallery's distribution (as CIR queries do)."""
    from cir_mine.data.workspace import (Workspace, gallery_table, l2_normalize, triplets_table, write_table)

    rng = np.random.default_rng(seed)
    centers = l2_normalize(rng.standard_normal((max(8, n // 1000), d)).astype(np.float32))
    xb = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        xb[s:e] = l2_normalize(centers[rng.integers(0, len(centers), e - s)]
                               + 0.6 * rng.standard_normal((e - s, d)).astype(np.float32) / np.sqrt(d) * 4)
    ids = [f"g{i:07d}" for i in range(n)]
    cats = ["c"] * n
    ws = Workspace(root)
    root.mkdir(parents=True, exist_ok=True)
    write_table(gallery_table(ids, cats, [[] for _ in range(n)], xb), ws.gallery_path("train"))
    ref = rng.choice(n, m, replace=True)
    tgt = (ref + 1 + rng.integers(0, n - 1, m)) % n
    text = l2_normalize((xb[tgt] - xb[ref]) + 0.3 * rng.standard_normal((m, d)).astype(np.float32) / np.sqrt(d))
    write_table(triplets_table([f"q{i:06d}" for i in range(m)], ["c"] * m, [ids[i] for i in ref],
                               [ids[i] for i in tgt], [["is different"]] * m, text), ws.triplets_path("train"))
    ws.write_manifest(source="synthetic")
    return ws


def mining_rows(args, device: str) -> list:
    import faiss

    from cir_mine.miner.core.search import backends as B, build, tuning
    from cir_mine.miner.core.search import build_index
    from cir_mine.miner.core.mine import MineConfig, mine_negatives
    from cir_mine.miner.core.prepare import prepare

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        ws = synthetic_workspace(Path(tmp) / "work", args.n_gallery, args.n_queries, args.dim)
        loaded = ws.load("train")
        rows.append((f"setup: synthetic workspace {args.n_gallery} x {args.dim}, {args.n_queries} queries",
                     time.perf_counter() - t, "s", ""))
        base = dict(strategy="midzone", k=args.k, device=device, max_candidates=None)
        prep = prepare(ws, "train", MineConfig.of(**base), None, 0, loaded)
        xq, xb, depth = prep.qs.emb, prep.pool.xb, prep.depth
        for kind in ("flat", "ivf"):
            t = time.perf_counter()
            if kind == "flat":
                backend = B.ExactSearch(xb, device=device, fp16=args.fp16)
                # the bare FAISS flat search the miner is measured against (on a GPU, the same index)
                raw = backend.index if backend.index is not None else build_index(xb, "flat", device=device)
            else:
                raw = build_index(xb, "ivf", device=device, fp16=args.fp16)
                factory = build.factory_string("ivf", *xb.shape)
                backend = B.Reranked(raw, xb, 1.0, {"index": "ivf", "factory": factory})
                sample = build.sample_rows(len(xq), 1000, 0, 1)
                _, exact_I = B.ExactSearch(xb, device=device).search(xq[sample], depth)
                tu = tuning.tune(backend, exact_I, xq[sample], depth, 0.98)
            rows.append((f"{kind}: index build" + ("" if kind == "flat" else f" + tuning (nprobe={tu.value}, "
                                                   f"recall {tu.recall:.3f})"), time.perf_counter() - t, "s", ""))

            def bare(raw=raw):
                for s in range(0, len(xq), 4096):
                    raw.search(xq[s:s + 4096], depth)
            bare()
            t_bare = timed(bare, args.repeats)
            rows.append((f"{kind}: bare FAISS search, {len(xq)} queries at depth {depth}", t_bare, "s", "1.00x"))
            for prefetch in (True, False):
                best = None
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    res = mine_negatives(ws, "train", MineConfig.of(**base, prefetch=prefetch), index=backend, loaded=loaded)
                    wall = time.perf_counter() - t
                    best = (wall, res) if best is None or wall < best[0] else best
                wall, res = best
                tm = res.meta["timing"]
                share = (f"search {tm['search_s'] / wall:.0%}, select {tm['select_s'] / wall:.0%} of wall "
                         f"(prepare {tm['prepare_s']:.2f}s)")
                rows.append((f"{kind}: mine_negatives midzone k={args.k}, {'overlapped' if prefetch else 'sequential'}",
                             wall, "s", f"{wall / t_bare:.2f}x of bare; {share}"))
            del backend, raw
        rows.append(("FAISS GPUs", faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0, "", ""))
    return rows


def table(rows: list, header: str) -> str:
    out = [header, "", "| measurement | value | unit | ratio / shares |", "| --- | --- | --- | --- |"]
    for name, v, unit, note in rows:
        out.append(f"| {name} | {v:.3f} | {unit} | {note} |" if isinstance(v, float) else f"| {name} | {v} | {unit} | {note} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU and tiny sizes (a test runs it)")
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--embed-n", type=int, default=4096)
    ap.add_argument("--embed-batch", type=int, default=256)
    ap.add_argument("--n-gallery", type=int, default=1_000_000)
    ap.add_argument("--n-queries", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--fp16", action="store_true", help="GPU indexes store float16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("gpu-bench.md"))
    a = ap.parse_args(argv)
    if a.smoke:
        a.embed_n, a.embed_batch, a.n_gallery, a.n_queries, a.dim, a.repeats = 8, 4, 3000, 300, 32, 1
    import faiss

    device = "cuda" if not a.smoke and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0 else "cpu"
    if not a.smoke and device != "cuda":
        raise SystemExit("bench/gpu.sh: FAISS sees no GPU (install faiss-gpu); use --smoke on a CPU machine.")
    t = time.perf_counter()
    rows = embed_rows(a, device) + mining_rows(a, device)
    md = table(rows, f"GPU benchmark ({'smoke, CPU' if a.smoke else device}; {time.perf_counter() - t:.0f} s; "
                     f"`bench/gpu.sh {' '.join(argv if argv is not None else sys.argv[1:])}`)")
    a.out.write_text(md)
    print(md)
    print(json.dumps({"bench": "gpu", "device": device, "rows": [[r[0], r[1], r[2], r[3]] for r in rows]}))
    return md


if __name__ == "__main__":
    main()
