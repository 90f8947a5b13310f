"""The CPU benchmark scripts run end to end at tiny sizes (their imports follow the library)."""

import json
import subprocess
import sys
from pathlib import Path

from cir_mine.data.synthetic import SynthConfig, generate

REPO = Path(__file__).resolve().parents[1]


def run(*args) -> str:
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_torch_cpu_bench_runs_and_finds_the_same_table():
    out = run("bench/torch_cpu.py", "--n-gallery", "3000", "--n-queries", "300", "--dim", "16", "--repeats", "1")
    assert json.loads(out.splitlines()[0])["same_table"] is True


def test_prefetch_bench_runs(tmp_path):
    generate(SynthConfig(n_gallery=2000, n_triplets=300, dim=16, seed=0), tmp_path / "w")
    last = json.loads(run("bench/prefetch.py", str(tmp_path / "w"), "-k", "5").splitlines()[-1])
    assert last["bench"] == "prefetch" and last["wall_on_vs_off"] > 0
