"""The README's Python API example runs as written, from a directory with its own `data/` and
`train.py` (as CLIP4Cir-, BLIP- and LAVIS-based research repos have), and every public name is documented."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section holds one runnable python block"
    return blocks[0]


def test_readme_python_example_runs_beside_user_modules(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "__init__.py").write_text('OWNER = "user"\n')
    (tmp_path / "train.py").write_text('OWNER = "user"\n')
    (tmp_path / "example.py").write_text(
        "import data, train\n" + readme_example() + "\nassert data.OWNER == train.OWNER == 'user'\n"
    )
    r = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("(200, 8) ") and lines[0].endswith(" short queries")
    assert lines[1] == "torch.Size([32, 8, 64]) torch.Size([32, 8])"
    assert re.fullmatch(r"1 \d+ rows", lines[2])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == ["data", "example.py", "train.py"]


def test_every_public_name_is_documented():
    import cir_mine

    doc = (REPO / "docs" / "api.md").read_text()
    missing = [n for n in cir_mine._API if f"`{n}" not in doc]
    assert not missing, f"docs/api.md does not document: {missing}"
    for name in cir_mine._API:
        assert getattr(cir_mine, name) is not None
