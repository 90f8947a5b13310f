"""The library's shape: rooms with one job (no module over about 500 lines, no function over 80) and
errors that name parameters, never command-line flags (cli.py spells the flags, see
cir_mine.data.errors). Checked over the source of data/, miner/ and train/ (not tests or bench); the
size limits also hold for cli.py, which only parses, calls the library and renders."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = ("data", "miner", "train")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
OTHER_TOOL = re.compile(r"`ray [^`]*`")  # another tool's command line, e.g. `ray start --head`


def library_files() -> list:
    return sorted(p for root in LIBRARY for p in (REPO / root).rglob("*.py"))


def shaped_files() -> list:
    """The files held to the size limits: the library and cli.py."""
    return library_files() + [REPO / "cli.py"]


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def test_the_scan_sees_the_library():
    names = {rel(p) for p in library_files()}
    assert {"data/workspace.py", "miner/core/mine.py", "train/loop.py"} <= names and len(names) > 60


@pytest.mark.parametrize("path", shaped_files(), ids=rel)
def test_modules_and_functions_stay_small(path):
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{rel(path)}: split it along its seams"
    long = [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{rel(path)}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def message_texts(node: ast.Raise) -> list:
    """The text of a raise statement's exception: its string literals and the literal parts of its
    f-strings (what a reader of the message sees, whatever the arguments)."""
    return [sub.value for sub in ast.walk(node.exc) if isinstance(sub, ast.Constant) and isinstance(sub.value, str)]


def flags_raised(source: str) -> list:
    return [
        (node.lineno, flag)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Raise) and node.exc
        for text in message_texts(node)
        for flag in FLAG.findall(OTHER_TOOL.sub("", text))
    ]


def test_the_flag_scan_finds_flags_in_raise_sites():
    source = (
        'def f(x):\n    raise UsageError(f"--index {x}: pass --shard-index instead.")\n'
        'def g(x):\n    raise UsageError("index " + x + ": start `ray start --head`", params=("index",))\n'
    )
    assert flags_raised(source) == [(2, "--index"), (2, "--shard-index")]


@pytest.mark.parametrize("path", library_files(), ids=rel)
def test_library_errors_name_parameters_not_flags(path):
    found = flags_raised(path.read_text())
    assert not found, f"{rel(path)}: error messages spell flags (name the parameter, params=(...)): {found}"
