"""Soak: the whole pipeline on a 1M-item synthetic gallery, each stage a fresh process, peak RSS measured.

  python bench/soak.py --n-gallery 1000000 --n-queries 20000 --dim 512 --root /tmp/cir-mine-soak

Stages (exact CLI commands, printed as they run): `cir-mine synth`, `cir-mine negatives` (midzone, k=10),
`cir-mine negatives` (random+category mix, k=10), `cir-train` (2 epochs over the midzone table, evaluated
against the whole 1M gallery). Peak RSS is each child's own ``ru_maxrss`` (``os.wait4``), so stages do not
mask one another. Prints a Markdown table and a JSON line; numbers go to docs/reliability.md ("Soak") and
docs/benchmarks.md ("Soak"). Not a unit test: run it alone (it takes minutes on 2 cores).
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

REPO = Path(__file__).resolve().parents[1]


def run_stage(name: str, argv: list[str], app: str = "mine_main") -> dict:
    """Run one CLI command in a fresh process; -> {stage, command, wall_s, peak_rss_gib, stdout tail}."""
    shown = ("cir-mine " if app == "mine_main" else "cir-train ") + shlex.join(argv)
    print(f"$ {shown}", flush=True)
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(
            [sys.executable, "-c", f"from cli import {app}; {app}()", *argv],
            cwd=REPO,
            stdout=out,
            stderr=err,
            text=True,
        )
        _, status, usage = os.wait4(p.pid, 0)  # this child's own peak RSS, not the max over all children
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if p.returncode:
        raise SystemExit(f"{name} failed (exit {p.returncode}):\n{stderr}")
    rec = {
        "stage": name,
        "command": shown,
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(usage.ru_maxrss * 1024 / 2**30, 2),
        "summary": stdout.strip().splitlines()[:2],
    }
    print(f"  -> {rec['wall_s']} s, peak RSS {rec['peak_rss_gib']} GiB; {' | '.join(rec['summary'])}", flush=True)
    return rec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-gallery", type=int, default=1_000_000)
    ap.add_argument("--n-queries", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--root", type=Path, default=Path("/tmp/cir-mine-soak"))
    ap.add_argument("--keep", action="store_true", help="Keep the workspace and outputs under --root.")
    a = ap.parse_args(argv)
    shutil.rmtree(a.root, ignore_errors=True)
    work, s = a.root / "work", str
    recs = [
        run_stage(
            "synth",
            [
                "synth",
                "--out",
                s(work),
                "--n-gallery",
                s(a.n_gallery),
                "--n-triplets",
                s(a.n_queries),
                "--dim",
                s(a.dim),
                "-q",
            ],
        ),
        run_stage(
            "negatives midzone",
            [
                "negatives",
                "--work",
                s(work),
                "--strategy",
                "midzone",
                "-k",
                "10",
                "--out",
                s(a.root / "midzone.parquet"),
                "-q",
            ],
        ),
        run_stage(
            "negatives random+category",
            [
                "negatives",
                "--work",
                s(work),
                "--mix",
                "random:0.5,category:0.5",
                "-k",
                "10",
                "--out",
                s(a.root / "mix.parquet"),
                "-q",
            ],
        ),
        run_stage(
            "cir-train",
            [
                "--work",
                s(work),
                "--negatives",
                s(a.root / "midzone.parquet"),
                "--out",
                s(a.root / "run"),
                "--epochs",
                s(a.epochs),
                "--batch-size",
                "256",
                "-q",
            ],
            app="train_main",
        ),
    ]
    gallery_gib = a.n_gallery * a.dim * 4 / 2**30
    print(f"\ngallery embeddings: {gallery_gib:.2f} GiB (float32[{a.n_gallery}, {a.dim}])\n")
    print("| stage | command | wall (s) | peak RSS (GiB) |\n| --- | --- | --- | --- |")
    for r in recs:
        print(f"| {r['stage']} | `{r['command']}` | {r['wall_s']} | {r['peak_rss_gib']} |")
    print(
        json.dumps(
            {
                "bench": "soak",
                "n_gallery": a.n_gallery,
                "n_queries": a.n_queries,
                "dim": a.dim,
                "gallery_gib": round(gallery_gib, 2),
                "stages": recs,
            }
        )
    )
    if not a.keep:
        shutil.rmtree(a.root, ignore_errors=True)


if __name__ == "__main__":
    from cir_mine.data.memory import prefer_fast_pool

    prefer_fast_pool()  # Arrow's memory pool, as the command line sets it
    main()
