"""The Python API: in-memory workspaces, grouped negatives, the re-mining hook, the CLIP4Cir lookup."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from cir_mine import (
    DataError,
    MineConfig,
    NegativesLookup,
    Remine,
    UsageError,
    Workspace,
    clip4cir_fashioniq_items,
    group_negatives_table,
    mine_negatives,
    read_negatives,
)
from cir_mine.data.errors import SchemaError
from cir_mine.data.synthetic import SynthConfig, generate
from cir_mine.miner.core.mine import mine_to_file
from cir_mine.miner.core.tables import NEGATIVES_SCHEMA

from tests.conftest import shared_path

MIXES = ["hardest", "midzone:0.5,random:0.3,attribute-mismatch:0.2", "category:0.5,semihard:0.5"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small synthetic workspace on disk (with extra positives) and its arrays."""
    out = tmp_path_factory.mktemp("api")
    generate(SynthConfig(n_gallery=600, n_triplets=120, dim=16, seed=5), out)
    ws = Workspace(out)
    g, t = ws.load("train")
    return ws, g, t


def arrays_of(g, t, **kw):
    return Workspace.from_arrays(
        g.embeddings,
        g.image_ids,
        categories=g.categories,
        attributes=g.attributes,
        ref_ids=t.ref_ids,
        target_ids=t.target_ids,
        text_emb=t.text_embeddings,
        captions=t.captions,
        query_ids=t.query_ids,
        query_categories=t.categories,
        extra_positive_ids=t.extra_positive_ids,
        **kw,
    )


# ------------------------------------------------------------------------------------------------
# Workspace.from_arrays


@pytest.mark.parametrize("mix", MIXES)
def test_from_arrays_mines_the_same_table_as_the_files(world, mix, tmp_path, monkeypatch):
    ws, g, t = world
    monkeypatch.chdir(tmp_path)
    mem = arrays_of(g, t)
    cfg = MineConfig(mix=mix, k=5, seed=1)
    disk, memory = mine_negatives(ws, "train", cfg), mine_negatives(mem, "train", cfg)
    assert memory.table.num_rows > 0 and memory.table.equals(disk.table)
    assert memory.meta["shortfall"] == disk.meta["shortfall"] and memory.meta["guards"] == disk.meta["guards"]
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere


def test_from_arrays_defaults_and_save_round_trip(world, tmp_path):
    ws, g, t = world
    # unnormalized inputs with normalize=True; query ids and categories by default
    mem = Workspace.from_arrays(
        g.embeddings * 3.0,
        list(g.image_ids),
        categories=list(g.categories),
        attributes=g.attributes,
        ref_ids=list(t.ref_ids),
        target_ids=list(t.target_ids),
        text_emb=t.text_embeddings * 2.0,
        captions=[" and ".join(c) for c in t.captions],
        normalize=True,
    )
    gm, tm = mem.load("train")
    assert tm.query_ids[0] == "train-000000" and len(tm) == len(t)
    assert tm.categories.tolist() == [g.categories[g.row_of[r]] for r in t.ref_ids.tolist()]
    np.testing.assert_allclose(gm.embeddings, g.embeddings, atol=1e-6)
    assert mem.splits() == ["train"] and mem.manifest()["dim"] == 16
    saved = mem.save(tmp_path / "saved")
    cfg = MineConfig(strategy="hardest", k=4)
    assert mine_negatives(saved, "train", cfg).table.equals(mine_negatives(mem, "train", cfg).table)
    with pytest.raises(DataError, match="already exists; save into a new directory"):
        mem.save(tmp_path / "saved")


def test_from_arrays_tables_check_against_the_same_arrays(world, tmp_path):
    ws, g, t = world
    a, b = arrays_of(g, t), arrays_of(g, t)
    path = tmp_path / "n.parquet"
    res = mine_to_file(a, "train", MineConfig(strategy="random", k=3), path)
    assert read_negatives(path, b).table.equals(res.table)  # same arrays: same workspace hash
    other = Workspace.from_arrays(
        g.embeddings[::-1].copy(),
        g.image_ids[::-1],
        categories=g.categories[::-1],
        ref_ids=t.ref_ids,
        target_ids=t.target_ids,
        text_emb=t.text_embeddings,
        captions=t.captions,
    )
    with pytest.raises(DataError, match="mined from another workspace"):
        read_negatives(path, other)


def test_from_arrays_errors():
    emb = np.eye(4, dtype=np.float32)
    ids = ["a", "b", "c", "d"]
    q = dict(ref_ids=["a"], target_ids=["b"], text_emb=emb[:1], captions=["is red"])
    cases = [
        (
            dict(gallery_emb=emb[0], image_ids=ids),
            DataError,
            "Workspace.from_arrays: gallery_emb: shape (4,), expected a non-empty 2-d array [n, d].",
        ),
        (
            dict(gallery_emb=emb.astype(int), image_ids=ids),
            DataError,
            "Workspace.from_arrays: gallery_emb: dtype int64, expected floating point (float32).",
        ),
        (
            dict(gallery_emb=emb, image_ids=ids[:3]),
            UsageError,
            "Workspace.from_arrays: image_ids has 3 entries; expected 4 (one per row).",
        ),
        (
            dict(gallery_emb=emb, image_ids=["a", "b", 3, "d"]),
            DataError,
            "Workspace.from_arrays: image_ids: id of row 2 is 3 (int); ids must be strings.",
        ),
        (
            dict(gallery_emb=emb * 2, image_ids=ids),
            DataError,
            "Workspace.from_arrays: gallery_emb: 4 row(s) that are not L2-normalized (first: row 0, image a with norm 2). "
            "Normalize them (x / ||x||), or pass normalize=True.",
        ),
        (
            dict(gallery_emb=emb, image_ids=["a", "a", "c", "d"]),
            SchemaError,
            "Workspace.from_arrays(gallery_emb): column 'image_id' has a duplicated id 'a' in category ''. "
            "Each gallery image must appear once per category; drop the duplicates.",
        ),
        (
            dict(gallery_emb=emb, image_ids=ids, ref_ids=["a"]),
            UsageError,
            "Workspace.from_arrays: queries need ref_ids, target_ids, text_emb and captions; "
            "target_ids, text_emb, captions missing.",
        ),
        (
            dict(gallery_emb=emb, image_ids=ids, **{**q, "text_emb": np.ones((1, 3), np.float32)}),
            UsageError,
            "Workspace.from_arrays: text_emb has dimension 3 but gallery_emb has 4; both must come from the same encoder.",
        ),
        (
            dict(gallery_emb=emb, image_ids=ids, **{**q, "target_ids": ["zz"]}),
            DataError,
            "Workspace.from_arrays(text_emb): column 'target_id' names 1 image(s) missing from "
            "Workspace.from_arrays(gallery_emb) (first: zz, query train-000000). Re-embed the gallery or drop those triplets.",
        ),
        (
            dict(gallery_emb=emb, image_ids=ids, **{**q, "captions": [" "]}),
            SchemaError,
            "Workspace.from_arrays(text_emb): column 'captions' of query 'train-000000' has no non-empty caption. "
            "Drop the query or give it a caption.",
        ),
    ]
    for kw, exc, text in cases:
        with pytest.raises(exc) as e:
            Workspace.from_arrays(**kw)
        assert str(e.value) == text
    feats = Workspace.from_arrays(emb, ids)
    with pytest.raises(DataError) as e:
        mine_negatives(feats, "train", MineConfig(strategy="random", k=1))
    assert str(e.value) == (
        "Workspace.from_arrays: no queries; pass ref_ids, target_ids, text_emb and captions "
        "to Workspace.from_arrays to mine negatives."
    )
    with pytest.raises(DataError, match="split 'val' is not in this workspace"):
        feats.gallery("val")
    with pytest.raises(UsageError, match="writes no files"):
        feats.write_manifest()


# ------------------------------------------------------------------------------------------------
# Grouped negatives


def test_grouped_matches_the_long_table(world):
    ws, g, t = world
    res = mine_negatives(ws, "train", MineConfig(mix="midzone:0.5,hardest:0.5", k=6, candidates=8, max_candidates=None))
    table = res.table
    # drop every row of two queries: they must come back as empty rows, in the triplets' order
    gone = set(t.query_ids[[3, 7]].tolist())
    keep = pa.array([q not in gone for q in table.column("query_id").to_pylist()])
    table = table.filter(keep)
    G = group_negatives_table(table, 6, gallery=g, triplets=t)
    assert G.query_ids.tolist() == t.query_ids.tolist() and G.k == 6
    per_query = {}
    for r in table.to_pylist():
        per_query.setdefault(r["query_id"], []).append(r)
    for i, q in enumerate(G.query_ids.tolist()):
        mine = per_query.get(q, [])
        assert G.neg_ids[i][G.mask[i]].tolist() == [r["neg_id"] for r in mine]
        np.testing.assert_array_equal(G.delta[i][G.mask[i]], np.array([r["delta"] for r in mine], np.float32))
        assert G.short[i] == (len(mine) < 6) and not G.mask[i, len(mine) :].any()
        assert np.isnan(G.delta[i, len(mine) :]).all() and (G.gallery_rows[i, len(mine) :] == -1).all()
        assert g.image_ids[G.gallery_rows[i][G.mask[i]]].tolist() == [r["neg_id"] for r in mine]
        assert g.image_ids[G.target_rows[i]] == t.target_ids[i] and g.image_ids[G.ref_rows[i]] == t.ref_ids[i]
    assert G.short[[3, 7]].all() and G.counts[[3, 7]].sum() == 0
    assert G.short.sum() > 2  # a shallow search leaves queries short: the mask has work to do
    # without the split: the table's queries in order of first appearance, then those the guards left
    # without negatives (the footer lists them), as empty rows
    G2 = read_negatives_from(res).grouped()
    empty = res.meta["shortfall"]["without_negatives"]
    assert empty["query_ids"] and len(G2) == len(t)
    assert G2.query_ids.tolist() == list(dict.fromkeys(res.table.column("query_id").to_pylist())) + empty["query_ids"]
    tail = slice(len(G2) - len(empty["query_ids"]), None)
    assert G2.ref_ids[tail].tolist() == empty["ref_ids"] and G2.target_ids[tail].tolist() == empty["target_ids"]
    assert not G2.mask[tail].any() and G2.short[tail].all()
    assert G2.gallery_rows is None
    T = G.to_torch()
    import torch

    assert (
        T["delta"].dtype == torch.float32 and T["mask"].dtype == torch.bool and T["gallery_rows"].dtype == torch.int64
    )
    assert T["delta"].shape == (len(t), 6)


def read_negatives_from(res):
    from cir_mine.miner.core.tables import NegativesTable

    return NegativesTable(None, res.table, res.meta)


def test_grouped_resolves_within_the_query_category():
    """One id under two categories (real FashionIQ has 516): the row of the query's category."""
    emb = np.eye(5, dtype=np.float32)
    ws = Workspace.from_arrays(
        emb,
        ["x", "y", "z", "x", "w"],
        categories=["shirt", "shirt", "shirt", "toptee", "toptee"],
        ref_ids=["y", "w"],
        target_ids=["z", "x"],
        text_emb=emb[:2],
        captions=["a", "b"],
        query_categories=["shirt", "toptee"],
    )
    g, t = ws.load("train")
    table = pa.table(
        {
            "query_id": ["train-000000", "train-000001"],
            "neg_id": ["x", "x"],
            "strategy": ["r", "r"],
            "score": pa.array([0.1, 0.2], pa.float32()),
            "delta": pa.array([0.0, 0.0], pa.float32()),
            "target_score": pa.array([0.1, 0.2], pa.float32()),
            "ref_id": ["y", "w"],
            "target_id": ["z", "x"],
        }
    )
    G = group_negatives_table(table, gallery=g, triplets=t)
    assert G.gallery_rows[:, 0].tolist() == [0, 3] and G.target_rows.tolist() == [2, 3]


def test_core_api_imports_no_torch(world, tmp_path):
    ws, _, _ = world
    code = (
        "import sys\n"
        "from cir_mine import Workspace, MineConfig, mine_negatives, read_negatives, NegativesLookup, Remine\n"
        "from cir_mine import export_negatives\n"
        f"res = mine_negatives(Workspace({str(ws.root)!r}), 'train', MineConfig(strategy='hardest', k=2))\n"
        f"G = res.grouped(Workspace({str(ws.root)!r}))\n"
        "assert G.gallery_rows.shape[1] == 2\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]


def test_cli_starts_without_torch(tmp_path):
    """The command line's module (every `cir-mine` and `cir-train` call, `--help` included) loads
    no torch: the commands that encode or train import it when they run."""
    code = "import sys\nimport cir_mine.cli\nassert 'torch' not in sys.modules, 'torch imported'\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("entry", ["mine_main", "train_main"])
@pytest.mark.parametrize("chosen", [None, "system"])
def test_cli_reads_through_the_fast_pool_unless_the_user_chose_one(tmp_path, entry, chosen):
    """`cir-mine` and `cir-train` make jemalloc (data.memory.fast_pool) Arrow's default memory pool,
    so their Parquet reads skip mimalloc's page faults; ARROW_DEFAULT_MEMORY_POOL, when set, wins."""
    code = (
        "import sys\nimport pyarrow as pa\nfrom cir_mine import cli\nfrom cir_mine.data.memory import fast_pool\n"
        f"sys.argv = ['cir', '--help']\ntry:\n    cli.{entry}()\nexcept SystemExit:\n    pass\n"
        "print(pa.default_memory_pool().backend_name, fast_pool().backend_name)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    if chosen:
        env["ARROW_DEFAULT_MEMORY_POOL"] = chosen
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    default, fast = r.stdout.split()[-2:]
    assert default == (chosen or fast), r.stdout[-500:]


# ------------------------------------------------------------------------------------------------
# Remine


def test_remine_equals_a_fresh_mine_and_counts_rounds(world, tmp_path):
    ws, g, t = world
    cfg = MineConfig(mix="hardest:0.5,midzone:0.5", k=4, schedule=None)
    hook = Remine(ws, "train", cfg=cfg)
    rng = np.random.default_rng(0)
    for expect_round in (1, 2):
        q = rng.standard_normal(t.text_embeddings.shape).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        res = hook(q)
        assert res.meta["round"] == expect_round and res.meta["query_source"] == "provided"
        fresh = mine_negatives(ws, "train", dataclasses.replace(cfg, query="checkpoint"), query_emb=q)
        assert set(res.table.column("round").to_pylist()) == {expect_round}
        assert res.table.drop_columns(["round"]).equals(fresh.table.drop_columns(["round"]))
    # the hook from an earlier table, with a curriculum: the mix of the epoch
    path = tmp_path / "n.parquet"
    mine_to_file(ws, "train", MineConfig(strategy="random", k=3), path)
    sched = Remine(ws, "train", negatives=path, schedule="0:random;2:hardest")
    assert sched.config(0).mix == "random:1" and sched.config(3).mix == "hardest:1"
    assert set(sched(q, epoch=3).table.column("strategy").to_pylist()) == {"hardest"}
    with pytest.raises(UsageError) as e:
        Remine(ws, "train", cfg=cfg, negatives=path)
    assert str(e.value) == "Remine needs the mining config: pass cfg=MineConfig(...) or negatives=TABLE, not both."


def test_remine_closes_the_back_end_it_opened_and_leaves_a_given_one_open(world, tmp_path, monkeypatch):
    """A Ray engine's index (here a stand-in) is released on leaving ``with``; a given back-end is its owner's."""
    import cir_mine.miner.remine as remine_mod
    from cir_mine.miner.core.search.backends import ExactSearch

    ws, g, t = world
    q = t.text_embeddings.copy()

    class Engine(ExactSearch):
        closed = 0

        def close(self):
            Engine.closed += 1

    path = tmp_path / "n.parquet"
    res = mine_to_file(ws, "train", MineConfig(strategy="hardest", k=3), path)
    table = SimpleNamespace(table=res.table, meta={**res.meta, "engine": {"name": "ray", "shard": {}}})
    monkeypatch.setattr(remine_mod, "_engine_index", lambda engine, xb, address: Engine(xb))
    with Remine(ws, "train", negatives=table) as hook:
        hook(q)
        assert isinstance(hook.index(), Engine) and Engine.closed == 0
    assert Engine.closed == 1
    hook(q)  # a closed hook opens its back-end again
    hook.close()
    assert Engine.closed == 2
    given = Engine(g.embeddings)
    with Remine(ws, "train", cfg=MineConfig(strategy="hardest", k=3), index=given) as hook:
        hook(q)
    assert Engine.closed == 2 and hook.index() is given


# ------------------------------------------------------------------------------------------------
# CLIP4Cir lookup


def _fake_negatives(queries, images, k: int = 3, seed: int = 0) -> pa.Table:
    """A negatives-schema table over dataset records: k random other images per query."""
    rng = np.random.default_rng(seed)
    names = [i.image_id for i in images]
    cols = {n: [] for n in NEGATIVES_SCHEMA.names}
    picks = rng.integers(0, len(names), (len(queries), k))
    for q, pick in zip(queries, picks.tolist()):
        for n in (names[j] for j in pick):
            vals = dict(
                query_id=q.query_id,
                ref_id=q.ref_id,
                target_id=q.target_id,
                neg_id=str(n),
                neg_category=q.category,
                strategy="random",
                rank=-1,
                score=0.1,
                target_score=0.5,
                delta=0.4,
                round=0,
                category_match=True,
                attr_overlap=0.0,
                seed=seed,
            )
            for c in cols:
                cols[c].append(vals[c])
    return pa.Table.from_pydict(cols, schema=NEGATIVES_SCHEMA)


def _clip4cir_fashioniq_triplets(root: Path, split: str, dress_types):
    """CLIP4Cir's FashionIQDataset.__init__: the caption files concatenated in dress_types order."""
    triplets = []
    for dress_type in dress_types:
        with open(root / "captions" / f"cap.{dress_type}.{split}.json") as f:
            triplets.extend(json.load(f))
    return triplets


def test_lookup_real_fashioniq_items_in_clip4cir_order():
    from cir_mine.data.fashioniq import load_fashioniq

    root = shared_path("fashion-iq")
    images, queries = load_fashioniq(root, "train", with_tags=False)
    lookup = NegativesLookup(group_negatives_table(_fake_negatives(queries, images)))
    dress_types = ["shirt", "dress", "toptee"]  # CLIP4Cir takes any order
    triplets = _clip4cir_fashioniq_triplets(root, "train", dress_types)
    items = clip4cir_fashioniq_items(root, "train", dress_types)
    assert len(items) == len(triplets) == 18000
    rng = np.random.default_rng(0)
    for i in rng.choice(len(triplets), 300, replace=False).tolist() + [0, len(triplets) - 1]:
        cat, index = items[i]
        pos = lookup.index_fashioniq(cat, index)
        assert (lookup.grouped.ref_ids[pos], lookup.grouped.target_ids[pos]) == (
            triplets[i]["candidate"],
            triplets[i]["target"],
        )
        assert len(lookup.fashioniq(cat, index)) == 3
    with pytest.raises(DataError) as e:
        lookup.fashioniq("dress", 99999)
    assert str(e.value) == (
        "the negatives table: no negatives for FashionIQ item ('dress', 99999) (query id "
        "dress-train-99999): its last 'dress' query is entry 5984 of cap.dress.train.json. The "
        "dataset reads another caption file than the one mined; mine the annotations it reads."
    )


def test_lookup_real_cirr_items():
    from cir_mine.data.cirr import load_cirr

    root = shared_path("cirr")
    images, queries = load_cirr(root, "val")
    lookup = NegativesLookup(group_negatives_table(_fake_negatives(queries, images)))
    caps = json.loads((root / "captions" / "cap.rc2.val.json").read_text())
    for e in caps[:: max(1, len(caps) // 200)]:
        # CLIP4Cir's CIRRDataset('val', 'relative') item: reference_name, target_hard, caption, members
        pos = lookup.index_cirr(e["reference"], e["target_hard"])
        assert lookup.grouped.query_ids[pos] == f"cirr-val-{e['pairid']}"
        assert len(lookup.cirr(e["reference"], e["target_hard"])) == 3
    with pytest.raises(DataError) as e:
        lookup.cirr("dev-x", "dev-y")
    assert str(e.value) == (
        "the negatives table: no query has reference 'dev-x' and target 'dev-y'. Mine the split the dataset reads."
    )


def test_lookup_ambiguous_cirr_pair():
    from tests.fixtures import make_cirr
    from cir_mine.data.cirr import load_cirr
    from dataclasses import replace
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        images, queries = load_cirr(make_cirr(Path(d), images=False), "val")
    twin = replace(queries[1], query_id="cirr-val-9999", ref_id=queries[0].ref_id, target_id=queries[0].target_id)
    lookup = NegativesLookup(group_negatives_table(_fake_negatives(queries + [twin], images)))
    with pytest.raises(DataError) as e:
        lookup.cirr(queries[0].ref_id, queries[0].target_id)
    assert str(e.value) == (
        f"the negatives table: reference '{queries[0].ref_id}' and target '{queries[0].target_id}' "
        f"name 2 queries (cirr-val-1000, cirr-val-9999); look them up by query id."
    )


def test_fiq_proxy_query_ids_index_the_real_caption_files():
    """The shared proxy workspace was embedded from the real annotations: its query ids are the
    (category, index) pairs the lookup reads, entry for entry."""
    import pyarrow.parquet as pq

    work, root = shared_path("fiq-proxy"), shared_path("fashion-iq")
    t = pq.read_table(work / "triplets.train.parquet", columns=["query_id", "ref_id", "target_id"])
    zeros = pa.array(np.zeros(t.num_rows, np.float32))
    table = pa.table(
        {
            "query_id": t.column("query_id"),
            "ref_id": t.column("ref_id"),
            "target_id": t.column("target_id"),
            "neg_id": t.column("target_id"),
            "strategy": t.column("query_id"),
            "score": zeros,
            "delta": zeros,
            "target_score": zeros,
        }
    )
    lookup = NegativesLookup(group_negatives_table(table))
    items = clip4cir_fashioniq_items(root, "train")
    triplets = _clip4cir_fashioniq_triplets(root, "train", ["dress", "toptee", "shirt"])  # combiner_train.py's
    found = 0
    for i, (cat, index) in enumerate(items):
        try:
            pos = lookup.index_fashioniq(cat, index)
        except DataError:
            continue
        found += 1
        assert (lookup.grouped.ref_ids[pos], lookup.grouped.target_ids[pos]) == (
            triplets[i]["candidate"],
            triplets[i]["target"],
        )
    assert found == t.num_rows


def test_grouped_resolves_a_negative_within_its_own_category():
    """With a neg_category column, a negative from another category than the query's resolves there."""
    emb = np.eye(5, dtype=np.float32)
    ws = Workspace.from_arrays(
        emb,
        ["x", "y", "z", "x", "w"],
        categories=["shirt", "shirt", "shirt", "toptee", "toptee"],
        ref_ids=["y"],
        target_ids=["z"],
        text_emb=emb[:1],
        captions=["a"],
        query_categories=["shirt"],
    )
    g, t = ws.load("train")
    table = pa.table(
        {
            "query_id": ["train-000000"] * 2,
            "neg_id": ["x", "x"],
            "neg_category": ["toptee", None],
            "strategy": ["r", "r"],
            "score": pa.array([0.1, 0.2], pa.float32()),
            "delta": pa.array([0.0, 0.0], pa.float32()),
            "target_score": pa.array([0.1, 0.1], pa.float32()),
            "ref_id": ["y", "y"],
            "target_id": ["z", "z"],
        }
    )
    G = group_negatives_table(table, gallery=g, triplets=t)
    assert G.gallery_rows[0].tolist() == [3, 0]  # its own category, else the query's


def test_read_negatives_grouped_uses_the_workspace_it_was_read_with(world, tmp_path):
    ws, g, t = world
    path = tmp_path / "n.parquet"
    res = mine_to_file(ws, "train", MineConfig(strategy="hardest", k=3), path)
    G = read_negatives(path, ws).grouped()
    assert G.query_ids.tolist() == t.query_ids.tolist() and G.gallery_rows is not None
    assert g.image_ids[G.gallery_rows[:, 0]].tolist() == G.neg_ids[:, 0].tolist()
    plain = read_negatives(path).grouped()
    assert plain.gallery_rows is None and plain.neg_ids.tolist() == res.grouped().neg_ids.tolist()
