"""One import package: the wheel installs `cir_mine` only, and user code with its own `data/`,
`train.py` and `miner.py` imports the API and mines a table."""

import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _source_copy(dest: Path) -> Path:
    """The files git would ship (tracked + untracked, not ignored), so no stale build/ is reused."""
    out = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, out):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.mark.slow
def test_wheel_holds_only_cir_mine(tmp_path):
    src = _source_copy(tmp_path / "src")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(src),
            "-w",
            str(tmp_path / "dist"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"cir_mine"}, sorted(top)
    for needed in (
        "cir_mine/cli.py",
        "cir_mine/miner/core/mine.py",
        "cir_mine/miner/core/vocabulary.json",
        "cir_mine/miner/encode/garment_attributes.json",
        "cir_mine/train/loop.py",
    ):
        assert needed in names
    assert not any(n.startswith(("cir_mine/tests/", "cir_mine/bench/")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry).decode()
    assert "cir-mine = cir_mine.cli:mine_main" in text and "cir-train = cir_mine.cli:train_main" in text


USER_SCRIPT = """
import data, train, miner
assert data.OWNER == "user" and train.OWNER == "user" and miner.OWNER == "user"

from cir_mine import MineConfig, Workspace, mine_negatives, read_negatives
from cir_mine.data.synthetic import SynthConfig, generate

generate(SynthConfig(n_gallery=400, n_triplets=80, dim=16, seed=3), "work")
res = mine_negatives(Workspace("work"), "train", MineConfig.of(strategy="hardest", k=3, seed=0))
assert res.table.num_rows > 0
import data as again
assert again.OWNER == "user"
print("mined", res.table.num_rows)
"""


def test_user_code_with_its_own_data_and_train_modules(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "__init__.py").write_text('OWNER = "user"\n')
    (tmp_path / "train.py").write_text('OWNER = "user"\n')
    (tmp_path / "miner.py").write_text('OWNER = "user"\n')
    (tmp_path / "user_mine.py").write_text(textwrap.dedent(USER_SCRIPT))
    r = subprocess.run([sys.executable, "user_mine.py"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mined" in r.stdout


def test_console_scripts_and_version():
    import cir_mine

    exe = Path(sys.executable).parent / "cir-mine"
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "negatives" in r.stdout
    assert cir_mine.__version__
