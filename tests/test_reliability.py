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

from cir_mine.cli import mine_app
from cir_mine.data.workspace import Workspace, gallery_table, l2_normalize, triplets_table, write_table

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def cli_error(args, code=1, app=mine_app):
    """Run cir-mine (or cir-train) in-process; assert a clean error (no traceback) and return its text."""
    r = runner.invoke(app, [str(a) for a in args])
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
    assert (
        out == f"Error: {tmp_path / 'x'}: CIRR root not found. Pass the folder that holds captions/ and image_splits/."
    )


def test_truncated_json(cirr_root):
    p = cirr_root / "captions" / "cap.rc2.val.json"
    p.write_text(p.read_text()[:100])
    assert f"Error: {p}: malformed JSON" in cli_error(
        ["check", "--dataset", "cirr", "--root", cirr_root, "--split", "val"]
    )


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
    return subprocess.Popen(
        [sys.executable, "-c", "from cli import mine_main; mine_main()", *map(str, args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_second_writer_fails_fast(tmp_path):
    """Two processes writing one workspace: the second fails with a lock message, never interleaves."""
    from cir_mine.data.io import DirLock

    with DirLock(tmp_path, "test holder"):
        p = _run_cli(["synth", "--out", tmp_path, "--n-gallery", "200", "--n-triplets", "20", "--dim", "8", "-q"])
        out, err = p.communicate(timeout=60)
    assert p.returncode == 1
    assert err.strip() == (
        f"Error: {tmp_path} is in use by process {os.getpid()} (test holder). Wait for it to "
        f"finish, or delete {tmp_path / '.cir-mine.lock'} if that process is gone."
    )
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
    assert (tmp_path / "w" / ".cir-mine.lock").exists()  # stale lock of the dead process
    small = ["synth", "--out", tmp_path / "w", "--n-gallery", "300", "--n-triplets", "30", "--dim", "8", "-q"]
    assert _run_cli(small).wait(timeout=120) == 0
    assert _run_cli([*small[:2], tmp_path / "clean", *small[3:]]).wait(timeout=120) == 0
    for name in ("gallery.train.parquet", "triplets.train.parquet"):
        assert pq.read_table(tmp_path / "w" / name).equals(pq.read_table(tmp_path / "clean" / name))


# ------------------------------------------------------------------------------------------------
# Bad input for embed, negatives, stats/report and cir-train

from cir_mine.cli import train_app  # noqa: E402
from cir_mine.data.synthetic import SynthConfig, generate  # noqa: E402


@pytest.fixture(scope="module")
def work16(tmp_path_factory):
    """A small read-only synthetic workspace (d=16), its negatives table and a second workspace's table."""
    root = tmp_path_factory.mktemp("bad")
    generate(SynthConfig(n_gallery=300, n_triplets=60, dim=16, seed=0), root / "w")
    generate(SynthConfig(n_gallery=300, n_triplets=60, dim=16, seed=1), root / "other")
    for w in ("w", "other"):
        r = runner.invoke(
            mine_app,
            [
                "negatives",
                "--work",
                str(root / w),
                "--strategy",
                "random",
                "-k",
                "3",
                "--out",
                str(root / f"{w}.parquet"),
                "-q",
            ],
        )
        assert r.exit_code == 0, r.output
    return root


def listing(d: Path) -> list:
    """Every path under ``d`` (hidden temp and lock files included), or None when ``d`` is absent."""
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else None


def test_embed_missing_root_and_split(tmp_path, fiq_root):
    work = tmp_path / "w"
    out = cli_error(["embed", "--dataset", "fashioniq", "--root", tmp_path / "nope", "--work", work])
    assert out == (
        f"Error: {tmp_path / 'nope'}: FashionIQ root not found. Pass the folder that holds captions/ and image_splits/."
    )
    out = cli_error(["embed", "--dataset", "fashioniq", "--root", fiq_root, "--split", "val", "--work", work])
    assert out == (
        f"Error: {fiq_root / 'image_splits' / 'split.dress.val.json'}: file not found. Is 'val' a "
        f"FashionIQ split (train, val, test)?"
    )
    assert not work.exists()


@pytest.mark.slow
def test_embed_every_image_corrupt_or_empty(tmp_path, fiq_root):
    """Some unreadable images are skipped and counted (test_embed); all unreadable is an error, nothing kept."""
    from tests.fixtures import write_tiny_clip_config

    imgs = sorted((fiq_root / "images").glob("*.png"))
    for i, f in enumerate(imgs):
        f.write_bytes(b"" if i % 2 else b"not a png")  # zero-byte and corrupt
    work = tmp_path / "w"
    p = _run_cli(
        [
            "embed",
            "--dataset",
            "fashioniq",
            "--root",
            fiq_root,
            "--work",
            work,
            "--model",
            write_tiny_clip_config(tmp_path / "tiny.json"),
            "--device",
            "cpu",
            "--workers",
            "0",
            "-q",
        ]
    )
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"Error: {fiq_root}: none of the {len(imgs)} images could be read (first: unreadable "
        f"(UnidentifiedImageError: cannot identify image file '{imgs[0]}')). Check --root and the image files."
    )
    assert not work.exists()  # no workspace, no resume scratch


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".cir-mine.lock"))
    return dst


def test_foreign_index_is_refused(work16, tmp_path):
    """index.{split}.faiss from another gallery (other d, or same d other images) vs gallery.{split}.parquet."""
    import shutil

    small = tmp_path / "d8"
    generate(SynthConfig(n_gallery=300, n_triplets=60, dim=8, seed=0), small)
    r = runner.invoke(mine_app, ["index", "--work", str(small)])
    assert r.exit_code == 0, r.output
    for src, other in (
        (small, "the index has d=8 and 300 rows but {g} has d=16 and 300 rows"),
        (_copy(work16 / "other", tmp_path / "other"), None),
    ):
        work = _copy(work16 / "w", tmp_path / f"w-{src.name}")
        if other is None:
            assert runner.invoke(mine_app, ["index", "--work", str(src)]).exit_code == 0
        for f in ("index.train.faiss", "index.train.faiss.json"):
            shutil.copy(src / f, work / f)
        before = listing(work)
        out = cli_error(["positives", "--work", work, "--out", tmp_path / "pos.parquet"])
        g, idx = work / "gallery.train.parquet", work / "index.train.faiss"
        fix = f"Rebuild it with `cir-mine index --work {work} --split train`."
        if other:
            assert out == f"Error: {idx}: {other.format(g=g)}. {fix}"
        else:
            assert out.startswith(f"Error: {idx}: built from another gallery (hash ") and out.endswith(fix)
            assert f", {g} has " in out
        assert listing(work) == before and not (tmp_path / "pos.parquet").exists()


def test_mining_with_a_foreign_index_object(work16, tmp_path):
    from cir_mine.data.errors import DataError
    from cir_mine.miner.core.search import build_index
    from cir_mine.miner.core.mine import MineConfig, mine_negatives

    ws = Workspace(work16 / "w")
    with pytest.raises(DataError) as e:
        mine_negatives(
            ws, "train", MineConfig.of(strategy="midzone"), index=build_index(np.eye(4, 8, dtype=np.float32))
        )
    assert str(e.value) == (
        f"the given index: the index has d=8 and 4 rows but {ws.gallery_path('train')} has "
        f"d=16 and 300 rows. Pass an index built from this gallery."
    )


def test_checkpoint_for_another_dimension(work16, tmp_path):
    """A cir-train checkpoint of a d=8 model: `negatives --checkpoint` and `--resume` refuse it."""
    run = tmp_path / "run8"
    small = tmp_path / "d8"
    generate(SynthConfig(n_gallery=300, n_triplets=60, dim=8, seed=0), small)
    r = runner.invoke(
        train_app,
        ["--work", str(small), "--out", str(run), "--epochs", "1", "--batch-size", "32", "--threads", "1", "-q"],
    )
    assert r.exit_code == 0, r.output
    out = cli_error(
        [
            "negatives",
            "--work",
            work16 / "w",
            "--checkpoint",
            run / "ckpt.pt",
            "--strategy",
            "midzone",
            "--out",
            tmp_path / "negs" / "n.parquet",
        ]
    )
    assert out == (
        f"Error: {run / 'ckpt.pt'}: the model takes d=8 but {work16 / 'w'} has d=16. Use a checkpoint "
        f"trained on this workspace's encoder."
    )
    assert not (tmp_path / "negs").exists()
    # the run's workspace is re-embedded with another encoder (d=16): resuming must not mix the two
    generate(SynthConfig(n_gallery=300, n_triplets=60, dim=16, seed=0), small)
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    r = runner.invoke(train_app, ["--resume", str(run), "-q"])
    assert r.exit_code == 1 and r.output.strip() == (
        f"Error: {run / 'ckpt.pt'}: the model takes d=8 but {small} now has d=16. Resume on the workspace the run "
        f"was trained on, or start a new run with another --out."
    )
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before


def test_resume_on_a_changed_workspace(work16, tmp_path):
    work, run = _copy(work16 / "w", tmp_path / "w"), tmp_path / "run"
    r = runner.invoke(
        train_app,
        ["--work", str(work), "--out", str(run), "--epochs", "1", "--batch-size", "32", "--threads", "1", "-q"],
    )
    assert r.exit_code == 0, r.output
    old = Workspace(work).manifest_hash()
    generate(SynthConfig(n_gallery=300, n_triplets=60, dim=16, seed=9), work)
    out = cli_error(["--resume", run, "-q"], app=train_app)
    assert out == (
        f"Error: {run / 'ckpt.pt'}: trained on another workspace (manifest hash {old}, {work} has "
        f"{Workspace(work).manifest_hash()}). Resume on the workspace the run was trained on, or start "
        f"a new run with another --out."
    )


BAD_NEGATIVES = [
    (
        ["--strategy", "midzone", "-k", "299"],
        "-k (299) is larger than the gallery allows: {g} has 300 images, so a "
        "query has at most 298 negatives besides its reference and target. Lower -k.",
    ),
    (["--mix", "midzone:abc"], "bad share 'abc' for midzone in 'midzone:abc': use NAME:SHARE, e.g. midzone:0.6."),
    (
        ["--mix", "midzone:0.5,"],
        "empty entry in mix 'midzone:0.5,': use NAME:SHARE,NAME:SHARE, e.g. midzone:0.6,random:0.4.",
    ),
    (["--mix", "midzone:-0.5,random:1.5"], "share of midzone in 'midzone:-0.5,random:1.5' must be positive."),
    (["--mix", "midzone:0,random:1"], "share of midzone in 'midzone:0,random:1' must be positive."),
    (["--mix", "midzone:0.5,midzone:0.5"], "strategy midzone appears twice in 'midzone:0.5,midzone:0.5'."),
    (["--mix", ",,"], "empty entry in mix ',,': use NAME:SHARE,NAME:SHARE, e.g. midzone:0.6,random:0.4."),
    (
        ["--mix", "hard:1"],
        "unknown strategy 'hard' in 'hard:1': use one of random, in-batch, hardest, semihard, "
        "midzone, category, category-discrepant, attribute-mismatch, soft, semantic, verified, kept-mismatch, error-targeted.",
    ),
    (
        ["--strategy", "midzone", "--delta-lo", "0.3", "--delta-hi", "0.1"],
        "--delta-lo (0.3) is above --delta-hi (0.1); swap them.",
    ),
    (
        ["--strategy", "soft", "--soft-lo", "0.8", "--soft-hi", "0.1"],
        "--soft-lo (0.8) is above --soft-hi (0.1); swap them.",
    ),
    (
        ["--strategy", "hardest", "--range-min", "50", "--range-max", "10"],
        "--range-max (10) must be above --range-min (50).",
    ),
    (
        ["--strategy", "midzone", "--category-shares", "0.5,x"],
        "--category-shares '0.5,x': use comma-separated numbers, e.g. 0.7,0.2,0.1.",
    ),
]


@pytest.mark.parametrize("args,message", BAD_NEGATIVES, ids=[" ".join(a) for a, _ in BAD_NEGATIVES])
def test_bad_negatives_options(work16, tmp_path, args, message):
    out_dir = tmp_path / "negs"
    out = cli_error(["negatives", "--work", work16 / "w", "--out", out_dir / "n.parquet", *args], code=2)
    assert out == "Error: " + message.format(g=work16 / "w" / "gallery.train.parquet")
    assert not out_dir.exists()


def test_empty_triplets_split(work16, tmp_path):
    work = _copy(work16 / "w", tmp_path / "w")
    t = pq.read_table(work / "triplets.train.parquet")
    pq.write_table(t.slice(0, 0).replace_schema_metadata(t.schema.metadata), work / "triplets.train.parquet")
    msg = (
        f"Error: {work / 'triplets.train.parquet'}: no queries (0 rows). Re-embed the split or choose another "
        f"with --split."
    )
    assert (
        cli_error(["negatives", "--work", work, "--strategy", "midzone", "--out", tmp_path / "n" / "n.parquet"]) == msg
    )
    assert cli_error(["--work", work, "--out", tmp_path / "run", "-q"], app=train_app) == msg
    assert not (tmp_path / "n").exists() and not (tmp_path / "run").exists()


def test_missing_split_for_negatives(work16, tmp_path):
    out = cli_error(
        [
            "negatives",
            "--work",
            work16 / "w",
            "--split",
            "val",
            "--strategy",
            "midzone",
            "--out",
            tmp_path / "n" / "n.parquet",
        ]
    )
    assert out == (
        f"Error: {work16 / 'w' / 'gallery.val.parquet'}: file not found; splits in {work16 / 'w'}: train. "
        f"Pass one with --split."
    )
    assert not (tmp_path / "n").exists()


def test_negatives_from_another_workspace(work16, tmp_path):
    w, negs = work16 / "w", work16 / "other.parquet"
    theirs, ours = pq.read_metadata(negs).metadata, Workspace(w).split_hash("train")
    their_hash = json.loads(theirs[b"cir_mine"])["data_hash"]
    msg = (
        f"Error: {negs}: mined from another workspace (split 'train' data hash {their_hash}, {w} has {ours}). "
        f"Re-mine it with `cir-mine negatives --work {w} --split train`."
    )
    assert cli_error(["--work", w, "--negatives", negs, "--out", tmp_path / "run", "-q"], app=train_app) == msg
    assert cli_error(["stats", negs, "--work", w]) == msg
    assert cli_error(["report", negs, "--work", w, "--out", tmp_path / "r.html"]) == msg
    assert listing(tmp_path) == []  # no run directory, no report


@pytest.mark.parametrize("kind", ["no-metadata", "missing-column", "wrong-type"])
def test_wrong_schema_negatives(work16, tmp_path, kind):
    t = pq.read_table(work16 / "w.parquet")
    bad = tmp_path / "bad.parquet"
    if kind == "no-metadata":
        pq.write_table(pa.table({"query_id": ["a"]}), bad)
        msg = f"Error: {bad}: not a cir-mine negatives table (no 'cir_mine' metadata). Mine one with `cir-mine negatives`."
    elif kind == "missing-column":
        pq.write_table(t.drop(["delta"]), bad)
        msg = (
            f"Error: {bad}: missing column 'delta' (float); a negatives table needs the columns query_id, ref_id, "
            f"target_id, neg_id, neg_category, strategy, rank, score, target_score, delta, round, category_match, "
            f"attr_overlap, seed. See docs/formats.md."
        )
    else:
        pq.write_table(t.set_column(t.schema.get_field_index("rank"), "rank", t["rank"].cast(pa.string())), bad)
        msg = f"Error: {bad}: column 'rank' has type string, expected int32. See docs/formats.md."
    assert (
        cli_error(["--work", work16 / "w", "--negatives", bad, "--out", tmp_path / "run", "-q"], app=train_app) == msg
    )
    assert cli_error(["stats", bad]) == msg
    assert not (tmp_path / "run").exists()


def test_every_test_docs_reliability_names_exists():
    """Each row of docs/reliability.md names tests that exist (a renamed or dropped test breaks its row)."""
    import re

    repo = Path(__file__).resolve().parents[1]
    named = set(re.findall(r"\btest_[a-z0-9_]+", (repo / "docs" / "reliability.md").read_text()))
    files = {p.stem for p in (repo / "tests").glob("test_*.py")}
    defined = {n for p in (repo / "tests").glob("*.py") for n in re.findall(r"def (test_[a-z0-9_]+)", p.read_text())}
    assert sorted(named - defined - files) == []
