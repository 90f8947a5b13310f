"""bench/gpu.sh --smoke: the GPU benchmark's whole path on CPU at tiny sizes, writing its table."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_bench_smoke(tmp_path):
    out = tmp_path / "gpu.md"
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--smoke", "--out", str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    md = out.read_text()
    assert md.startswith("GPU benchmark (smoke, CPU;")
    for row in ("| embed: bare encode_image, fp32 |", "| embed: cir-mine forward_images",
                "| flat: bare FAISS search, 300 queries at depth 128 |", "| flat: mine_negatives midzone k=10, overlapped |",
                "| ivf: index build + tuning (nprobe=", "| ivf: mine_negatives midzone k=10, sequential |"):
        assert row in md, row
