"""Bad input, crashes and concurrency: every failure is one `Error:` line, nothing half-written.

Rows of docs/reliability.md map onto the tests here (and the stage-specific suites).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cli import mine_app
from data.workspace import gallery_table, l2_normalize, triplets_table, write_table

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def cli_error(args, code=1):
    """Run cir-mine in-process; assert a clean error (no traceback) and return its text."""
    r = runner.invoke(mine_app, [str(a) for a in args])
    assert r.exit_code == code, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    out = r.output.strip()
    assert out.startswith("Error: ") and "Traceback" not in out and len(out.splitlines()) == 1, out
    return out


def _workspace(root: Path, n=6, d=8, emb=None, text=None, ids=None, ref="a"):
    rng = np.random.default_rng(0)
    ids = ids or [chr(ord("a") + i) for i in range(n)]
    emb = l2_normalize(rng.standard_normal((len(ids), d)).astype(np.float32)) if emb is None else emb
    write_table(gallery_table(ids, ["dress"] * len(ids), [[] for _ in ids], emb), root / "gallery.train.parquet")
    text = l2_normalize(rng.standard_normal((1, d)).astype(np.float32)) if text is None else text
    write_table(triplets_table(["q0"], ["dress"], [ref], ["b"], [["is red"]], text), root / "triplets.train.parquet")
    return root


def test_missing_workspace(tmp_path):
    assert "workspace directory not found" in cli_error(["info", "--work", tmp_path / "none"])


def test_missing_dataset_root(tmp_path):
    out = cli_error(["check", "--dataset", "cirr", "--root", tmp_path / "x"])
    assert out == f"Error: {tmp_path / 'x'}: CIRR root not found. Pass the folder that holds captions/ and image_splits/."


def test_truncated_json(cirr_root):
    p = cirr_root / "captions" / "cap.rc2.val.json"
    p.write_text(p.read_text()[:100])
    assert f"Error: {p}: malformed JSON" in cli_error(["check", "--dataset", "cirr", "--root", cirr_root, "--split", "val"])


def test_empty_caption_string_cirr(cirr_root):
    p = cirr_root / "captions" / "cap.rc2.val.json"
    caps = json.loads(p.read_text())
    caps[2]["caption"] = "  "
    p.write_text(json.dumps(caps))
    out = cli_error(["check", "--dataset", "cirr", "--root", cirr_root, "--split", "val"])
    assert out == f"Error: {p}: entry 2 'caption' must be a non-empty string, found '  '."


def test_duplicate_image_ids(tmp_path):
    _workspace(tmp_path, ids=["a", "b", "a"])
    assert "duplicated id 'a' in category 'dress'" in cli_error(["info", "--work", tmp_path])


def test_triplet_reference_missing(tmp_path):
    _workspace(tmp_path, ref="zz")
    assert "column 'ref_id' names 1 image(s) missing" in cli_error(["info", "--work", tmp_path])


def test_nan_and_unnormalized_embeddings(tmp_path):
    emb = np.eye(6, 8, dtype=np.float32)
    emb[1] = np.inf
    _workspace(tmp_path, emb=emb)
    assert "with NaN or inf values (first: b)" in cli_error(["info", "--work", tmp_path])
    _workspace(tmp_path, emb=np.eye(6, 8, dtype=np.float32) * 0.5)
    assert "not L2-normalized (first: a with norm 0.5000)" in cli_error(["info", "--work", tmp_path])


def test_dimension_mismatch(tmp_path):
    _workspace(tmp_path, text=l2_normalize(np.ones((1, 4), np.float32)))
    assert "has dimension 4 but the gallery has dimension 8" in cli_error(["info", "--work", tmp_path])


def test_empty_split(tmp_path):
    _workspace(tmp_path)
    write_table(gallery_table([], [], [], np.zeros((0, 8), np.float32)), tmp_path / "gallery.train.parquet")
    assert "the gallery is empty (0 rows)" in cli_error(["info", "--work", tmp_path])


def test_wrong_schema_parquet(tmp_path):
    _workspace(tmp_path)
    pq.write_table(pa.table({"image_id": ["a"]}), tmp_path / "gallery.train.parquet")
    assert "missing column 'category' (string)" in cli_error(["info", "--work", tmp_path])


def test_bad_usage_exit_2(tmp_path):
    cli_error(["synth", "--out", tmp_path, "--n-gallery", "100", "--n-triplets", "80"], code=2)
    assert not list(tmp_path.glob("*.parquet")) and not list(tmp_path.glob(".*.tmp"))


def _run_cli(args, **kw):
    return subprocess.Popen([sys.executable, "-c", "from cli import mine_main; mine_main()", *map(str, args)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_second_writer_fails_fast(tmp_path):
    """Two processes writing one workspace: the second fails with a lock message, never interleaves."""
    from data.io import DirLock

    with DirLock(tmp_path, "test holder"):
        p = _run_cli(["synth", "--out", tmp_path, "--n-gallery", "200", "--n-triplets", "20", "--dim", "8", "-q"])
        out, err = p.communicate(timeout=60)
    assert p.returncode == 1
    assert err.strip() == (f"Error: {tmp_path} is in use by process {os.getpid()} (test holder). Wait for it to "
                           f"finish, or delete {tmp_path / '.cir-mine.lock'} if that process is gone.")
    assert not (tmp_path / "gallery.train.parquet").exists()


def test_sigkill_during_synth_then_rerun(tmp_path):
    """A killed writer leaves no file under its final name, a stale lock is taken over, rerun == clean run."""
    args = ["synth", "--out", tmp_path / "w", "--n-gallery", "400000", "--n-triplets", "100", "--dim", "64", "-q"]
    p = _run_cli(args)
    deadline = time.time() + 60
    while time.time() < deadline and not list((tmp_path / "w").glob(".gallery.train.parquet.*.tmp")):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "w" / "gallery.train.parquet").exists()
    assert (tmp_path / "w" / ".cir-mine.lock").exists()          # stale lock of the dead process
    small = ["synth", "--out", tmp_path / "w", "--n-gallery", "300", "--n-triplets", "30", "--dim", "8", "-q"]
    assert _run_cli(small).wait(timeout=120) == 0
    assert _run_cli([*small[:2], tmp_path / "clean", *small[3:]]).wait(timeout=120) == 0
    for name in ("gallery.train.parquet", "triplets.train.parquet"):
        assert pq.read_table(tmp_path / "w" / name).equals(pq.read_table(tmp_path / "clean" / name))
