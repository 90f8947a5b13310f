"""The README's first session runs as written (at a small size): every command and option exists,
the baseline and the mined run both train."""

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cir_mine.cli import mine_app, train_app

REPO = Path(__file__).resolve().parents[1]
SMALL = {
    "--n-gallery": "900",
    "--n-triplets": "300",
    "--epochs": "2",
    "--candidates": "64",
    "--batch-size": "32",
    "--refresh-every": "1",
}


def session() -> list:
    text = (REPO / "README.md").read_text()
    block = re.search(r"## A first session\n.*?```bash\n(.*?)```", text, flags=re.S).group(1)
    env, out = {}, []
    for line in block.splitlines():
        line = line.split("  #")[0].strip()
        if not line or line.startswith(". "):
            continue
        m = re.fullmatch(r'(\w+)="(.*)"', line)
        if m:
            env[m.group(1)] = m.group(2)
            continue
        for k, v in env.items():
            line = line.replace(f"${k}", v)
        args = shlex.split(line)
        args = [SMALL.get(args[i - 1], a) if i else a for i, a in enumerate(args)]
        out.append(args)
    return out


@pytest.mark.slow
def test_the_first_session_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cmds = session()
    assert [c[0] for c in cmds] == ["cir-mine", "cir-mine", "cir-mine", "cir-train", "cir-train", "cir-mine"]
    assert "--negatives" not in cmds[3] and "--refresh-every" in cmds[4]  # the baseline beside the mined run
    runner = CliRunner()
    for cmd in cmds:
        app = mine_app if cmd[0] == "cir-mine" else train_app
        r = runner.invoke(app, cmd[1:] + ["-q"])
        assert r.exit_code == 0, (cmd, r.output)
    assert (tmp_path / "runs" / "in-batch" / "metrics.json").exists()
    assert (tmp_path / "runs" / "hardest+refresh" / "negs.round1.parquet").exists()
