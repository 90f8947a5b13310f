"""Soak: IVF-PQ mining with exact re-ranking over a memory-mapped gallery, peak RSS of each stage.

  python bench/soak_index.py --n-gallery 2000000 --dim 256 --n-queries 10000 --root /tmp/cir-mine-soak-index

Writes a synthetic workspace block by block (never the whole gallery in memory): ``gallery.train.npy``
(float32, row-aligned, what mining memory-maps) beside a ``gallery.train.parquet`` without an
embedding column, and ``triplets.train.parquet`` with composed queries (reference + a random text
direction, off the gallery's distribution). Then, each a fresh process with its own peak RSS
(``os.wait4``): ``cir-mine index`` (IVF-PQ, trained on a sample, rows added in blocks) and
``cir-mine negatives --index workspace`` (tuned to candidate recall 0.98, PQ candidates over-fetched 4x
and re-ranked exactly against the memory-mapped rows, with a recall check against exact mining).
Reports each stage's wall time and peak RSS against the bound: index bytes + re-rank working set + 2 GiB.

``--memory-limit GIB`` runs the mining stage inside a fresh memory cgroup (v1 ``memory.limit_in_bytes``
or v2 ``memory.max``) holding page cache and RSS together below GIB: with a limit under the gallery's
float32 bytes, the embeddings cannot all be resident at once, as on a machine whose RAM is smaller
than the gallery. The cgroup's own peak (page cache included) is reported beside the peak RSS.
Not a unit test: run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_workspace(
    root: Path, n: int, m: int, d: int, seed: int = 0, block: int = 131_072, noise: float = 0.5
) -> None:
    """Images = one of 4096 directions + Gaussian noise of norm ``noise`` (0.5: a nearest neighbour
    at cosine about 0.75, as CLIP galleries have; at 2 the rows are near-random directions, which no
    compressed code ranks), then normalised."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cir_mine.data.workspace import Workspace, l2_normalize, triplets_table, write_embeddings_npy, write_table

    ws = Workspace(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centers = l2_normalize(rng.standard_normal((4096, d)).astype(np.float32))
    ids = lambda s, e: [f"g{i:08d}" for i in range(s, e)]

    def blocks():
        for s in range(0, n, block):
            e = min(n, s + block)
            r = np.random.default_rng([seed, s])
            yield l2_normalize(
                centers[r.integers(0, len(centers), e - s)]
                + noise / np.sqrt(d) * r.standard_normal((e - s, d)).astype(np.float32)
            )

    write_embeddings_npy(blocks(), n, d, ws.embeddings_path("train"))
    schema = pa.schema([("image_id", pa.string()), ("category", pa.string()), ("attributes", pa.list_(pa.string()))])
    with pq.ParquetWriter(ws.gallery_path("train"), schema) as w:
        for s in range(0, n, block):
            e = min(n, s + block)
            w.write_table(
                pa.table(
                    {
                        "image_id": ids(s, e),
                        "category": ["c"] * (e - s),
                        "attributes": pa.array([[]] * (e - s), pa.list_(pa.string())),
                    },
                    schema=schema,
                )
            )
    xb = np.load(ws.embeddings_path("train"), mmap_mode="r")
    ref = np.sort(rng.choice(n, m, replace=False))
    tgt = (ref + 1 + rng.integers(0, n - 1, m)) % n
    text = l2_normalize(
        np.asarray(xb[tgt]) - np.asarray(xb[ref]) + 0.3 / np.sqrt(d) * rng.standard_normal((m, d)).astype(np.float32)
    )
    write_table(
        triplets_table(
            [f"q{i:06d}" for i in range(m)],
            ["c"] * m,
            [f"g{i:08d}" for i in ref],
            [f"g{i:08d}" for i in tgt],
            [["is different"]] * m,
            text,
        ),
        ws.triplets_path("train"),
    )
    ws.write_manifest(source="synthetic", dim=d)


class MemoryCgroup:
    """A fresh memory cgroup limited to ``gib`` GiB (page cache + RSS); ``enter`` moves the calling
    process into it (as a ``preexec_fn``), ``peak_gib`` reads its high-water mark."""

    def __init__(self, gib: float):
        self.limit = int(gib * 2**30)
        name = f"cir-mine-soak-{os.getpid()}"
        v1 = Path("/sys/fs/cgroup/memory")
        if (v1 / "memory.limit_in_bytes").exists() or v1.is_dir():
            self.dir, self.files = v1 / name, ("memory.limit_in_bytes", "memory.max_usage_in_bytes")
        else:
            self.dir, self.files = Path("/sys/fs/cgroup") / name, ("memory.max", "memory.peak")
        try:
            self.dir.mkdir()
            (self.dir / self.files[0]).write_text(str(self.limit))
        except OSError as e:
            raise SystemExit(
                f"--memory-limit: cannot create a memory cgroup at {self.dir} ({e}); "
                f"run as a user who may, or without --memory-limit."
            ) from None

    def enter(self) -> None:
        (self.dir / "cgroup.procs").write_text(str(os.getpid()))

    def peak_gib(self) -> float:
        try:
            return round(int((self.dir / self.files[1]).read_text()) / 2**30, 3)
        except (OSError, ValueError):
            return float("nan")

    def close(self) -> None:
        try:
            self.dir.rmdir()
        except OSError:
            pass


def run_stage(name: str, argv: list, cgroup: "MemoryCgroup | None" = None) -> dict:
    shown = "cir-mine " + shlex.join(argv)
    print(f"$ {shown}" + (f"   (memory cgroup limit {cgroup.limit / 2**30:.2f} GiB)" if cgroup else ""), flush=True)
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(
            [sys.executable, "-c", "from cir_mine.cli import mine_main; mine_main()", *argv],
            stdout=out,
            stderr=err,
            text=True,
            preexec_fn=cgroup.enter if cgroup else None,
        )
        _, status, usage = os.wait4(p.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if code:
        raise SystemExit(f"{name} failed (exit {code}):\n{stderr}")
    rec = {
        "stage": name,
        "command": shown,
        "wall_s": round(wall, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_gib": round(usage.ru_maxrss * 1024 / 2**30, 3),
        "stdout": stdout.strip().splitlines(),
    }
    if cgroup:
        rec["cgroup_limit_gib"] = round(cgroup.limit / 2**30, 3)
        rec["cgroup_peak_gib"] = cgroup.peak_gib()
    print(
        f"  -> {rec['wall_s']} s wall, {rec['cpu_s']} s CPU, peak RSS {rec['peak_rss_gib']} GiB"
        + (f", cgroup peak {rec['cgroup_peak_gib']} of {rec['cgroup_limit_gib']} GiB" if cgroup else ""),
        flush=True,
    )
    for line in rec["stdout"]:
        print(f"     {line}", flush=True)
    return rec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-gallery", type=int, default=2_000_000)
    ap.add_argument("--n-queries", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--factory", default="IVF2048,PQ64", help="the IVF-PQ index (cir-mine index --index)")
    ap.add_argument("--noise", type=float, default=0.5, help="norm of each image's noise around its direction")
    ap.add_argument("--query-batch", type=int, default=1024)
    ap.add_argument("--check-recall", type=int, default=200)
    ap.add_argument("--root", type=Path, default=Path("/tmp/cir-mine-soak-index"))
    ap.add_argument(
        "--memory-limit",
        type=float,
        default=None,
        metavar="GIB",
        help="run the mining stage in a memory cgroup of GIB GiB (page cache included)",
    )
    ap.add_argument("--strategy", default="hardest")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--keep", action="store_true", help="keep the workspace, index and table under --root")
    ap.add_argument("--reuse", action="store_true", help="reuse a kept workspace and index: run the mining stage only")
    a = ap.parse_args(argv)
    work = a.root / "work"
    s = str
    if a.reuse and (work / "index.train.faiss").exists():
        t_write, recs = None, []  # the workspace and index of an earlier --keep run
    else:
        shutil.rmtree(a.root, ignore_errors=True)
        t = time.perf_counter()
        write_workspace(work, a.n_gallery, a.n_queries, a.dim, noise=a.noise)
        t_write = round(time.perf_counter() - t, 1)
        recs = [run_stage("index (IVF-PQ)", ["index", "--work", s(work), "--index", a.factory, "--device", "cpu"])]
    cgroup = MemoryCgroup(a.memory_limit) if a.memory_limit else None
    if cgroup:
        # page cache is charged to the cgroup that first read it: drop the gallery's cached pages
        # (left by the writer and the index stage), so the mining stage reads them under its own limit
        for f in work.iterdir():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    try:
        recs.append(
            run_stage(
                "negatives (workspace IVF-PQ + exact re-rank)",
                [
                    "negatives",
                    "--work",
                    s(work),
                    "--index",
                    "workspace",
                    "--strategy",
                    a.strategy,
                    "-k",
                    s(a.k),
                    "--query-batch",
                    s(a.query_batch),
                    "--check-recall",
                    s(a.check_recall),
                    "--device",
                    "cpu",
                    "--out",
                    s(a.root / "negs.parquet"),
                    "-q",
                ],
                cgroup,
            )
        )
    finally:
        if cgroup:
            cgroup.close()
    from cir_mine.miner.core.tables import read_negatives_meta

    meta = read_negatives_meta(a.root / "negs.parquet")
    search = meta["search"]
    gallery_gib = a.n_gallery * a.dim * 4 / 2**30
    index_gib = (work / "index.train.faiss").stat().st_size / 2**30
    depth = meta["depth"]
    fetched = int(np.ceil(4 * depth * float(search.get("overfetch", 1))))  # reserve (4x depth) x over-fetch
    rerank_gib = a.query_batch * fetched * (8 + 4 + 4) / 2**30 + 65_536 * a.dim * 4 / 2**30
    bound = index_gib + rerank_gib + 2.0
    print(
        f"\ngallery float32 embeddings {gallery_gib:.2f} GiB (memory-mapped, written in {t_write} s); "
        f"index {index_gib:.3f} GiB; re-rank working set {rerank_gib:.3f} GiB; bound {bound:.2f} GiB\n"
    )
    print(
        "| stage | command | wall (s) | CPU (s) | peak RSS (GiB) | memory cgroup peak / limit (GiB) |\n"
        "| --- | --- | --- | --- | --- | --- |"
    )
    for r in recs:
        cg = f"{r['cgroup_peak_gib']} / {r['cgroup_limit_gib']}" if "cgroup_limit_gib" in r else "-"
        print(f"| {r['stage']} | `{r['command']}` | {r['wall_s']} | {r['cpu_s']} | {r['peak_rss_gib']} | {cg} |")
    print(
        json.dumps(
            {
                "bench": "soak-index",
                "n_gallery": a.n_gallery,
                "n_queries": a.n_queries,
                "dim": a.dim,
                "factory": a.factory,
                "gallery_gib": round(gallery_gib, 3),
                "index_gib": round(index_gib, 3),
                "rerank_gib": round(rerank_gib, 3),
                "bound_gib": round(bound, 3),
                "write_s": t_write,
                "search": search,
                "timing": meta["timing"],
                "shortfall": meta["shortfall"]["count"],
                "mining_within_bound": recs[-1]["peak_rss_gib"] <= bound,
                "within_bound": all(r["peak_rss_gib"] <= bound for r in recs),
                "stages": [{k: v for k, v in r.items() if k != "stdout"} for r in recs],
            }
        )
    )
    if not (a.keep or a.reuse):
        shutil.rmtree(a.root, ignore_errors=True)


if __name__ == "__main__":
    from cir_mine.data.memory import prefer_fast_pool

    prefer_fast_pool()  # Arrow's memory pool, as the command line sets it
    main()
