"""Outputs never overwrite inputs, no false success, bounded external input, data identity, no broken
workspace, no tracebacks (docs/reliability.md, "Outputs and inputs" to "Messages").

Every failing command is checked for its exact text and exit code, that it left nothing behind and
that every input is byte-identical afterwards (tests.fixtures.snapshot).
"""

import errno
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cir_mine.cli import mine_app, train_app
from cir_mine.data.synthetic import SynthConfig, generate
from cir_mine.data.workspace import Workspace
from tests.fixtures import snapshot, tiny_synth, tree

runner = CliRunner()
NEGS = ["--strategy", "midzone", "-k", "4", "-q", "--device", "cpu"]
TRAIN = ["--epochs", "1", "--batch-size", "32", "-q"]


def run(args, app=mine_app):
    return runner.invoke(app, [str(a) for a in args])


def error(args, code, app=mine_app) -> str:
    """Run a command that must fail: one `Error:` line, no traceback, exit ``code``; returns the line."""
    r = run(args, app)
    assert r.exit_code == code, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    out = r.output.strip()
    assert out.startswith("Error: ") and "Traceback" not in out and len(out.splitlines()) == 1, out
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """W (train, d=16), W2 (another world, same d), NEGS mined on W, RUN trained on W."""
    root = tmp_path_factory.mktemp("rel-out")
    generate(SynthConfig(n_gallery=300, n_triplets=60, dim=16, seed=3), root / "W")
    generate(SynthConfig(n_gallery=300, n_triplets=60, dim=16, seed=4), root / "W2")
    assert run(["negatives", "--work", root / "W", "--out", root / "negs.parquet", *NEGS]).exit_code == 0
    r = run(["--work", root / "W2", "--out", root / "run2", *TRAIN], train_app)
    assert r.exit_code == 0, r.output
    return root


@pytest.fixture
def ws(base, tmp_path):
    """A private copy of the shared inputs: tmp/W, tmp/W2, tmp/negs.parquet, tmp/run2."""
    for name in ("W", "W2", "run2"):
        shutil.copytree(base / name, tmp_path / name)
    shutil.copy(base / "negs.parquet", tmp_path / "negs.parquet")
    return tmp_path


def unchanged(fn, *inputs):
    """Run ``fn`` and assert every file under ``inputs`` is byte-identical afterwards."""
    before = snapshot(*inputs)
    out = fn()
    assert snapshot(*inputs) == before
    return out


# ------------------------------------------------------------------------------ outputs over inputs

WRITERS = {
    "negatives": lambda t, out: ["negatives", "--work", t / "W", "--out", out, *NEGS],
    "positives": lambda t, out: ["positives", "--work", t / "W", "--out", out, "--dup-threshold", "1.01"],
    "report": lambda t, out: ["report", t / "negs.parquet", "--work", t / "W", "--out", out, "--sheets", "0"],
    "inspect": lambda t, out: ["inspect", t / "negs.parquet", "--work", t / "W", "--out", out, "--sample", "1"],
}


@pytest.mark.parametrize("cmd", sorted(WRITERS))
@pytest.mark.parametrize("name", ["gallery.train.parquet", "triplets.train.parquet", "manifest.json"])
def test_out_onto_a_workspace_file_is_refused(ws, cmd, name):
    target = ws / "W" / name
    out = unchanged(lambda: error(WRITERS[cmd](ws, target), 2), ws)
    assert out == (
        f"Error: --out {target}: is a file of the workspace {ws / 'W'}. Choose another --out; a "
        f"workspace's files are written only by synth, embed and index."
    )


def test_out_through_a_symlink_or_hard_link_is_refused(ws):
    link = ws / "link.parquet"
    link.symlink_to(ws / "W" / "gallery.train.parquet")
    out = unchanged(lambda: error(WRITERS["negatives"](ws, link), 2), ws)
    assert out.startswith(f"Error: --out {link}: is a file of the workspace ")
    hard = ws / "hard.html"
    os.link(ws / "negs.parquet", hard)
    out = unchanged(lambda: error(WRITERS["report"](ws, hard), 2), ws)
    assert out == (
        f"Error: --out {hard}: is an input of this command ({ws / 'negs.parquet'}). Choose another "
        f"--out; outputs never replace inputs."
    )


@pytest.mark.parametrize("cmd", ["report", "inspect"])
def test_out_onto_an_input_table_is_refused(ws, cmd):
    out = unchanged(lambda: error(WRITERS[cmd](ws, ws / "negs.parquet"), 2), ws)
    assert out == (
        f"Error: --out {ws / 'negs.parquet'}: is an input of this command ({ws / 'negs.parquet'}). "
        f"Choose another --out; outputs never replace inputs."
    )


@pytest.mark.parametrize("cmd", sorted(WRITERS))
def test_existing_output_needs_overwrite(ws, cmd):
    out = ws / f"out.{'png' if cmd == 'inspect' else 'html' if cmd == 'report' else 'parquet'}"
    out.write_bytes(b"keep me")
    msg = unchanged(lambda: error(WRITERS[cmd](ws, out), 2), ws)
    assert msg == f"Error: --out {out}: already exists. Pass --overwrite to replace it, or choose another --out."
    r = unchanged(lambda: run([*WRITERS[cmd](ws, out), "--overwrite"]), ws / "W", ws / "negs.parquet")
    assert r.exit_code == 0, r.output
    assert out.read_bytes() != b"keep me"


def test_train_refuses_an_existing_run_and_a_workspace(ws):
    msg = unchanged(lambda: error(["--work", ws / "W2", "--out", ws / "run2", *TRAIN], 2, train_app), ws)
    assert msg == (
        f"Error: {ws / 'run2'} already holds a run. Pass --resume {ws / 'run2'} to continue it, "
        f"--overwrite to replace it, or choose another --out."
    )
    msg = unchanged(lambda: error(["--work", ws / "W2", "--out", ws / "W", *TRAIN], 2, train_app), ws)
    assert msg == f"Error: --out {ws / 'W'}: is a workspace. Choose another --out; a run never writes into a workspace."
    msg = unchanged(lambda: error(["--work", ws / "W2", "--out", ws / "W2", *TRAIN], 2, train_app), ws)
    assert msg == f"Error: --out {ws / 'W2'}: is an input of this command ({ws / 'W2'}). Choose another --out."
    r = unchanged(lambda: run(["--work", ws / "W2", "--out", ws / "run2", *TRAIN, "--overwrite"], train_app), ws / "W2")
    assert r.exit_code == 0, r.output


def test_synth_embed_and_features_refuse_an_existing_split(ws):
    msg = unchanged(
        lambda: error(
            tiny_synth(ws / "W", "--seed", "3"),
            2,
        ),
        ws,
    )
    assert msg == (
        f"Error: --out {ws / 'W'}: split 'train' exists (gallery.train.parquet). Pass --overwrite to "
        f"replace it, or choose another --split or --out."
    )
    feats = ws / "f.npy"
    np.save(feats, np.eye(16, dtype=np.float32))
    (ws / "ids.txt").write_text("".join(f"i{j}\n" for j in range(16)))
    msg = unchanged(
        lambda: error(
            [
                "index",
                "--work",
                ws / "W",
                "--from-features",
                feats,
                "--ids",
                ws / "ids.txt",
                "--encoder-name",
                "synthetic",
            ],
            2,
        ),
        ws,
    )
    assert msg == (
        f"Error: --work {ws / 'W'}: split 'train' exists (gallery.train.parquet). Pass --overwrite to "
        f"replace it, or choose another --split or --work."
    )


def test_features_are_validated_before_the_gallery_is_replaced(ws):
    w = ws / "W"
    emb = np.eye(16, dtype=np.float32)
    np.save(ws / "f.npy", emb)
    (ws / "dup.txt").write_text("".join(f"i{j % 15}\n" for j in range(16)))
    msg = unchanged(
        lambda: error(
            ["index", "--work", w, "--from-features", ws / "f.npy", "--ids", ws / "dup.txt", "--overwrite"], 1
        ),
        ws,
    )
    assert msg == (
        f"Error: {ws / 'dup.txt'}: image id 'i0' appears twice. Each image needs one feature row; drop the duplicates."
    )
    np.save(ws / "f8.npy", np.eye(8, 8, dtype=np.float32))
    (ws / "ids8.txt").write_text("".join(f"i{j}\n" for j in range(8)))
    msg = unchanged(
        lambda: error(
            ["index", "--work", w, "--from-features", ws / "f8.npy", "--ids", ws / "ids8.txt", "--overwrite"], 1
        ),
        ws,
    )
    assert msg == (
        f"Error: {ws / 'f8.npy'}: features have d=8 but {w / 'triplets.train.parquet'} has d=16. Import "
        f"features of the workspace's encoder, or use another --work."
    )
    msg = unchanged(
        lambda: error(["index", "--work", w, "--from-features", w / "gallery.train.parquet", "--overwrite"], 2), ws
    )
    assert msg == (
        f"Error: {w / 'gallery.train.parquet'}: is the file this command replaces "
        f"({w / 'gallery.train.parquet'}). Copy it elsewhere and import the copy."
    )


@pytest.mark.parametrize(
    "sql",
    [
        "COPY (SELECT 1 AS a) TO 'W/gallery.train.parquet' (FORMAT parquet)",
        "COPY (SELECT 1 AS a) TO 'W/gallery.train.parquet' (FORMAT parquet, USE_TMP_FILE false)",
        "ATTACH 'W/new.db'",
        "EXPORT DATABASE 'W/export'",
        "SELECT * FROM read_csv('W/manifest.json')",
        "INSTALL httpfs",
        "SET enable_external_access = true",
    ],
)
def test_sql_is_read_only(ws, sql):
    sql = sql.replace("W/", f"{ws / 'W'}/")
    layout = tree(ws)
    out = unchanged(lambda: error(["sql", sql, ws / "negs.parquet", "--work", ws / "W"], 1), ws)
    assert out.startswith("Error: SQL: ") and out.endswith("See docs/queries.md for examples.")
    assert tree(ws) == layout  # nothing new appeared (no database, no export)
    # the views still answer
    r = run(
        [
            "sql",
            "SELECT count(*) AS n FROM negs JOIN gallery ON neg_id = image_id",
            ws / "negs.parquet",
            "--work",
            ws / "W",
            "-f",
            "csv",
        ]
    )
    assert r.exit_code == 0 and r.output.splitlines()[1] == str(pq.read_metadata(ws / "negs.parquet").num_rows)


def test_sql_empty_query(ws):
    assert (
        error(["sql", "  ", ws / "negs.parquet"], 2)
        == "Error: SQL: the query is empty. Pass a statement, e.g. 'SELECT count(*) FROM negs'."
    )


# ------------------------------------------------------------------------------ false success


def test_diverging_training_fails_naming_the_epoch_and_leaves_nothing(ws):
    run_dir = ws / "run"
    msg = unchanged(
        lambda: error(["--work", ws / "W", "--out", run_dir, *TRAIN, "--lr", "1e12"], 1, train_app), ws / "W"
    )
    assert msg.startswith(f"Error: {run_dir}: training diverged at epoch 1, step ") and msg.endswith(
        "Lower --lr (1e+12) or raise --temperature (0.05); the run failed and reports no metrics."
    )
    assert not run_dir.exists()


def test_metrics_rank_nan_last():
    from cir_mine.train.metrics import recalls, target_ranks

    g = np.eye(4, dtype=np.float32)
    nan_q = np.full((3, 4), np.nan, np.float32)
    assert target_ranks(nan_q, g, np.array([0, 1, 2])).tolist() == [3, 3, 3]
    assert recalls(target_ranks(nan_q, g, np.array([0, 1, 2])), [1, 3])["R@1"] == 0.0
    g_nan = g.copy()
    g_nan[3] = np.nan  # a NaN candidate never outranks the target
    assert target_ranks(np.eye(4, dtype=np.float32)[:3], g_nan, np.array([0, 1, 2]), chunk=2).tolist() == [0, 0, 0]


def test_metrics_files_are_strict_json(tmp_path):
    from cir_mine.data.io import write_json_atomic
    from cir_mine.train.history import write_history

    write_history(tmp_path / "m.jsonl", [{"epoch": 1, "loss": 0.5, "Rs@1": float("nan")}])
    write_json_atomic(tmp_path / "m.json", {"R@10": float("inf"), "per": [float("nan")]})
    strict = lambda s: json.loads(s, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert strict((tmp_path / "m.jsonl").read_text()) == {"epoch": 1, "loss": 0.5, "Rs@1": None}
    assert strict((tmp_path / "m.json").read_text()) == {"R@10": None, "per": [None]}


BAD_VALUES = [
    (
        ["negatives", "--work", "{W}", "--out", "{T}/n.parquet", "--mix", "midzone:inf"],
        "Error: share of midzone in 'midzone:inf' must be a finite number.",
    ),
    (
        [
            "negatives",
            "--work",
            "{W}",
            "--out",
            "{T}/n.parquet",
            "--strategy",
            "category",
            "--category-shares",
            "nan,1,1",
        ],
        "Error: --category-shares nan,1.0,1.0: must be a finite number.",
    ),
    (
        ["negatives", "--work", "{W}", "--out", "{T}/n.parquet", "--strategy", "midzone", "--delta-lo", "nan"],
        "Error: --delta-lo nan: must be a finite number.",
    ),
    (
        ["negatives", "--work", "{W}", "--out", "{T}/n.parquet", "--strategy", "midzone", "--dup-threshold", "nan"],
        "Error: --dup-threshold nan: must be a finite number.",
    ),
    (
        ["negatives", "--work", "{W}", "--out", "{T}/n.parquet", "--strategy", "midzone", "--seed", str(2**64)],
        f"Error: --seed {2**64}: must be in 0..{2**64 - 1} (a 64-bit unsigned seed).",
    ),
    (
        ["negatives", "--work", "{W}", "--out", "{T}/n.parquet", "--strategy", "midzone", "--seed", "-1"],
        f"Error: --seed -1: must be in 0..{2**64 - 1} (a 64-bit unsigned seed).",
    ),
    (["train", "--work", "{W}", "--out", "{T}/run", "--lr", "nan"], "Error: --lr nan: must be a finite number."),
    (["train", "--work", "{W}", "--out", "{T}/run", "--lr", "0"], "Error: --lr 0: must be in (0, inf]."),
    (
        ["train", "--work", "{W}", "--out", "{T}/run", "--temperature", "nan"],
        "Error: --temperature nan: must be a finite number.",
    ),
    (["train", "--work", "{W}", "--out", "{T}/run", "--dropout", "2"], "Error: --dropout 2: must be in [0, 1)."),
    (
        ["train", "--work", "{W}", "--out", "{T}/run", "--threads", "-1"],
        "Error: --threads -1: must be >= 0 (0: torch's default).",
    ),
    (
        ["train", "--work", "{W}", "--out", "{T}/run", "--seed", str(2**70)],
        f"Error: --seed {2**70}: must be in 0..{2**64 - 1} (a 64-bit unsigned seed).",
    ),
    (
        ["synth", "--out", "{T}/s", "--n-gallery", "300", "--n-triplets", "60", "--item-noise", "nan"],
        "Error: --item-noise nan: must be a finite number.",
    ),
    (
        ["synth", "--out", "{T}/s", "--n-gallery", "300", "--n-triplets", "60", "--unmentioned-change", "1.5"],
        "Error: --unmentioned-change 1.5: must be in [0, 1].",
    ),
    (
        ["positives", "--work", "{W}", "--out", "{T}/p.parquet", "--dup-threshold", "nan"],
        "Error: --dup-threshold nan: must be a finite number.",
    ),
    (
        [
            "positives",
            "--work",
            "{W}",
            "--out",
            "{T}/p.parquet",
            "--captioner",
            "command",
            "--command",
            "cat",
            "--command-timeout",
            "inf",
        ],
        "Error: --command-timeout inf: must be a finite number.",
    ),
    (["demo", "--out", "{T}/demo", "--epochs", "-1"], "Error: --epochs must be >= 0."),
]


@pytest.mark.parametrize("args, message", BAD_VALUES, ids=[" ".join(a[:1] + a[5:7]) for a, _ in BAD_VALUES])
def test_bad_option_values_are_refused_up_front(ws, tmp_path, args, message):
    args = [a.replace("{W}", str(ws / "W")).replace("{T}", str(tmp_path / "out")) for a in args]
    app = train_app if args[0] == "train" else mine_app
    before = tree(tmp_path)
    got = unchanged(lambda: error(args[1:] if args[0] == "train" else args, 2, app), ws / "W")
    assert got == message
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------------ lock (CLI)


@pytest.mark.parametrize("content", ["[1, 2]", '{"pid": "x"}'])
def test_malformed_lock_file_is_an_error(ws, content):
    lock = ws / "W" / ".cir-mine.lock"
    lock.write_text(content)
    msg = unchanged(lambda: error(["index", "--work", ws / "W"], 1), ws)
    assert msg == (
        f"Error: {lock}: not a cir-mine lock file (expected a JSON object with an integer pid, found "
        f"{content!r}). Delete it if no cir-mine job is running."
    )


# ------------------------------------------------------------------------------ bounded external input


@pytest.mark.parametrize(
    "command, extra, message",
    [
        ("yes garbage", [], "printed more than {n} lines for {n} pairs; it must print one JSON line per input line."),
        (
            f"{sys.executable} -c \"import sys; sys.stdout.write('x' * 200000)\"",
            [],
            "printed a line longer than 65536 bytes.",
        ),
        (
            "sleep 30",
            ["--command-timeout", "1"],
            "gave no complete answer within 1 s and was stopped; raise --command-timeout or check the command.",
        ),
    ],
)
def test_captioner_output_is_bounded(ws, command, extra, message):
    import time

    out = ws / "p.parquet"
    t0 = time.monotonic()
    msg = unchanged(
        lambda: error(
            [
                "positives",
                "--work",
                ws / "W",
                "--out",
                out,
                "--dup-threshold",
                "1.01",
                "--captioner",
                "command",
                "--command",
                command,
                *extra,
            ],
            1,
        ),
        ws,
    )
    assert time.monotonic() - t0 < 20
    prefix = f"Error: captioner command {command!r} "
    assert msg.startswith(prefix), msg
    n = msg[len(prefix) :].split(" ")[3] if "lines for" in msg else "0"
    assert msg[len(prefix) :] == message.format(n=n)
    assert not out.exists() and not list(ws.glob(".p.parquet*"))


# ------------------------------------------------------------------------------ identity of data


def test_manifest_hash_is_the_content(tmp_path):
    cfg = SynthConfig(n_gallery=300, n_triplets=60, dim=16, seed=3)
    generate(cfg, tmp_path / "a")
    generate(cfg, tmp_path / "b")
    h = Workspace(tmp_path / "a").manifest_hash()
    assert Workspace(tmp_path / "b").manifest_hash() == h  # byte-identical data, another time
    generate(cfg, tmp_path / "a")  # re-synth in place
    assert Workspace(tmp_path / "a").manifest_hash() == h
    g = Workspace(tmp_path / "a").gallery("train")
    np.save(tmp_path / "f.npy", g.embeddings[::-1].copy())  # the same ids, other features
    (tmp_path / "ids.txt").write_text("".join(f"{i}\t{c}\n" for i, c in zip(g.image_ids, g.categories)))
    r = run(
        [
            "index",
            "--work",
            tmp_path / "a",
            "--from-features",
            tmp_path / "f.npy",
            "--ids",
            tmp_path / "ids.txt",
            "--encoder-name",
            "synthetic",
            "--overwrite",
        ]
    )
    assert r.exit_code == 0, r.output
    assert Workspace(tmp_path / "a").manifest_hash() != h


def test_foreign_inputs_are_refused(ws):
    w, w2 = ws / "W", ws / "W2"
    ha, hb = Workspace(w).manifest_hash(), Workspace(w2).manifest_hash()
    # generated triplets of another workspace
    assert run(["positives", "--work", w2, "--out", ws / "p2.parquet", "--dup-threshold", "1.01"]).exit_code == 0
    msg = unchanged(
        lambda: error(["--work", w, "--out", ws / "run", *TRAIN, "--extra-triplets", ws / "p2.parquet"], 1, train_app),
        ws,
    )
    assert msg == (
        f"Error: {ws / 'p2.parquet'}: generated from another workspace (manifest hash {hb}, {w} has {ha}). "
        f"Generate them from this one: cir-mine positives --work {w}."
    )
    assert not (ws / "run").exists()
    # a checkpoint trained on another workspace
    ckpt = ws / "run2" / "ckpt.pt"
    msg = unchanged(
        lambda: error(["negatives", "--work", w, "--out", ws / "n.parquet", *NEGS, "--checkpoint", ckpt], 1), ws
    )
    assert msg == (
        f"Error: {ckpt}: trained on another workspace (manifest hash {hb}, {w} has {ha}). Use a checkpoint "
        f"trained on this workspace."
    )
    assert not (ws / "n.parquet").exists()
    # a negatives table whose query ids are not this workspace's (footer copied, ids changed)
    t = pq.read_table(ws / "negs.parquet")
    ids = pa.array([f"x{q}" for q in t.column("query_id").to_pylist()])
    pq.write_table(t.set_column(0, "query_id", ids), ws / "foreign.parquet")
    msg = unchanged(
        lambda: error(["--work", w, "--out", ws / "run", *TRAIN, "--negatives", ws / "foreign.parquet"], 1, train_app),
        ws,
    )
    assert msg.startswith(
        f"Error: {ws / 'foreign.parquet'}: 60 of its 60 query ids are not queries of "
        f"{w / 'triplets.train.parquet'} (first: x"
    )
    assert msg.endswith(f"Mine the table from this split: cir-mine negatives --work {w} --split train.")
    assert not (ws / "run").exists()


# ------------------------------------------------------------------------------ no broken workspace


def test_synth_of_another_dimension_is_refused(ws):
    msg = unchanged(
        lambda: error(
            [
                "synth",
                "--out",
                ws / "W",
                "--split",
                "val",
                "--n-gallery",
                "300",
                "--n-triplets",
                "60",
                "--dim",
                "32",
                "-q",
            ],
            2,
        ),
        ws,
    )
    assert msg == (
        f"Error: --out {ws / 'W'}: gallery.train.parquet has d=16; a 'val' split with d=32 would make "
        f"the workspace unreadable. Use the same encoder (d=16), or write to another --out."
    )


def test_index_spec_is_checked_before_writing(ws):
    before = tree(ws / "W")
    msg = unchanged(lambda: error(["index", "--work", ws / "W", "--index", "IVF99999,Flat"], 2), ws)
    assert msg == (
        "Error: --index 'IVF99999,Flat': 'IVF99999,Flat' has 99999 lists but the gallery has 300 images; "
        "FAISS needs at least one training vector per list. Use --index flat, or IVF7,Flat."
    )
    assert tree(ws / "W") == before


def test_embed_with_a_bad_index_writes_nothing(tmp_path):
    from tests.fixtures import make_fashioniq, write_tiny_clip_config

    root, work = make_fashioniq(tmp_path / "fiq"), tmp_path / "w"
    msg = unchanged(
        lambda: error(
            [
                "embed",
                "--dataset",
                "fashioniq",
                "--root",
                root,
                "--work",
                work,
                "--model",
                write_tiny_clip_config(tmp_path / "m"),
                "--device",
                "cpu",
                "--workers",
                "0",
                "--index",
                "IVF99999,Flat",
                "-q",
            ],
            2,
        ),
        root,
    )
    assert msg.startswith("Error: --index 'IVF99999,Flat': 'IVF99999,Flat' has 99999 lists but the gallery has 18 ")
    assert not work.exists()


def test_demo_with_bad_epochs_writes_nothing(tmp_path):
    assert error(["demo", "--out", tmp_path / "d", "--epochs", "-1"], 2) == "Error: --epochs must be >= 0."
    assert not (tmp_path / "d").exists()


def _full_disk(monkeypatch):
    """Every fsync of an atomic write fails as on a full disk."""
    import cir_mine.data.atomic as atomic

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", fsync)


def _read_only(monkeypatch):
    """Every temp file of an atomic write fails as in a read-only folder."""
    import cir_mine.data.atomic as atomic

    def mkstemp(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", mkstemp)


FULL = {
    "synth": (
        lambda t: tiny_synth(t / "W", "--split", "val"),
        lambda t: t / "W" / "gallery.val.parquet",
    ),
    "negatives": (
        lambda t: ["negatives", "--work", t / "W", "--out", t / "o" / "n.parquet", *NEGS],
        lambda t: t / "o" / "n.parquet",
    ),
    "positives": (
        lambda t: ["positives", "--work", t / "W", "--out", t / "o" / "p.parquet", "--dup-threshold", "1.01"],
        lambda t: t / "o" / "p.parquet",
    ),
    "report": (
        lambda t: ["report", t / "negs.parquet", "--work", t / "W", "--out", t / "o" / "r.html", "--sheets", "0"],
        lambda t: t / "o" / "r.html",
    ),
    "inspect": (
        lambda t: ["inspect", t / "negs.parquet", "--work", t / "W", "--out", t / "o" / "s.png", "--sample", "1"],
        lambda t: t / "o" / "s.png",
    ),
    "index": (lambda t: ["index", "--work", t / "W"], lambda t: t / "W" / "index.train.faiss"),
    "index --from-features": (
        lambda t: [
            "index",
            "--work",
            t / "W",
            "--from-features",
            _features(t)[0],
            "--ids",
            t / "ids.txt",
            "--encoder-name",
            "synthetic",
            "--overwrite",
        ],
        lambda t: t / "W" / "gallery.train.parquet",
    ),
    "train": (
        lambda t: ["--work", t / "W", "--out", t / "o" / "run", *TRAIN],
        lambda t: t / "o" / "run" / "config.json",
    ),
    "embed": (
        lambda t: [
            "embed",
            "--dataset",
            "folder",
            "--root",
            _image_folder(t),
            "--work",
            t / "E",
            "--model",
            _tiny_clip(t),
            "--pretrained",
            "none",
            "--device",
            "cpu",
            "--workers",
            "0",
            "-q",
        ],
        lambda t: t / "E" / ".embed-train" / "plan.json",
    ),  # the resume plan is written first
}


def _image_folder(t: Path) -> Path:
    from tests.fixtures import make_folder

    return t / "imgs" if (t / "imgs").exists() else make_folder(t / "imgs", n_images=4)


def _tiny_clip(t: Path) -> Path:
    from tests.fixtures import write_tiny_clip_config

    return write_tiny_clip_config(t / "cfg")


@pytest.mark.parametrize("fault", ["full disk", "read-only"])
@pytest.mark.parametrize("cmd", sorted(FULL))
def test_full_disk_or_read_only_folder(ws, monkeypatch, cmd, fault):
    args, first = FULL[cmd]
    argv = args(ws)
    before, layout = snapshot(ws), tree(ws)
    (_full_disk if fault == "full disk" else _read_only)(monkeypatch)
    msg = error(argv, 1, train_app if cmd == "train" else mine_app)
    monkeypatch.undo()
    reason = "No space left on device" if fault == "full disk" else "Read-only file system"
    path, _, rest = msg[len("Error: ") :].partition(": cannot write (")
    assert rest == f"{reason}). Free some space, or choose a writable location.", msg
    if cmd != "train":
        assert path == str(first(ws))
    assert tree(ws) == layout and snapshot(ws) == before  # nothing left behind, inputs intact


# ------------------------------------------------------------------------------ messages


def test_out_is_a_folder_or_below_a_file(ws):
    msg = unchanged(lambda: error(["negatives", "--work", ws / "W", "--out", ws / "run2", *NEGS], 2), ws)
    assert msg == (
        f"Error: --out {ws / 'run2'}: is a folder; --out names the file to write (e.g. {ws / 'run2' / 'out.parquet'})."
    )
    below = ws / "negs.parquet" / "x.parquet"
    msg = unchanged(lambda: error(["negatives", "--work", ws / "W", "--out", below, *NEGS], 2), ws)
    assert msg == f"Error: --out {below}: {ws / 'negs.parquet'} is a file, not a folder. Choose another --out."
    msg = unchanged(lambda: error(["synth", "--out", ws / "negs.parquet", "-q"], 2), ws)
    assert msg == f"Error: --out {ws / 'negs.parquet'}: is a file, not a folder. Choose another --out."


def _rewrite(path: Path, column: str, values, type_=None):
    t = pq.read_table(path)
    i = t.schema.get_field_index(column)
    pq.write_table(
        t.set_column(
            i,
            t.schema.field(i).with_type(type_ or t.schema.field(i).type),
            pa.array(values, type_ or t.schema.field(i).type),
        ),
        path,
    )


def test_nulls_in_tables(ws):
    g = ws / "W" / "gallery.train.parquet"
    cats = pq.read_table(g).column("category").to_pylist()
    ids = pq.read_table(g).column("image_id").to_pylist()
    _rewrite(g, "category", [None] + cats[1:])
    assert error(["info", "--work", ws / "W"], 1) == (
        f"Error: {g}: column 'category' has 1 null value(s) (first: image '{ids[0]}'). Use '' for none, or drop "
        f"those rows."
    )
    _rewrite(g, "category", cats)
    attrs = pq.read_table(g).column("attributes").to_pylist()
    _rewrite(g, "attributes", [attrs[0] + [None]] + attrs[1:])
    assert error(["info", "--work", ws / "W"], 1) == (
        f"Error: {g}: column 'attributes' of image '{ids[0]}' holds a null; each attribute is a 'group:value' "
        f"string. Drop the nulls."
    )


def test_manifest_dim_not_a_number(ws):
    m = ws / "W" / "manifest.json"
    m.write_text(json.dumps({**json.loads(m.read_text()), "dim": "sixty-four"}))
    assert error(["info", "--work", ws / "W"], 1) == (
        f"Error: {m}: 'dim' must be a positive integer, found 'sixty-four'. Repair the manifest, or delete it to "
        f"derive one from the tables."
    )


def test_malformed_index_meta(ws):
    assert run(["index", "--work", ws / "W"]).exit_code == 0
    meta = ws / "W" / "index.train.faiss.json"
    meta.write_text("{not json")
    msg = unchanged(lambda: error(["positives", "--work", ws / "W", "--out", ws / "p.parquet"], 1), ws)
    assert msg.startswith(f"Error: {meta}: malformed index metadata (") and msg.endswith(
        "Rebuild the index with cir-mine index."
    )


def test_eval_work_of_another_dimension(ws, tmp_path):
    generate(SynthConfig(n_gallery=300, n_triplets=60, dim=8, seed=1, split="val"), tmp_path / "E")
    msg = unchanged(
        lambda: error(["--work", ws / "W", "--out", ws / "run", *TRAIN, "--eval-work", tmp_path / "E"], 1, train_app),
        ws,
        tmp_path / "E",
    )
    assert msg == (
        f"Error: {tmp_path / 'E' / 'gallery.val.parquet'}: the evaluation workspace has d=8 but {ws / 'W'} "
        f"has d=16. Evaluate on a workspace embedded with the same encoder."
    )
    assert not (ws / "run").exists()


def test_gallery_symlink_loop_and_stray_files(ws):
    g = ws / "W" / "gallery.train.parquet"
    stray = ws / "W" / "gallery.train copy.parquet"
    shutil.copy(g, stray)
    assert error(["info", "--work", ws / "W"], 1) == (
        f"Error: {stray}: not a split table (split names use letters, digits, '-' or '_'). Rename or move it out "
        f"of {ws / 'W'}."
    )
    stray.unlink()
    g.unlink()
    g.symlink_to(ws / "W" / "loop.parquet")
    (ws / "W" / "loop.parquet").symlink_to(g)
    assert error(["info", "--work", ws / "W"], 1) == f"Error: {g}: is a symlink loop. Point it at a real file."


def test_csv_with_a_utf8_bom(tmp_path):
    from tests.fixtures import make_folder

    root = make_folder(tmp_path / "f")
    csv = root / "triplets.csv"
    csv.write_bytes(b"\xef\xbb\xbf" + csv.read_bytes())
    r = run(["check", "--dataset", "folder", "--root", root])
    assert r.exit_code == 0, r.output
    assert "6 queries" in r.output


def test_resume_says_which_options_are_ignored(ws):
    r = run(["--resume", ws / "run2", "--lr", "0.5", "--epochs", "1", "-q"], train_app)
    assert r.exit_code == 0, r.output
    assert (
        f"warning: --resume {ws / 'run2'} continues with the run's own options; ignored: --lr 0.5 (the run's: 0.001)."
    ) in r.output


# ------------------------------------------------------------------------------ inputs unchanged


def _features(t: Path) -> list:
    g = Workspace(t / "W").gallery("train")
    np.save(t / "f.npy", g.embeddings[::-1].copy())
    (t / "ids.txt").write_text("".join(f"{i}\t{c}\n" for i, c in zip(g.image_ids, g.categories)))
    return [t / "f.npy", t / "ids.txt", t / "W" / "triplets.train.parquet"]


def _fiq(t: Path) -> list:
    from tests.fixtures import make_fashioniq, write_tiny_clip_config

    make_fashioniq(t / "fiq")
    write_tiny_clip_config(t / "m")
    return [t / "fiq", t / "m"]


# command -> (prepare(tmp) -> the inputs it reads, args(tmp), app)
EVERY_WRITER = {
    "synth": (
        lambda t: [t / "W" / "gallery.train.parquet", t / "W" / "triplets.train.parquet"],
        lambda t: tiny_synth(t / "W", "--split", "val"),
        mine_app,
    ),
    "embed": (
        _fiq,
        lambda t: [
            "embed",
            "--dataset",
            "fashioniq",
            "--root",
            t / "fiq",
            "--work",
            t / "E",
            "--model",
            t / "m" / "cir-tiny-clip.json",
            "--device",
            "cpu",
            "--workers",
            "0",
            "-q",
        ],
        mine_app,
    ),
    "index": (
        lambda t: [t / "W" / "gallery.train.parquet", t / "W" / "triplets.train.parquet"],
        lambda t: ["index", "--work", t / "W"],
        mine_app,
    ),
    "index --from-features": (
        _features,
        lambda t: [
            "index",
            "--work",
            t / "W",
            "--from-features",
            t / "f.npy",
            "--ids",
            t / "ids.txt",
            "--encoder-name",
            "synthetic",
            "--overwrite",
        ],
        mine_app,
    ),
    "negatives": (lambda t: [t / "W"], lambda t: WRITERS["negatives"](t, t / "o" / "n.parquet"), mine_app),
    "negatives --checkpoint": (
        lambda t: [t / "W", t / "run"],
        lambda t: [*WRITERS["negatives"](t, t / "o" / "n.parquet"), "--checkpoint", t / "run" / "ckpt.pt"],
        mine_app,
    ),
    "positives": (lambda t: [t / "W"], lambda t: WRITERS["positives"](t, t / "o" / "p.parquet"), mine_app),
    "report": (lambda t: [t / "W", t / "negs.parquet"], lambda t: WRITERS["report"](t, t / "o" / "r.html"), mine_app),
    "inspect": (lambda t: [t / "W", t / "negs.parquet"], lambda t: WRITERS["inspect"](t, t / "o" / "s.png"), mine_app),
    "cir-train": (
        lambda t: [t / "W", t / "negs.parquet"],
        lambda t: ["--work", t / "W", "--out", t / "o" / "run", "--negatives", t / "negs.parquet", *TRAIN],
        train_app,
    ),
    "cir-train --resume": (lambda t: [t / "W"], lambda t: ["--resume", t / "run", "-q"], train_app),
}


@pytest.mark.parametrize("cmd", sorted(EVERY_WRITER))
def test_every_writer_leaves_its_inputs_unchanged(ws, cmd):
    prepare, args, app = EVERY_WRITER[cmd]
    if cmd in ("negatives --checkpoint", "cir-train --resume"):
        assert run(["--work", ws / "W", "--out", ws / "run", *TRAIN, "--epochs", "1"], train_app).exit_code == 0
        if cmd == "cir-train --resume":  # continue for a second epoch
            ck = __import__("torch").load(ws / "run" / "ckpt.pt", weights_only=False)
            ck["train_config"]["epochs"] = 2
            __import__("torch").save(ck, ws / "run" / "ckpt.pt")
    inputs = prepare(ws)
    before = snapshot(*inputs)
    r = run(args(ws), app)
    assert r.exit_code == 0, r.output
    after = snapshot(*inputs)
    # a command that adds to a workspace (synth --split val) may add files, never change one
    assert {k: v for k, v in after.items() if k in before} == before
