"""The workflow a new user walks through: splits, image paths, checks, hints, imports, options."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cir_mine.cli import mine_app
from cir_mine.data.errors import DataError
from cir_mine.data.synthetic import SynthConfig, generate
from cir_mine.data.workspace import Workspace
from cir_mine.miner.core.mine import MineConfig, mine_to_file
from cir_mine.miner.core.tables import read_negatives

runner = CliRunner()


def _world(root: Path, seed: int = 0, split: str = "train", n_gallery: int = 300, n_triplets: int = 40) -> Path:
    generate(SynthConfig(n_gallery=n_gallery, n_triplets=n_triplets, dim=16, seed=seed, split=split), root)
    return root


# ------------------------------------------------------------------------------------------------
# A negatives table belongs to its split


def test_a_table_survives_embedding_another_split(tmp_path):
    work = _world(tmp_path / "w")
    negs = tmp_path / "n.parquet"
    mine_to_file(Workspace(work), "train", MineConfig.of(strategy="midzone", k=4), negs)
    before = Workspace(work).manifest_hash()
    _world(work, seed=3, split="val", n_gallery=200)  # a val split lands in the workspace
    assert Workspace(work).manifest_hash() != before  # the manifest moved on ...
    assert read_negatives(negs, Workspace(work)).table.num_rows > 0  # ... the train table still belongs
    r = runner.invoke(mine_app, ["stats", str(negs), "--work", str(work)])
    assert r.exit_code == 0, r.output


def test_a_table_from_other_data_is_still_refused(tmp_path):
    work, other = _world(tmp_path / "w"), _world(tmp_path / "o", seed=5)
    negs = tmp_path / "n.parquet"
    mine_to_file(Workspace(other), "train", MineConfig.of(strategy="random", k=3), negs)
    theirs, ours = Workspace(other).split_hash("train"), Workspace(work).split_hash("train")
    assert theirs != ours
    r = runner.invoke(mine_app, ["stats", str(negs), "--work", str(work)])
    assert r.exit_code == 1
    assert r.output.strip() == (
        f"Error: {negs}: mined from another workspace (split 'train' data hash {theirs}, "
        f"{work} has {ours}). Re-mine it with `cir-mine negatives --work {work} --split train`."
    )
    # the same workspace, its train split written again with other data (same counts)
    _world(other, seed=6)
    with pytest.raises(DataError, match=r"mined from another workspace \(split 'train' data hash"):
        read_negatives(negs, Workspace(other))


def test_a_table_of_a_split_the_workspace_lacks(tmp_path):
    work, other = _world(tmp_path / "w"), _world(tmp_path / "o", split="val")
    negs = tmp_path / "n.parquet"
    mine_to_file(Workspace(other), "val", MineConfig.of(strategy="random", k=3), negs)
    with pytest.raises(DataError) as e:
        read_negatives(negs, Workspace(work))
    assert str(e.value) == (
        f"{negs}: mined on split 'val', which {work} does not have (splits: train). "
        f"Pass the workspace it was mined from with work."
    )
    assert e.value.params == ("work",)


# ------------------------------------------------------------------------------------------------
# Image paths: relative to the dataset root; `check` counts files that exist


def test_check_counts_image_files_that_exist(tmp_path):
    from tests.fixtures import make_cirr

    root = make_cirr(tmp_path / "cirr", images=False)  # annotations only, like ../shared/cirr
    r = runner.invoke(mine_app, ["check", "--dataset", "cirr", "--root", str(root), "--split", "val"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == "cirr val: 12 images (0 with image files, 0 with attributes), 10 queries, categories: -"
    (root / "dev").mkdir()
    shutil.copy(Path(__file__).parent / "fixtures.py", root / "dev" / "dev-0-0-img0.png")  # one file there
    r = runner.invoke(mine_app, ["check", "--dataset", "cirr", "--root", str(root), "--split", "val"])
    assert "12 images (1 with image files," in r.output


def test_embed_cirr_without_images_names_the_layout(tmp_path):
    from tests.fixtures import make_cirr

    root = make_cirr(tmp_path / "cirr", images=False)
    r = runner.invoke(
        mine_app,
        [
            "embed",
            "--dataset",
            "cirr",
            "--root",
            str(root),
            "--split",
            "val",
            "--work",
            str(tmp_path / "w"),
            "--model",
            "no-such-model",
        ],
    )
    assert r.exit_code == 1
    assert r.output.strip() == (
        f"Error: {root}: none of the 12 cirr images of split 'val' has an image file (annotations only?). Put the "
        f"images where the dataset layout expects them (CIRR: the paths of image_splits/split.rc2.val.json under "
        f"ROOT, first dev/dev-0-0-img0.png), or import features with `cir-mine index --from-features`."
    )


@pytest.mark.parametrize("name", ["fashioniq", "cirr", "folder"])
def test_adapters_store_paths_relative_to_the_root(tmp_path, monkeypatch, name):
    from cir_mine.data.adapters import load_dataset
    from tests.fixtures import make_cirr, make_fashioniq, make_folder

    make = {"fashioniq": make_fashioniq, "cirr": make_cirr, "folder": make_folder}[name]
    root = make(tmp_path / "data")
    split = "val" if name == "cirr" else "train"
    monkeypatch.chdir(tmp_path)
    images, _ = load_dataset(name, Path("data"), split)  # a relative --root
    assert images and all(not Path(im.path).is_absolute() and not im.path.startswith(("data/", "./")) for im in images)
    assert all((root / im.path).is_file() for im in images)


def test_root_works_from_any_directory(tmp_path, monkeypatch):
    """Embedded with a relative --root from one directory, inspected from another: the recorded
    (absolute) dataset root resolves the relative gallery paths; --root overrides it."""
    import pyarrow.parquet as pq

    from tests.fixtures import make_fashioniq, write_tiny_clip_config

    tiny = write_tiny_clip_config(tmp_path / "cfg")
    make_fashioniq(tmp_path / "here" / "fiq", n_per_cat=3)
    monkeypatch.chdir(tmp_path / "here")
    r = runner.invoke(
        mine_app,
        [
            "embed",
            "--dataset",
            "fashioniq",
            "--root",
            "fiq",
            "--work",
            "ws",
            "--model",
            str(tiny),
            "--device",
            "cpu",
            "--workers",
            "0",
            "--index",
            "none",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    work = (tmp_path / "here" / "ws").resolve()
    paths = pq.read_table(work / "gallery.train.parquet").column("path").to_pylist()
    assert paths and all(p.startswith("images/") for p in paths)
    assert Workspace(work).image_root("train") == (tmp_path / "here" / "fiq").resolve()
    negs = tmp_path / "n.parquet"
    mine_to_file(Workspace(work), "train", MineConfig.of(strategy="random", k=2), negs)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = runner.invoke(mine_app, ["inspect", str(negs), "--work", str(work), "--sample", "1", "--out", "s.png"])
    assert r.exit_code == 0, r.output
    assert r.output.strip().endswith("thumbnails")
    moved = shutil.move(str(tmp_path / "here" / "fiq"), str(tmp_path / "moved"))
    r = runner.invoke(
        mine_app, ["inspect", str(negs), "--work", str(work), "--sample", "1", "--out", "s.png", "--overwrite"]
    )
    assert r.exit_code == 1 and "Pass the dataset root, the folder that holds images/" in r.output
    r = runner.invoke(
        mine_app,
        ["inspect", str(negs), "--work", str(work), "--sample", "1", "--out", "s.png", "--root", moved, "--overwrite"],
    )
    assert r.exit_code == 0, r.output


# ------------------------------------------------------------------------------------------------
# Shortfall hints name the guard; inspect draws a short query with its guard counts


def test_shortfall_hints_come_from_the_guard_counts():
    from cir_mine.miner.core.guards import GuardConfig, shortfall_hints

    removed = {
        "target": 40,
        "reference": 40,
        "extra_positive": 0,
        "cap": 1072,
        "near_duplicate": 3,
        "duplicate_product": 0,
    }
    midzone = "midzone: widen MineConfig.of(delta_lo=..., delta_hi=...)"
    assert shortfall_hints(removed, 40, GuardConfig(), [midzone]) == [
        "the positive-aware cap removed 1,072: loosen MineConfig.of(rho=...) (now 0.95; nearer 1 keeps more) or "
        "switch it off, MineConfig.of(rho=None)",
        midzone,
        "the near-duplicate guard removed 3: raise MineConfig.of(dup_threshold=...) (now 0.98) or switch it off, "
        "MineConfig.of(dup_threshold=None)",
    ]
    # nothing removed by a guard with a knob: only the strategy's own hint
    assert shortfall_hints({"target": 9, "cap": 0}, 9, GuardConfig(rho=None), ["x: y"]) == ["x: y"]


def test_a_cap_bound_shortfall_names_rho(tmp_path):
    work = _world(tmp_path / "w")
    out = tmp_path / "n.parquet"
    r = runner.invoke(
        mine_app,
        [
            "negatives",
            "--work",
            str(work),
            "--strategy",
            "hardest",
            "-k",
            "6",
            "--rho",
            "0.3",
            "--candidates",
            "20",
            "--no-deepen",
            "--out",
            str(out),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    meta = read_negatives(out).meta
    short = meta["shortfall"]["query_ids"]
    assert short and set(meta["guards_per_query"]) == set(short)
    cap = sum(meta["guards_per_query"][q]["cap"] for q in short)
    assert cap > 0
    # the footer speaks the API's names, the CLI its flags
    hint = (
        f"the positive-aware cap removed {cap:,}: loosen MineConfig.of(rho=...) (now 0.3; nearer 1 keeps more) "
        f"or switch it off, MineConfig.of(rho=None)"
    )
    assert meta["shortfall"]["hints"][:2] == [
        hint,
        "hardest: raise MineConfig.of(range_max=..., max_candidates=...) or MineConfig.of(rho=...)",
    ]
    shown = (
        f"to loosen: the positive-aware cap removed {cap:,}: loosen --rho (now 0.3; nearer 1 keeps more) or "
        f"switch it off, --no-guard cap; hardest: raise --range-max/--max-candidates or --rho"
    )
    assert shown in r.output and "MineConfig" not in r.output
    r = runner.invoke(mine_app, ["stats", str(out)])
    assert r.exit_code == 0 and shown in r.output and "MineConfig" not in r.output


def test_inspect_draws_a_short_query_with_its_guard_counts(tmp_path):
    import pyarrow.compute as pc

    work = _world(tmp_path / "w")
    out = tmp_path / "n.parquet"
    mine_to_file(
        Workspace(work),
        "train",
        MineConfig.of(strategy="hardest", k=6, rho=0.3, candidates=20, max_candidates=None),
        out,
    )
    nt = read_negatives(out)
    have = set(pc.unique(nt.table.column("query_id")).to_pylist())
    empty = [q for q in nt.meta["shortfall"]["query_ids"] if q not in have]
    assert empty  # queries the guards left with nothing
    q = empty[0]
    g = nt.meta["guards_per_query"][q]
    r = runner.invoke(
        mine_app, ["inspect", str(out), "--work", str(work), "--query-id", q, "--out", str(tmp_path / "s.png")]
    )
    assert r.exit_code == 0, r.output
    counts = ", ".join(f"{name} {n:,}" for name, n in g.items() if n)
    assert r.output.splitlines()[1] == f"{q}: short, 0 of 6 negatives; guards removed: {counts}"
    assert g["cap"] > 0 and (tmp_path / "s.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------------
# neg_category


def test_neg_category_is_the_negatives_gallery_category(tmp_path):
    import numpy as np

    work = _world(tmp_path / "w")
    out = tmp_path / "n.parquet"
    mine_to_file(Workspace(work), "train", MineConfig.of(mix="midzone:0.5,category:0.5", k=8), out)
    nt = read_negatives(out, Workspace(work))
    g = Workspace(work).gallery("train")
    cols = nt.table.to_pydict()
    assert nt.meta["schema_version"] == 2 and nt.table.schema.field("neg_category").type == "string"
    for n, c in zip(cols["neg_id"], cols["neg_category"]):
        assert (c, n) in g.key_row  # a gallery key, always
    tcat = {t: g.categories[g.row_of[t]] for t in set(cols["target_id"])}
    match = np.array([c == tcat[t] for c, t in zip(cols["neg_category"], cols["target_id"])])
    assert (match == np.array(cols["category_match"])).all() and not match.all()  # some from another category


def test_a_version_1_table_reads_with_a_null_neg_category(tmp_path):
    import json

    import pyarrow.parquet as pq

    work = _world(tmp_path / "w")
    out, old = tmp_path / "n.parquet", tmp_path / "old.parquet"
    mine_to_file(Workspace(work), "train", MineConfig.of(strategy="random", k=3), out)
    t = pq.read_table(out)
    meta = json.loads(t.schema.metadata[b"cir_mine"])
    meta["schema_version"] = 1
    pq.write_table(t.drop(["neg_category"]).replace_schema_metadata({b"cir_mine": json.dumps(meta).encode()}), old)
    back = read_negatives(old, Workspace(work))
    assert back.table.column_names == read_negatives(out).table.column_names
    assert back.table.column("neg_category").null_count == back.table.num_rows
    # a version 2 table must have it
    pq.write_table(t.drop(["neg_category"]), old)
    from cir_mine.data.errors import SchemaError

    with pytest.raises(SchemaError) as e:
        read_negatives(old)
    assert str(e.value).startswith(f"{old}: missing column 'neg_category' (string); a negatives table needs")


def test_training_resolves_a_negative_within_its_own_category():
    """An id listed under two categories is two gallery rows; the trainer takes the negative's row."""
    from types import SimpleNamespace

    import numpy as np
    import pyarrow as pa

    from cir_mine.data.workspace import Gallery
    from cir_mine.train.data import group_negatives

    g = Gallery(
        Path("g"),
        np.array(["a", "x", "x"], object),
        np.array(["dress", "dress", "shirt"], object),
        [[], [], []],
        np.eye(3, dtype=np.float32),
    )

    class Queries(SimpleNamespace):
        def __len__(self):
            return 1

    queries = Queries(query_ids=np.array(["q"], object), categories=np.array(["dress"], object))
    table = pa.table(
        {
            "query_id": ["q", "q"],
            "neg_id": ["x", "x"],
            "neg_category": ["shirt", None],
            "strategy": ["midzone", "midzone"],
        }
    )
    bank = group_negatives(table, queries, g)
    assert bank.rows.tolist() == [[2, 1]]  # shirt's row; a null falls back to the query's category


# ------------------------------------------------------------------------------------------------
# index --from-features into a workspace with triplets


def _features_of(work: Path, out: Path, noise: float = 0.01, with_category: bool = False) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    g = Workspace(work).gallery("train")
    emb = g.embeddings + noise * np.random.default_rng(0).standard_normal(g.embeddings.shape).astype("float32")
    cols = {"image_id": g.image_ids.tolist(), "embedding": emb.tolist()}
    if with_category:
        cols["category"] = g.categories.tolist()
    pq.write_table(pa.table(cols), out)
    return out


def test_from_features_refuses_another_encoder_unless_told(tmp_path):
    work = _world(tmp_path / "w")
    feats = _features_of(work, tmp_path / "f.parquet")
    before = (work / "gallery.train.parquet").read_bytes()
    base = ["index", "--work", str(work), "--device", "cpu", "--from-features", str(feats), "--overwrite"]
    r = runner.invoke(mine_app, base + ["--encoder-name", "my-clip"])
    assert r.exit_code == 1
    assert r.output.strip() == (
        f"Error: {work}: triplets.train.parquet hold text embeddings from encoder 'synthetic', but these features "
        f"come from 'my-clip'. Pass --encoder-name synthetic if the features come from it, or "
        f"--allow-encoder-change to import them anyway (then re-embed the triplets)."
    )
    r = runner.invoke(mine_app, base)  # an unnamed encoder is another one too
    assert r.exit_code == 1 and "come from 'unknown'" in r.output
    assert (work / "gallery.train.parquet").read_bytes() == before  # nothing written
    r = runner.invoke(mine_app, base + ["--encoder-name", "my-clip", "--allow-encoder-change"])
    assert r.exit_code == 0, r.output
    assert Workspace(work).manifest()["encoder"]["name"] == "my-clip"


def test_from_features_keeps_tags_categories_and_paths_of_matching_ids(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    work = _world(tmp_path / "w")
    gp = work / "gallery.train.parquet"
    t = pq.read_table(gp)
    paths = [f"images/{i}.png" for i in t.column("image_id").to_pylist()]
    pq.write_table(t.append_column("path", pa.array(paths, pa.string())), gp)
    old = Workspace(work).gallery("train")
    assert any(old.attributes) and len(set(old.categories.tolist())) > 1
    feats = _features_of(work, tmp_path / "f.parquet")  # ids only, no categories
    r = runner.invoke(
        mine_app,
        [
            "index",
            "--work",
            str(work),
            "--device",
            "cpu",
            "--from-features",
            str(feats),
            "--encoder-name",
            "synthetic",
            "--overwrite",
        ],
    )
    assert r.exit_code == 0, r.output
    new = Workspace(work).gallery("train")
    assert new.image_ids.tolist() == old.image_ids.tolist()
    assert new.categories.tolist() == old.categories.tolist()
    assert new.attributes == old.attributes and new.paths.tolist() == paths
    assert not (new.embeddings == old.embeddings).all()  # the features, not the old rows
    mine_to_file(Workspace(work), "train", MineConfig.of(strategy="attribute-mismatch", k=3), tmp_path / "n.parquet")


def test_negatives_on_a_features_only_workspace_says_how_to_add_queries(tmp_path):
    work = _world(tmp_path / "src")
    feats = _features_of(work, tmp_path / "f.parquet", with_category=True)
    only = tmp_path / "only"
    r = runner.invoke(mine_app, ["index", "--work", str(only), "--device", "cpu", "--from-features", str(feats)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        mine_app, ["negatives", "--work", str(only), "--strategy", "midzone", "--out", str(tmp_path / "n.parquet")]
    )
    assert r.exit_code == 1
    assert r.output.strip() == (
        f"Error: {only / 'triplets.train.parquet'}: file not found: {only} holds the gallery of split 'train' but "
        f"no queries (features only). Add queries: write triplets.train.parquet in the triplets schema (query_id, "
        f"category, ref_id, target_id, captions, text_embedding from the features' encoder; docs/formats.md), or "
        f"embed images and captions with `cir-mine embed --dataset fashioniq|cirr|folder --root ROOT --work {only} "
        f"--split train`."
    )
    assert not (tmp_path / "n.parquet").exists()


# ------------------------------------------------------------------------------------------------
# One option vocabulary


def _commands():
    import typer

    from cir_mine.cli import train_app

    group = typer.main.get_command(mine_app)
    yield from ((f"cir-mine {n}", c) for n, c in group.commands.items())
    yield "cir-train", typer.main.get_command(train_app)


def test_every_command_takes_quiet_and_verbose():
    names = []
    for name, cmd in _commands():
        opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
        assert {"-q", "--quiet", "-v", "--verbose"} <= opts, name
        names.append(name)
    assert len(names) >= 14 and "cir-mine negatives" in names


def test_version_of_both_programs():
    import cir_mine
    from cir_mine.cli import train_app

    r = runner.invoke(mine_app, ["--version"])
    assert r.exit_code == 0 and r.output == f"cir-mine {cir_mine.__version__}\n"
    r = runner.invoke(train_app, ["--version"])
    assert r.exit_code == 0 and r.output == f"cir-train {cir_mine.__version__}\n"


def test_verbose_logs_cir_mine_only(tmp_path):
    """-v shows what cir-mine does, not faiss.loader's library probing (a fresh process: logging is global)."""
    import os
    import subprocess
    import sys

    work = _world(tmp_path / "w")
    r = subprocess.run(
        [sys.executable, "-m", "cir_mine.cli", "index", "--work", str(work), "--device", "cpu", "-q", "-v"],
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "INFO cir_mine.miner.core.search.build: FAISS index Flat on CPU" in r.stderr
    assert "faiss.loader" not in r.stderr


def test_cir_train_prints_a_line_per_remine_round(tmp_path):
    import re

    from cir_mine.cli import train_app

    work = _world(tmp_path / "w", n_gallery=200, n_triplets=60)
    negs = tmp_path / "n.parquet"
    mine_to_file(Workspace(work), "train", MineConfig.of(mix="midzone:0.5,random:0.5", k=4), negs)
    args = [
        "--work",
        str(work),
        "--out",
        str(tmp_path / "run"),
        "--negatives",
        str(negs),
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--width",
        "0.5",
        "--refresh-every",
        "1",
        "--threads",
        "1",
    ]
    r = runner.invoke(train_app, args)
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("re-mine")]
    assert len(lines) == 2, r.output
    for n, ln in enumerate(lines, 1):
        assert re.fullmatch(rf"re-mine round {n} \(epoch \d+\): midzone:0\.5,random:0\.5, [\d,]+ rows, \d+\.\ds", ln), (
            ln
        )
    r = runner.invoke(train_app, args[:3] + [str(tmp_path / "run2")] + args[4:] + ["-q"])
    assert r.exit_code == 0 and "re-mine" not in r.output
