"""Dependencies point one way: data <- miner <- train <- cli."""
import subprocess
import sys

import pytest

LAYERS = ["data", "miner", "train", "cli"]
MODULES = {
    "data": ["data.workspace", "data.synthetic", "data.fashioniq", "data.cirr", "data.adapters"],
    "miner": ["miner.index"],
}


@pytest.mark.parametrize("layer", ["data", "miner"])
def test_layer_does_not_import_upper_layers(layer):
    blocked = LAYERS[LAYERS.index(layer) + 1:]
    code = (
        "import sys\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None\n"
        f"import importlib, pkgutil\n"
        f"import {layer}\n"
        f"for m in pkgutil.walk_packages({layer}.__path__, '{layer}.'):\n"
        "    importlib.import_module(m.name)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
