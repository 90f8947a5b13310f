"""Bounded work and exact messages (docs/reliability.md, "Bounded work" and "Messages").

Each case checks the exact ``Error:`` line and exit code, that the inputs are byte-identical and that
nothing is left behind.
"""

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cir_mine.cli import mine_app
from cir_mine.data.errors import UsageError
from cir_mine.data.synthetic import SynthConfig, generate
from cir_mine.data.workspace import Workspace, read_metadata, write_table
from cir_mine.miner.core.mine import MineConfig
from tests.fixtures import make_fashioniq, snapshot, tree, write_png, write_tiny_clip_config

runner = CliRunner()
NEGS = ["--strategy", "midzone", "-k", "4", "-q", "--device", "cpu"]


def run(args):
    return runner.invoke(mine_app, [str(a) for a in args])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("messages")
    generate(SynthConfig(n_gallery=300, n_triplets=60, dim=16, seed=3), root / "W")
    assert run(["negatives", "--work", root / "W", "--out", root / "negs.parquet", *NEGS]).exit_code == 0
    return root


@pytest.fixture
def t(base, tmp_path):
    shutil.copytree(base / "W", tmp_path / "W")
    shutil.copy(base / "negs.parquet", tmp_path / "negs.parquet")
    return tmp_path


def refused(t, args, message, code):
    before, layout = snapshot(t), tree(t)
    r = run(args)
    assert r.exit_code == code, r.output
    assert r.output.strip() == f"Error: {message}", r.output
    assert snapshot(t) == before and tree(t) == layout


# ------------------------------------------------------------------------------------------ outputs


@pytest.mark.parametrize("name", ["gallery.train.parquet", "manifest.json"])
def test_export_onto_a_workspace_file_is_refused(t, name):
    out = t / "W" / name
    refused(
        t,
        ["export", t / "negs.parquet", "--format", "ntuple", "--work", t / "W", "--out", out, "--overwrite"],
        f"--out {out}: is a file of the workspace {t / 'W'}. Choose another --out; a workspace's files are "
        f"written only by synth, embed and index.",
        2,
    )


def test_a_long_legal_out_name_is_written(t):
    """A 250-byte name is legal; the temp and backup names built on it are shortened, not the output."""
    name = "n" * 242 + ".parquet"
    for args in (
        ["negatives", "--work", t / "W", "--out", t / "o" / name, *NEGS],
        ["negatives", "--work", t / "W", "--out", t / "o" / name, *NEGS, "--overwrite"],
        ["export", t / "negs.parquet", "--format", "ntuple", "--work", t / "W", "--out", t / "x" / name],
    ):
        r = run(args)
        assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (t / "o").iterdir()) == [name]
    assert sorted(p.name for p in (t / "x").iterdir()) == [name]


# ------------------------------------------------------------------------------------------ tables


def test_a_manifest_from_the_future_is_refused(t):
    m = t / "W" / "manifest.json"
    m.write_text(json.dumps({**json.loads(m.read_text()), "schema_version": 7}))
    refused(
        t,
        ["info", "--work", t / "W"],
        f"{m}: schema_version 7 is newer than this cir-mine reads (1). Upgrade cir-mine to read this workspace.",
        1,
    )
    m.write_text(json.dumps({**json.loads(m.read_text()), "schema_version": "one"}))
    refused(
        t,
        ["info", "--work", t / "W"],
        f"{m}: 'schema_version' must be a positive integer, found 'one'. Repair the manifest, or delete it to "
        f"derive one from the tables.",
        1,
    )


def _rewrite(path: Path, column: str, row: int, value) -> None:
    t = pq.read_table(path)
    vals = t.column(column).to_pylist()
    vals[row] = value
    write_table(
        t.set_column(t.schema.get_field_index(column), column, pa.array(vals, pa.string())), path, read_metadata(path)
    )


def test_a_query_whose_target_is_its_reference_is_refused(t):
    tp = t / "W" / "triplets.train.parquet"
    tr = Workspace(t / "W").triplets("train")
    _rewrite(tp, "target_id", 4, tr.ref_ids[4])
    refused(
        t,
        ["info", "--work", t / "W"],
        f"{tp}: 1 query(ies) name their reference as their target (first: query '{tr.query_ids[4]}', image "
        f"'{tr.ref_ids[4]}'); a query asks for another image. Drop those rows.",
        1,
    )


def test_empty_ids_are_refused(t):
    tp, gp = t / "W" / "triplets.train.parquet", t / "W" / "gallery.train.parquet"
    _rewrite(tp, "query_id", 2, " ")
    refused(
        t,
        ["info", "--work", t / "W"],
        f"{tp}: column 'query_id' has 1 empty id(s) (first: row 2). Every query needs an id; drop those rows or "
        f"name them.",
        1,
    )
    _rewrite(gp, "image_id", 9, "")
    r = run(["info", "--work", t / "W"])
    assert r.exit_code == 1 and r.output.strip() == (
        f"Error: {gp}: column 'image_id' has 1 empty id(s) (first: row 9). Every image needs an id; drop those rows "
        f"or name them."
    ), r.output


def test_mine_config_options_of_the_wrong_type_are_refused():
    for value in ("5", True, 5.0):
        with pytest.raises(UsageError) as e:
            MineConfig(strategy="random", k=value).validate()
        assert str(e.value) == f"k {value!r}: must be an integer." and e.value.params == ("k",)
    with pytest.raises(UsageError) as e:
        MineConfig.of(strategy="midzone", delta_lo="0.1").validate()
    assert str(e.value) == "delta_lo '0.1': must be a number."


# ------------------------------------------------------------------------------------------ datasets


def test_embed_warnings_name_the_image_without_nul_bytes(tmp_path, caplog):
    root = make_fashioniq(tmp_path / "fiq")
    bad = root / "images" / "B000000001.png"
    bad.write_bytes(b"not an image")
    model = write_tiny_clip_config(tmp_path / "cfg")
    with caplog.at_level(logging.WARNING):
        r = run(
            [
                "embed",
                "--dataset",
                "fashioniq",
                "--root",
                root,
                "--work",
                tmp_path / "E",
                "--model",
                model,
                "--device",
                "cpu",
                "--workers",
                "0",
                "-q",
            ]
        )
    assert r.exit_code == 0, r.output
    lines = [rec.getMessage() for rec in caplog.records if "skipped image" in rec.getMessage()]
    assert len(lines) == 1 and "\x00" not in lines[0], lines
    assert lines[0].startswith("skipped image B000000001 (images/B000000001.png): "), lines[0]


def _tar(path: Path, members: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def test_webdataset_shards_in_a_folder_named_with_double_colons(tmp_path):
    png = tmp_path / "a.png"
    write_png(png, (200, 10, 10))
    shards = tmp_path / "data::v2"
    _tar(shards / "00000.tar", {"k1.png": png.read_bytes(), "k2.png": png.read_bytes()})
    r = run(["check", "--dataset", "webdataset", "--root", shards / "00000.tar"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("webdataset train: 2 images (2 with image files,"), r.output


# ------------------------------------------------------------------------------------------ bounded work


def test_inspect_and_report_sample_counts_are_bounded(t):
    refused(
        t,
        ["inspect", t / "negs.parquet", "--work", t / "W", "--out", t / "s.png", "--sample", "100000"],
        "--sample 100000: a contact sheet draws at most 100 queries. Draw fewer, or several sheets (another seed).",
        2,
    )
    refused(
        t,
        ["report", t / "negs.parquet", "--work", t / "W", "--out", t / "r.html", "--sheets", "5000"],
        "--sheets 5000: a contact sheet draws at most 100 queries. Draw fewer, or several sheets (another seed).",
        2,
    )
    refused(
        t,
        [
            "inspect",
            t / "negs.parquet",
            "--work",
            t / "W",
            "--out",
            t / "s.png",
            "--sample",
            "2",
            "--max-negatives",
            "100000",
        ],
        "--max-negatives 100000: must be in 1..50.",
        2,
    )


def test_labels_of_any_length_draw_as_short_labels(t):
    """A 1 MB category: every label drawn on the sheets and plots is cut (drawing it took minutes)."""
    from cir_mine.miner.inspection.contact_sheet import pick_queries, render_sheet, sheet_rows
    from cir_mine.miner.inspection.report import plot_top_negatives
    from cir_mine.miner.core.tables import read_negatives

    huge = "x" * 1_000_000
    fig = plot_top_negatives([("n1", huge, 3, 2, 0.1)])
    assert max(len(lbl.get_text()) for lbl in fig.axes[0].get_yticklabels()) <= 48
    gp = t / "W" / "gallery.train.parquet"
    _rewrite(gp, "category", 0, huge)
    nt = read_negatives(t / "negs.parquet")
    ws = Workspace(t / "W")
    rows = sheet_rows(nt, ws, "train", pick_queries(nt, sample=3), None, 6)
    for row in rows:
        for tile in row.tiles:
            tile.category = huge
            tile.lines = [*tile.lines, huge]
    fig = render_sheet(rows, "", 6)
    texts = [x.get_text() for ax in fig.axes for x in ax.texts] + [x.get_text() for x in fig.texts]
    assert texts and max(map(len, texts)) <= 200


@pytest.mark.slow
def test_report_on_a_gallery_with_a_1mb_category(t):
    """The report finishes (it ran for over 12 minutes when labels were drawn whole)."""
    gp = t / "W" / "gallery.train.parquet"
    neg = pq.read_table(t / "negs.parquet").column("neg_id")[0].as_py()
    g = pq.read_table(gp)
    cats = g.column("category").to_pylist()
    cats = ["x" * 1_000_000 if i == neg else c for i, c in zip(g.column("image_id").to_pylist(), cats)]
    write_table(g.set_column(1, "category", pa.array(cats, pa.string())), gp, read_metadata(gp))
    r = run(["negatives", "--work", t / "W", "--out", t / "n2.parquet", *NEGS])
    assert r.exit_code == 0, r.output
    r = run(["report", t / "n2.parquet", "--work", t / "W", "--out", t / "r.html", "--sheets", "2"])
    assert r.exit_code == 0, r.output
    assert (t / "r.html").stat().st_size < 2_000_000
