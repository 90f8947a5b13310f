"""cir-mine negatives --query-emb and cir-mine export: equivalences, exact errors, safe writes."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cir_mine import Workspace, read_negatives
from cir_mine.cli import mine_app
from cir_mine.data.synthetic import SynthConfig, generate

runner = CliRunner()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    out = tmp_path_factory.mktemp("apicli")
    generate(SynthConfig(n_gallery=500, n_triplets=100, dim=16, seed=11), out / "work")
    return out / "work"


def mine(work, out, *extra):
    r = runner.invoke(
        mine_app,
        [
            "negatives",
            "--work",
            str(work),
            "--strategy",
            "hardest",
            "-k",
            "4",
            "--out",
            str(out),
            "--device",
            "cpu",
            "-q",
            *extra,
        ],
    )
    return r


# ------------------------------------------------------------------------------------------------
# --query-emb


def test_query_emb_of_the_zero_shot_queries_gives_the_zero_shot_table(work, tmp_path):
    g, t = Workspace(work).load("train")
    q = g.embeddings[g.rows(t.ref_ids.tolist(), t.categories.tolist())] + t.text_embeddings  # normalized on read
    np.save(tmp_path / "q.npy", q)
    assert mine(work, tmp_path / "zs.parquet").exit_code == 0
    r = mine(work, tmp_path / "own.parquet", "--query-emb", str(tmp_path / "q.npy"))
    assert r.exit_code == 0, r.output
    own, zs = read_negatives(tmp_path / "own.parquet"), read_negatives(tmp_path / "zs.parquet")
    assert own.table.equals(zs.table)
    assert own.meta["query_source"] == "provided" and own.config["query"] == "checkpoint"
    # another model's queries give another table
    rng = np.random.default_rng(0)
    np.save(tmp_path / "r.npy", rng.standard_normal(q.shape).astype(np.float32))
    assert mine(work, tmp_path / "rnd.parquet", "--query-emb", str(tmp_path / "r.npy")).exit_code == 0
    assert not read_negatives(tmp_path / "rnd.parquet").table.equals(zs.table)


def test_query_emb_errors(work, tmp_path):
    g, t = Workspace(work).load("train")
    good = np.ones((len(t), g.dim), np.float32)
    nan = good.copy()
    nan[7, 3] = np.nan
    zero = good.copy()
    zero[5] = 0
    arrays = {
        "short.npy": good[:10],
        "flat.npy": good[0],
        "int.npy": good.astype(np.int32),
        "nan.npy": nan,
        "zero.npy": zero,
        "obj.npy": None,
    }
    for name, a in arrays.items():
        if a is not None:
            np.save(tmp_path / name, a)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    fix = "Give float32[n_queries, d], one row per query in the triplets' row order."
    q7, q5 = t.query_ids[7], t.query_ids[5]
    expect = {
        "short.npy": f"shape (10, 16), expected (100, 16): one row per query of the split, in the gallery's dimension. {fix}",
        "flat.npy": f"shape (16,), expected (100, 16): one row per query of the split, in the gallery's dimension. {fix}",
        "int.npy": f"dtype int32, expected floating point (float32). {fix}",
        "nan.npy": f"1 row(s) with NaN or inf values (first: row 7, query {q7}). Re-encode those queries.",
        "zero.npy": f"1 all-zero row(s) (first: row 5, query {q5}); a query embedding needs a direction. Re-encode those queries.",
        "obj.npy": "not a readable .npy file (Object arrays cannot be loaded when allow_pickle=False). " + fix,
        "missing.npy": f"query embeddings not found. {fix}",
    }
    for name, text in expect.items():
        out = tmp_path / f"{name}.parquet"
        r = mine(work, out, "--query-emb", str(tmp_path / name))
        assert r.exit_code == 1, (name, r.output)
        assert r.output.strip() == f"Error: {tmp_path / name}: {text}"
        assert not out.exists()
    r = mine(work, tmp_path / "x.parquet", "--query-emb", str(tmp_path / "nan.npy"), "--checkpoint", "ckpt.pt")
    assert r.exit_code == 2 and r.output.strip() == "Error: give --checkpoint or --query-emb, not both."


# ------------------------------------------------------------------------------------------------
# export


@pytest.fixture(scope="module")
def negs(work, tmp_path_factory):
    out = tmp_path_factory.mktemp("negs") / "negs.parquet"
    r = runner.invoke(
        mine_app,
        [
            "negatives",
            "--work",
            str(work),
            "--mix",
            "midzone:0.5,hardest:0.5",
            "-k",
            "6",
            "--candidates",
            "8",
            "--no-deepen",
            "--out",
            str(out),
            "--device",
            "cpu",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    return out


def test_export_wide_is_the_grouped_table(negs, tmp_path):
    out = tmp_path / "wide.parquet"
    r = runner.invoke(mine_app, ["export", str(negs), "--format", "wide", "--out", str(out)])
    assert r.exit_code == 0, r.output
    G = read_negatives(negs).grouped()
    assert r.output.strip() == f"wrote {out}: {len(G)} queries, up to 6 negatives each"
    wide = pq.read_table(out)
    assert wide.column_names == ["query_id", "ref_id", "target_id", "negatives", "delta", "neg_category"] + [
        f"negative_{j}" for j in range(1, 7)
    ]
    rows = wide.to_pylist()
    assert [x["query_id"] for x in rows] == G.query_ids.tolist()
    long = read_negatives(negs).table.to_pylist()
    for x in rows:
        mine = [y for y in long if y["query_id"] == x["query_id"]]
        assert x["negatives"] == [y["neg_id"] for y in mine]
        assert x["delta"] == pytest.approx([y["delta"] for y in mine])
        assert x["neg_category"] == [y["neg_category"] for y in mine]
        assert [x[f"negative_{j}"] for j in range(1, 7)] == x["negatives"] + [None] * (6 - len(mine))
        if mine:
            assert (x["ref_id"], x["target_id"]) == (mine[0]["ref_id"], mine[0]["target_id"])
    assert any(len(x["negatives"]) < 6 for x in rows)  # short queries are in the export, unpadded
    meta = json.loads(pq.read_schema(out).metadata[b"cir_mine"])
    assert meta["table"] == "negatives-wide" and meta["k"] == 6 and meta["source"] == str(negs)


def test_export_ntuple_reads_in_sentence_transformers_positional_order(work, negs, tmp_path):
    """sentence-transformers reads an n-tuple dataset by column position: anchor, positive, negatives."""
    from cir_mine.data.records import join_captions

    out = tmp_path / "negs.ntuple.parquet"
    r = runner.invoke(mine_app, ["export", str(negs), "--format", "ntuple", "--work", str(work), "--out", str(out)])
    assert r.exit_code == 0, r.output
    g, t = Workspace(work).load("train")
    G = read_negatives(negs, Workspace(work)).grouped()
    full = [i for i in range(len(G)) if G.mask[i].all()]
    assert 0 < len(full) < len(G)
    assert r.output.strip() == (
        f"wrote {out}: {len(full)} queries with 6 negatives each "
        f"({len(G) - len(full)} with fewer than 6 negatives left out)"
    )
    table = pq.read_table(out)
    assert table.num_columns == 2 + 6
    rows = list(zip(*[c.to_pylist() for c in table.columns]))  # by position, never by name
    assert len(rows) == len(full)
    for row, i in zip(rows, full):
        anchor, positive, *negatives = row
        assert anchor == join_captions(t.captions[i]) and positive == t.target_ids[i]
        assert negatives == G.neg_ids[i].tolist()
        assert t.ref_ids[i] not in negatives and positive not in negatives
    meta = json.loads(pq.read_schema(out).metadata[b"cir_mine"])
    assert meta["table"] == "negatives-ntuple" and meta["images"] == "id" and meta["left_out"] == len(G) - len(full)
    r = runner.invoke(mine_app, ["export", str(negs), "--format", "ntuple", "--out", str(tmp_path / "x.parquet")])
    assert r.exit_code == 2 and r.output.strip() == (
        "Error: the ntuple format needs --work, the workspace the table was mined from: its captions are the anchors, "
        "its gallery the image ids and paths."
    )
    r = runner.invoke(
        mine_app,
        [
            "export",
            str(negs),
            "--format",
            "ntuple",
            "--work",
            str(work),
            "--images",
            "path",
            "--out",
            str(tmp_path / "x.parquet"),
        ],
    )
    assert r.exit_code == 1 and r.output.strip() == (
        f"Error: {work / 'gallery.train.parquet'}: the gallery has no image paths (column 'path'): export ids with "
        f"--images id, or embed the files with `cir-mine embed`."
    )


def test_export_ntuple_with_image_paths(tmp_path):
    """An embedded dataset: the image columns hold the files, joined to the dataset root."""
    from tests.fixtures import make_image_work

    work, images = make_image_work(tmp_path, n=24, n_queries=6)
    from cir_mine import MineConfig
    from cir_mine.miner.core.mine import mine_to_file

    mine_to_file(Workspace(work), "train", MineConfig(strategy="random", k=3, device="cpu"), tmp_path / "n.parquet")
    out = tmp_path / "n.ntuple.parquet"
    r = runner.invoke(
        mine_app,
        [
            "export",
            str(tmp_path / "n.parquet"),
            "--format",
            "ntuple",
            "--work",
            str(work),
            "--images",
            "path",
            "--root",
            str(images),
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    table = pq.read_table(out)
    for row in zip(*[c.to_pylist() for c in table.columns]):
        assert all(Path(p).is_file() and Path(p).is_relative_to(images) for p in row[1:])


def test_export_jsonl_lines(negs, tmp_path):
    out = tmp_path / "negs.jsonl"
    r = runner.invoke(mine_app, ["export", str(negs), "--format", "jsonl", "--out", str(out)])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    G = read_negatives(negs).grouped()
    assert [x["query_id"] for x in lines] == G.query_ids.tolist()  # queries without negatives too
    assert set(lines[0]) == {"query_id", "ref_id", "target_id", "negatives", "delta"}
    assert [x["negatives"] for x in lines] == [[str(n) for n in row[m]] for row, m in zip(G.neg_ids, G.mask)]


def test_export_refuses_the_input_and_existing_outputs(negs, tmp_path):
    before = negs.read_bytes()
    r = runner.invoke(mine_app, ["export", str(negs), "--format", "wide", "--out", str(negs)])
    assert r.exit_code == 2
    assert r.output.strip() == (
        f"Error: --out {negs}: is an input of this command ({negs}). Choose another --out; "
        f"outputs never replace inputs."
    )
    assert negs.read_bytes() == before
    out = tmp_path / "x.jsonl"
    out.write_text("keep")
    r = runner.invoke(mine_app, ["export", str(negs), "--format", "jsonl", "--out", str(out)])
    assert r.exit_code == 2 and r.output.strip() == (
        f"Error: --out {out}: already exists. Pass --overwrite to replace it, or choose another --out."
    )
    assert out.read_text() == "keep"
    r = runner.invoke(mine_app, ["export", str(negs), "--format", "jsonl", "--out", str(out), "--overwrite"])
    assert r.exit_code == 0 and out.read_text() != "keep"
    r = runner.invoke(mine_app, ["export", str(negs), "--format", "csv", "--out", str(out)])
    assert r.exit_code == 2
    r = runner.invoke(
        mine_app, ["export", str(tmp_path / "none.parquet"), "--format", "jsonl", "--out", str(tmp_path / "y")]
    )
    assert r.exit_code == 1 and r.output.strip() == (
        f"Error: {tmp_path / 'none.parquet'}: negatives table not found. Mine one with `cir-mine negatives`."
    )
    r = runner.invoke(
        mine_app, ["export", str(negs), "--format", "jsonl", "--root", str(tmp_path), "--out", str(tmp_path / "c")]
    )
    assert r.exit_code == 2 and "are not FashionIQ ({category}-{split}-{index}) or CIRR" in r.output
    assert not (tmp_path / "c").exists()


def _dataset_negatives(root: Path, dataset: str, split: str, out: Path) -> Path:
    """A negatives table over a dataset's real query ids (random negatives, written like the miner)."""
    from cir_mine.data.adapters import load_dataset
    from cir_mine.miner.core.tables import write_negatives
    from tests.test_api import _fake_negatives

    images, queries = load_dataset(dataset, root, split)
    queries = queries[1:]  # one query without negatives: its entry gets []
    write_negatives(_fake_negatives(queries, images, k=2), out, {"k": 2, "k_mined": 2, "split": split})
    return out


@pytest.mark.parametrize("dataset", ["fashioniq", "cirr"])
def test_export_clip4cir_caption_files(dataset, fiq_root, cirr_root, tmp_path):
    root, split = (fiq_root, "train") if dataset == "fashioniq" else (cirr_root, "val")
    negs = _dataset_negatives(root, dataset, split, tmp_path / "negs.parquet")
    out = tmp_path / "captions"
    r = runner.invoke(mine_app, ["export", str(negs), "--format", "jsonl", "--root", str(root), "--out", str(out)])
    assert r.exit_code == 0, r.output
    long = read_negatives(negs).table.to_pylist()
    inputs = sorted((root / "captions").glob("cap.*.json"))
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in inputs]
    first = True
    for src in inputs:
        original, written = json.loads(src.read_text()), json.loads((out / src.name).read_text())
        assert len(written) == len(original)
        for i, (a, b) in enumerate(zip(original, written)):
            assert {k: v for k, v in b.items() if k != "negatives"} == a  # the entry, unchanged
            ref = a.get("candidate", a.get("reference"))
            tgt = a.get("target", a.get("target_hard"))
            mine = [y["neg_id"] for y in long if (y["ref_id"], y["target_id"]) == (ref, tgt)]
            assert b["negatives"] == mine
            if first:
                assert mine == []  # the query left out of the table
                first = False
    # refuses to write onto the caption files it reads
    before = [p.read_bytes() for p in inputs]
    r = runner.invoke(
        mine_app,
        ["export", str(negs), "--format", "jsonl", "--root", str(root), "--out", str(root / "captions"), "--overwrite"],
    )
    assert r.exit_code == 2 and "is an input of this command" in r.output
    assert [p.read_bytes() for p in inputs] == before
    r = runner.invoke(mine_app, ["export", str(negs), "--format", "jsonl", "--root", str(root), "--out", str(out)])
    assert r.exit_code == 2 and "already exists. Pass --overwrite to replace it" in r.output


def test_export_caption_files_refuse_another_dataset(fiq_root, tmp_path):
    negs = _dataset_negatives(fiq_root, "fashioniq", "train", tmp_path / "negs.parquet")
    cap = fiq_root / "captions" / "cap.dress.train.json"
    entries = json.loads(cap.read_text())
    entries[2]["target"] = "B_OTHER"
    cap.write_text(json.dumps(entries))
    out = tmp_path / "out"
    r = runner.invoke(mine_app, ["export", str(negs), "--format", "jsonl", "--root", str(fiq_root), "--out", str(out)])
    assert r.exit_code == 1
    assert r.output.strip() == (
        f"Error: {cap}: entry 2 is B000000002 -> B_OTHER but {negs} has B000000002 -> "
        f"B000000003 for query dress-train-00002. Pass the FashionIQ root the table was mined from."
    )
    assert not out.exists()  # checked before the first write
