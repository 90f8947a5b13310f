"""`cir-mine negatives`: runs end to end, summary line, exact error text and exit codes."""

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from cir_mine.cli import mine_app
from cir_mine.data.workspace import Workspace
from cir_mine.miner.core.tables import read_negatives

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def test_negatives_mix_writes_table_and_summary(synth_work, tmp_path):
    out = tmp_path / "negs.parquet"
    r = runner.invoke(
        mine_app,
        [
            "negatives",
            "--work",
            str(synth_work),
            "--mix",
            "midzone:0.6,category:0.3,random:0.1",
            "-k",
            "10",
            "--seed",
            "3",
            "--out",
            str(out),
            "--candidates",
            "300",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    t = read_negatives(out, Workspace(synth_work))
    assert (
        f"wrote {out}: {t.table.num_rows} rows for 600 queries (k=10: midzone:6,category:3,random:1; bank mined;"
        in r.output
    )
    assert "shortfall: " in r.output and "guards removed: target" in r.output
    p0 = t.meta["parts"][0]
    assert t.meta["config"]["seed"] == 3 and (p0["strategy"], p0["share"], p0["k"]) == ("midzone", 0.6, 6)
    assert sum(p["rows"] for p in t.meta["parts"]) == t.table.num_rows
    assert f"rows per strategy: midzone {p0['rows']}, category" in r.output
    assert not (tmp_path / ".cir-mine.lock").exists()


def test_negatives_verbose_prints_each_stage_and_the_kernel_race(synth_work, tmp_path):
    """-v: the seconds of read, prepare, search, rerank, guards, select, table and write, and the
    microseconds per query each raced kernel took; the footer keeps the same stages."""
    import re

    out = tmp_path / "negs.parquet"
    r = runner.invoke(
        mine_app, ["negatives", "--work", str(synth_work), "--strategy", "hardest", "-k", "5", "--out", str(out), "-v"]
    )
    assert r.exit_code == 0, r.output
    line = next(l for l in r.output.splitlines() if l.startswith("stages: "))
    assert re.match(
        r"stages: read [\d.]+s, prepare [\d.]+s, search [\d.]+s, rerank [\d.]+s, guards [\d.]+s, "
        r"select [\d.]+s, table [\d.]+s, write [\d.]+s \(total [\d.]+s\); kernels \(us/query\): ",
        line,
    ), line
    assert "faiss " in line and "bf16 " in line and "gemm " in line
    timing = read_negatives(out, Workspace(synth_work)).meta["timing"]
    assert {"read_s", "search_s", "rerank_s", "guards_s", "select_s", "table_s", "total_s"} <= set(timing)
    assert timing["read_s"] > 0  # the split is read before mining, and counted
    assert set(next(iter(timing["kernels"].values()))) == {"faiss", "bf16", "gemm"}


def test_negatives_shortfall_names_the_knob(synth_work, tmp_path):
    r = runner.invoke(
        mine_app,
        [
            "negatives",
            "--work",
            str(synth_work),
            "--strategy",
            "semihard",
            "--margin",
            "0.001",
            "-k",
            "5",
            "--out",
            str(tmp_path / "n.parquet"),
            "--no-guard",
            "cap",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "to loosen: semihard: raise --margin or --max-candidates" in r.output


def test_negatives_errors(synth_work, tmp_path):
    base = ["negatives", "--work", str(synth_work), "--out", str(tmp_path / "n.parquet")]
    r = runner.invoke(mine_app, base + ["--strategy", "nope"])
    assert r.exit_code == 2
    assert r.output.strip().endswith(
        "Error: unknown strategy 'nope' in 'nope': use one of random, in-batch, hardest, "
        "semihard, midzone, category, category-discrepant, attribute-mismatch, soft, "
        "semantic, verified, kept-mismatch, error-targeted."
    )
    r = runner.invoke(mine_app, base)
    assert (
        r.exit_code == 2 and "Error: nothing to mine: pass --strategy NAME, --mix SPEC or --schedule SPEC." in r.output
    )
    r = runner.invoke(mine_app, base + ["--strategy", "midzone", "--no-guard", "everything"])
    assert r.exit_code == 2 and "Error: --no-guard 'everything': use one of target, reference" in r.output
    r = runner.invoke(mine_app, base + ["--strategy", "midzone", "--checkpoint", "run/ckpt.pt"])
    # a missing checkpoint is a missing input: exit 1
    assert r.exit_code == 1 and r.output.strip().endswith(
        "Error: run/ckpt.pt: checkpoint not found. Train a run with `cir-train --out RUN` first."
    )
    r = runner.invoke(
        mine_app,
        ["negatives", "--work", str(tmp_path / "none"), "--strategy", "random", "--out", str(tmp_path / "n.parquet")],
    )
    assert r.exit_code == 1 and "workspace directory not found" in r.output


def test_negatives_subprocess_schedule(synth_work, tmp_path):
    out = tmp_path / "s.parquet"
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from cli import mine_main; mine_main()",
            "negatives",
            "--work",
            str(synth_work),
            "--schedule",
            "0:random,2:midzone,4:hardest",
            "--round",
            "3",
            "-k",
            "4",
            "--out",
            str(out),
            "--no-guard",
            "cap",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    t = read_negatives(out)
    assert set(t.table["strategy"].to_pylist()) == {"midzone"}
    assert [e["from_epoch"] for e in t.meta["schedule"]] == [0, 2, 4]


def test_negatives_lock(synth_work, tmp_path):
    from cir_mine.data.io import DirLock

    with DirLock(tmp_path, "another miner"):
        r = runner.invoke(
            mine_app,
            ["negatives", "--work", str(synth_work), "--strategy", "random", "--out", str(tmp_path / "n.parquet")],
        )
    assert r.exit_code == 1 and f"Error: {tmp_path} is in use by process" in r.output
    assert not (tmp_path / "n.parquet").exists()
