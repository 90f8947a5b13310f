"""The "Tuned settings" table of docs/search.md states the values the code runs with: each row's
setting (a constant under cir_mine.miner.core, one under cir_mine.miner.accel, or a mining option)
resolves and equals the table's value."""

import importlib
import re
from pathlib import Path

import pytest

from cir_mine.miner.core.mine import MineConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "search.md"


def table_rows() -> list:
    """(setting names, values) of each row: the backticked names before the first parenthesis of the
    first cell, and the second cell's comma-separated values (2^n read as a power of two)."""
    text = DOC.read_text().split("## Tuned settings", 1)[1]
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or cells[0] in ("setting", "---"):
            continue
        names = re.findall(r"`([^`]+)`", cells[0].split(" (", 1)[0])
        values = [
            float(2 ** int(v[2:])) if v.startswith("2^") else float(v)
            for v in (x.split(" ")[0] for x in cells[1].split(", "))
        ]
        rows.append((names, values))
    return rows


def resolve(name: str):
    if "." not in name:
        return MineConfig().options()[name]
    parts = name.split(".")
    prefix = "cir_mine." if parts[0] == "miner" else "cir_mine.miner.core."
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(prefix + ".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise LookupError(name)


def test_the_table_is_read():
    rows = table_rows()
    assert len(rows) >= 10 and (["search.backends.FLAT_DEEP_SHARE"], [0.25]) in rows


@pytest.mark.parametrize("names,values", table_rows(), ids=lambda v: ",".join(map(str, v)))
def test_each_tuned_setting_is_the_code_value(names, values):
    assert len(names) == len(values)
    for name, value in zip(names, values):
        assert resolve(name) == pytest.approx(value), name
