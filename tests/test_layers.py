"""Dependencies point one way: data <- miner.core <- (accel, encode, inspection, positives, distributed)
<- train <- cli; within the middle layer accel (the device rule, torch search) comes first: encode
uses its device rule, and it uses none of the others.

Each layer is imported with the layers above it blocked; the mining core also imports no torch,
duckdb or matplotlib, so researchers can mine from numpy arrays without the heavy stacks.
"""

import subprocess
import sys

import pytest

PKG = "cir_mine"
# layer -> (modules it must import without, packages to walk)
LAYERS = {
    "data": (
        ["cir_mine.miner", "cir_mine.train", "cir_mine.cli", "torch", "duckdb", "matplotlib", "faiss"],
        ["cir_mine.data"],
    ),
    "miner.core": (
        [
            "cir_mine.miner.accel",
            "cir_mine.miner.encode",
            "cir_mine.miner.distributed",
            "cir_mine.miner.inspection",
            "cir_mine.miner.positives",
            "cir_mine.train",
            "cir_mine.cli",
            "torch",
            "duckdb",
            "matplotlib",
            "open_clip",
            "ray",
        ],
        ["cir_mine.miner.core"],
    ),
    "miner.accel": (
        [
            "cir_mine.miner.encode",
            "cir_mine.miner.distributed",
            "cir_mine.miner.inspection",
            "cir_mine.miner.positives",
            "cir_mine.miner.remine",
            "cir_mine.train",
            "cir_mine.cli",
            "duckdb",
            "matplotlib",
            "open_clip",
            "ray",
        ],
        ["cir_mine.miner.accel"],
    ),
    "miner": (["cir_mine.train", "cir_mine.cli"], ["cir_mine.miner"]),
    "train": (["cir_mine.cli"], ["cir_mine.train"]),
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layer_does_not_import_upper_layers(layer):
    blocked, packages = LAYERS[layer]
    code = (
        "import sys, importlib, pkgutil\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None\n"
        f"for pkg in {packages!r}:\n"
        "    p = importlib.import_module(pkg)\n"
        "    for m in pkgutil.walk_packages(p.__path__, pkg + '.'):\n"
        "        importlib.import_module(m.name)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_blocking_is_effective():
    """The harness above can fail: importing the encoders with torch blocked must break."""
    code = "import sys\nsys.modules['torch'] = None\nimport cir_mine.miner.encode.clip\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0 and "torch" in r.stderr


def test_no_top_level_imports_of_the_root_folders():
    """Inside the package every import goes through cir_mine, never through data/miner/train/cli."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    bad = []
    for folder in ("data", "miner", "train"):
        for f in (root / folder).rglob("*.py"):
            bad += _top_level_imports(f, ast)
    bad += _top_level_imports(root / "cli.py", ast)
    bad += _top_level_imports(root / "__init__.py", ast)
    assert not bad, bad


def _top_level_imports(path, ast):
    out = []
    for n in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            names = [n.module]
        elif isinstance(n, ast.Import):
            names = [a.name for a in n.names]
        out += [f"{path.name}:{n.lineno}: {m}" for m in names if m.split(".")[0] in ("data", "miner", "train", "cli")]
    return out
