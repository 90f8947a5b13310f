"""bench/gpu.sh: the GPU benchmark's whole path (the carried-wheel install, the embedding rows, the torch
search and mining rows) on CPU at tiny sizes, writing its table; and what it needs beyond the GPU image."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# What the GPU image has (torch, numpy, pyarrow, typer, matplotlib, pillow, CuPy and their own
# dependencies) and what bench/gpu.sh carries (Makefile: GPU_WHEELS).
IMAGE = {
    "torch",
    "torchgen",
    "functorch",
    "triton",
    "nvidia",
    "numpy",
    "pyarrow",
    "typer",
    "click",
    "rich",
    "shellingham",
    "markdown_it",
    "mdurl",
    "pygments",
    "matplotlib",
    "contourpy",
    "cycler",
    "fontTools",
    "kiwisolver",
    "pyparsing",
    "dateutil",
    "six",
    "PIL",
    "cupy",
    "cupy_backends",
    "fastrlock",
    "cuda",
    "packaging",
    "filelock",
    "typing_extensions",
    "sympy",
    "mpmath",
    "networkx",
    "jinja2",
    "markupsafe",
    "fsspec",
    "setuptools",
    "pkg_resources",
    "_distutils_hack",
}
CARRIED = {"faiss", "duckdb", "open_clip", "open_clip_train", "torchvision", "ftfy", "wcwidth", "regex", "tqdm"}


@pytest.mark.slow
def test_gpu_bench_smoke(tmp_path):
    out = tmp_path / "gpu.md"
    env = {**os.environ, "PYTHON": sys.executable, "CIR_MINE_WHEELS": str(tmp_path / "no-wheels")}
    r = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), "--smoke", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    md = out.read_text()
    assert md.startswith("GPU benchmark (smoke, CPU;")
    for row in (
        "| embed: bare encode_image (cir-tiny-clip, bfloat16, batch 4, pixels on the device) |",
        "| embed: cir-mine forward (uint8 from pinned host memory) |",
        "| embed: cir-mine end-to-end (8 JPEG 32px",
        "| fp32: bare torch GEMM + top-k, 300 queries at depth 512 |",
        "| fp32: TorchSearch.search, same queries and depth |",
        "| fp32: mine_negatives midzone k=10 (prefetch off) |",
        "| bf16: mine_negatives midzone k=10 (prefetch off) |",
    ):
        assert row in md, row
    assert "failed" not in md


def test_gpu_bench_names_the_missing_wheel(tmp_path):
    """A module the image lacks with no wheel for it in the carried folder: the script stops before
    any work and names the command that fills the folder (no network is tried)."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\ncase "$2" in \'import faiss\') exit 1;; esac\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "CIR_MINE_WHEELS": str(tmp_path / "empty")}
    r = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), "--smoke", "--out", str(tmp_path / "x.md")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    assert "faiss is not installed" in r.stderr and "make gpu-wheels" in r.stderr and not (tmp_path / "x.md").exists()


def test_gpu_bench_installs_what_the_image_lacks_from_the_carried_wheels(tmp_path):
    """A module the image lacks is installed from its wheel in the carried folder, offline
    (pip --no-index --no-deps into a folder on PYTHONPATH); modules that import are left alone."""
    import zipfile

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "tqdm-0.0.1-py3-none-any.whl", "w") as z:
        z.writestr("cir_mine_probe.py", "WHERE = 'carried'\n")
        z.writestr("tqdm-0.0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: tqdm\nVersion: 0.0.1\n")
        z.writestr(
            "tqdm-0.0.1.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        z.writestr("tqdm-0.0.1.dist-info/RECORD", "")
    fake = tmp_path / "python"
    # the image lacks tqdm; when the benchmark starts, the carried module imports from PYTHONPATH
    fake.write_text(
        f"#!/bin/sh\ncase \"$2\" in 'import tqdm') exit 1;; esac\n"
        f'case "$1" in *gpu.py) {sys.executable} -c \'import cir_mine_probe as p; print("probe", p.WHERE)\';; esac\n'
        f'exec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "CIR_MINE_WHEELS": str(wheels)}
    r = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), "--help"], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "installing 1 wheel(s)" in r.stderr and "tqdm-0.0.1-py3-none-any.whl" in r.stderr
    assert "probe carried" in r.stdout and "GPU benchmark" in r.stdout


@pytest.mark.slow
def test_gpu_bench_imports_only_the_image_and_the_carried_wheels(tmp_path):
    """The benchmark's whole path runs in a Python that sees only the image's packages and the
    carried ones (every other package this machine has for the tests, Ray, ... left out): what the
    GPU machine lacks is in the carry list."""
    import sysconfig

    view = tmp_path / "site"
    view.mkdir()
    packages = Path(sysconfig.get_paths()["purelib"])
    for entry in packages.iterdir():
        top = entry.name.split(".")[0].split("-")[0]
        if top in IMAGE | CARRIED or entry.name.endswith(".libs") or entry.name.endswith(".dist-info"):
            (view / entry.name).symlink_to(entry)
    (view / "cir_mine").symlink_to(REPO)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = f"{view}:{REPO}"  # -S: no site-packages but the view
    r = subprocess.run(
        [sys.executable, "-S", str(REPO / "bench" / "gpu.py"), "--smoke", "--out", str(tmp_path / "gpu.md")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "failed" not in (tmp_path / "gpu.md").read_text()
