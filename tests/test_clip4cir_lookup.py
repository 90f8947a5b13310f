"""A CLIP4Cir dataset item finds its own negatives: by its triplet, in any category order, with or
without the workspace; a dataset built from other annotations raises; short queries are empty entries."""

import json

import numpy as np
import pytest

from cir_mine import Clip4CirNegatives, DataError, MineConfig, NegativesLookup, UsageError, clip4cir_fashioniq_items
from cir_mine.data.fashioniq import CLIP4CIR_DRESS_TYPES
from cir_mine.miner.core.mine import mine_to_file
from tests.fixtures import Clip4CirCIRR, Clip4CirFashionIQ, add_twin_query, dataset_workspace, make_cirr, make_fashioniq


@pytest.fixture(scope="module")
def fiq(tmp_path_factory):
    """A FashionIQ-layout folder (with one (candidate, target) pair in two categories), its workspace
    and a table where every fourth query was left without negatives by the guards."""
    d = tmp_path_factory.mktemp("fiq")
    root = make_fashioniq(d / "fiq", n_per_cat=8, images=False)
    add_twin_query(root)
    ws = dataset_workspace(root, d / "work")
    g, t = ws.load("train")
    q = g.embeddings[g.rows(t.ref_ids.tolist(), t.categories.tolist())] + t.text_embeddings
    target = g.embeddings[g.rows(t.target_ids.tolist(), t.categories.tolist())]
    q[::4] = -target[::4]  # s(q, t) = -1: the positive-aware cap removes every candidate
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    path = d / "negs.parquet"
    res = mine_to_file(
        ws, "train", MineConfig(strategy="hardest", k=3, query="checkpoint", device="cpu"), path, query_emb=q
    )
    return root, ws, path, res


def expected_items(root, split, dress_types):
    """(query id, candidate, target) of CLIP4Cir's item i, from the caption files themselves."""
    out = []
    for cat in dress_types:
        caps = json.loads((root / "captions" / f"cap.{cat}.{split}.json").read_text())
        out += [(f"{cat}-{split}-{j:05d}", e["candidate"], e["target"]) for j, e in enumerate(caps)]
    return out


def table_negatives(res, with_category: bool = False) -> dict:
    out = {}
    for r in res.table.to_pylist():
        out.setdefault(r["query_id"], []).append((r["neg_category"], r["neg_id"]) if with_category else r["neg_id"])
    return out


def test_clip4cir_items_default_to_clip4cir_order(fiq):
    root = fiq[0]
    assert CLIP4CIR_DRESS_TYPES == ("dress", "toptee", "shirt")
    items = clip4cir_fashioniq_items(root, "train")
    expect = expected_items(root, "train", ["dress", "toptee", "shirt"])  # combiner_train.py's order
    assert [f"{c}-train-{i:05d}" for c, i in items] == [q for q, _, _ in expect]


@pytest.mark.parametrize("dress_types", [["dress", "toptee", "shirt"], ["shirt", "dress", "toptee"], ["toptee"]])
def test_each_item_gets_its_own_queries_negatives(fiq, dress_types):
    root, ws, path, res = fiq
    ds = Clip4CirFashionIQ(root, "train", dress_types)
    expect = expected_items(root, "train", dress_types)
    negs, cats = table_negatives(res), table_negatives(res, with_category=True)
    g, _ = ws.load("train")
    by_id = Clip4CirNegatives(ds, path, returns="ids")
    feats = Clip4CirNegatives(ds, path, ws=ws)
    rows = Clip4CirNegatives(ds, res, ws=ws, returns="rows")
    assert by_id.query_ids.tolist() == [q for q, _, _ in expect] and len(feats) == len(ds)
    empty = 0
    for i, (qid, cand, tgt) in enumerate(expect):
        want = negs.get(qid, [])
        empty += not want
        ref, target, caps, ids, mask = by_id[i]
        assert (ref, target) == (cand, tgt) and caps == ds.triplets[i]["captions"]
        assert [x for x, m in zip(ids, mask) if m] == want and ids[len(want) :] == ("",) * (3 - len(want))
        assert mask.tolist() == [j < len(want) for j in range(3)]
        *_, f, fmask = feats[i]
        assert f.dtype == np.float32 and f.shape == (3, g.dim) and (fmask == mask).all()
        want_rows = g.rows(want, [c for c, _ in cats.get(qid, [])])  # each negative in its own category
        np.testing.assert_array_equal(f[mask], g.embeddings[want_rows])
        assert not f[~mask].any()
        r, rmask = rows[i][-2:]
        assert r[rmask].tolist() == want_rows.tolist() and (r[~rmask] == -1).all()
        assert cand not in want and tgt not in want
    assert empty > 0  # the guards left some items without negatives


def test_the_twin_pair_resolves_to_each_category(fiq):
    root, ws, path, _ = fiq
    ds = Clip4CirFashionIQ(root, "train", CLIP4CIR_DRESS_TYPES)
    wrapped = Clip4CirNegatives(ds, path, returns="ids")
    first, twin = ds.triplets[0], ds.triplets[7 + 7]  # dress entry 0, toptee's last entry
    assert (first["candidate"], first["target"]) == (twin["candidate"], twin["target"])
    assert wrapped.query_ids[0] == "dress-train-00000" and wrapped.query_ids[14] == "toptee-train-00007"
    lookup = NegativesLookup.read(path)
    with pytest.raises(DataError) as e:
        lookup.index_triplet(first["candidate"], first["target"])
    assert str(e.value) == (
        f"{path}: reference '{first['candidate']}' and target '{first['target']}' name 2 queries "
        f"(dress-train-00000, toptee-train-00007); pass category=."
    )
    assert (
        lookup.grouped.query_ids[lookup.index_triplet(first["candidate"], first["target"], "toptee")]
        == "toptee-train-00007"
    )


def test_short_queries_are_empty_entries_with_or_without_the_workspace(fiq):
    root, ws, path, res = fiq
    empty = res.meta["shortfall"]["without_negatives"]["query_ids"]
    assert empty and res.meta["shortfall"]["without_negatives"]["ref_ids"]
    alone, with_ws = NegativesLookup.read(path), NegativesLookup.read(path, ws)
    negs = table_negatives(res)
    for qid, cand, tgt in expected_items(root, "train", CLIP4CIR_DRESS_TYPES):
        cat, _, idx = qid.split("-")
        assert alone.fashioniq(cat, int(idx)) == with_ws.fashioniq(cat, int(idx)) == negs.get(qid, [])
        assert alone.triplet(cand, tgt, cat) == with_ws.triplet(cand, tgt, cat) == negs.get(qid, [])
    for qid in empty:
        cat, _, idx = qid.split("-")
        assert alone.fashioniq(cat, int(idx)) == []
        assert not alone.grouped.mask[alone.index_fashioniq(cat, int(idx))].any()
    ds = Clip4CirFashionIQ(root, "train", CLIP4CIR_DRESS_TYPES)
    a, b = Clip4CirNegatives(ds, path, returns="ids"), Clip4CirNegatives(ds, path, ws=ws, returns="ids")
    assert (a.mask == b.mask).all() and (a.neg_ids == b.neg_ids).all()
    assert not a.mask[[q in empty for q in a.query_ids]].any()


def test_lookup_messages_name_the_real_cause(fiq):
    root, ws, path, _ = fiq
    lookup = NegativesLookup.read(path)
    cases = {
        ("dress", 99, None): f"{path}: no negatives for FashionIQ item ('dress', 99) (query id dress-train-00099): "
        f"its last 'dress' query is entry 6 of cap.dress.train.json. The dataset reads another "
        f"caption file than the one mined; mine the annotations it reads.",
        ("dress", 2, "val"): f"{path}: no negatives for FashionIQ item ('dress', 2) (query id dress-val-00002): it was "
        f"mined on split train. Mine the split the dataset reads.",
    }
    for (cat, idx, split), text in cases.items():
        with pytest.raises(DataError) as e:
            lookup.fashioniq(cat, idx, split)
        assert str(e.value) == text and "SPLIT" not in str(e.value)
    with pytest.raises(DataError) as e:
        lookup.triplet("B000000003", "B000000001")
    assert str(e.value) == (
        f"{path}: no query has reference 'B000000003' and target 'B000000001' (split 'train', "
        f"22 queries). Mine the split the dataset reads."
    )
    with pytest.raises(DataError) as e:
        lookup.triplet("B000000001", "B000000002", "shirt")
    assert str(e.value) == (
        f"{path}: no query has reference 'B000000001' and target 'B000000002' in category 'shirt': "
        f"the pair is a query of category dress. Pass the item's own category."
    )
    # a table without the list of queries without negatives (mined by an earlier version) says so
    meta = {**lookup.meta, "shortfall": {k: v for k, v in lookup.meta["shortfall"].items() if k != "without_negatives"}}
    from cir_mine import group_negatives_table, read_negatives

    old = NegativesLookup(group_negatives_table(read_negatives(path).table, 3), str(path), meta)
    with pytest.raises(DataError) as e:
        old.fashioniq("dress", 0)
    assert str(e.value) == (
        f"{path}: FashionIQ item ('dress', 0) (query id dress-train-00000) got no negatives, and "
        f"the table (mined by an earlier cir-mine) does not list the queries without negatives. "
        f"Read it with its workspace, NegativesLookup.read(path, ws), where such a query is an "
        f"empty entry, or mine it again."
    )


def test_a_dataset_from_other_annotations_raises(fiq, tmp_path):
    root, ws, path, _ = fiq
    ds = Clip4CirFashionIQ(root, "train", CLIP4CIR_DRESS_TYPES)
    swapped = Clip4CirFashionIQ(root, "train", CLIP4CIR_DRESS_TYPES)
    swapped.triplets[2], swapped.triplets[3] = swapped.triplets[3], swapped.triplets[2]
    with pytest.raises(DataError) as e:
        Clip4CirNegatives(swapped, path, returns="ids")
    assert str(e.value) == (
        f"{path}: item 2 of the dataset (B000000003 -> B000000004) is entry 3 of "
        f"cap.dress.train.json, out of step with the dataset's other 'dress' items. The dataset "
        f"and the table were built from different annotations; mine the annotations the dataset "
        f"reads."
    )
    edited = Clip4CirFashionIQ(root, "train", CLIP4CIR_DRESS_TYPES)
    edited.triplets[4] = {**edited.triplets[4], "target": "B000000007"}
    with pytest.raises(DataError) as e:
        Clip4CirNegatives(edited, path, returns="ids")
    assert str(e.value) == (
        f"{path}: item 4 of the dataset is B000000004 -> B000000007, but query dress-train-00004 "
        f"(entry 4 of cap.dress.train.json) is B000000004 -> B000000005. The dataset and the table "
        f"were built from different annotations; mine the annotations the dataset reads."
    )
    val = Clip4CirFashionIQ(root, "train", ["dress"])
    val.split = "val"
    with pytest.raises(DataError) as e:
        Clip4CirNegatives(val, path, returns="ids")
    assert str(e.value) == f"{path}: mined on split 'train', but the dataset reads split 'val'. Mine split 'val'."
    with pytest.raises(UsageError) as e:
        Clip4CirNegatives(ds, path)
    assert str(e.value) == (
        "returns='features' needs ws=, the workspace the table was mined from (returns='ids' works without it)."
    )
    with pytest.raises(UsageError, match="wraps a CLIP4Cir FashionIQDataset or CIRRDataset"):
        Clip4CirNegatives(object(), path, returns="ids")


def test_cirr_items_are_found_by_pairid(tmp_path):
    root = make_cirr(tmp_path / "cirr", images=False)
    ws = dataset_workspace(root, tmp_path / "work", "cirr", "val")
    path = tmp_path / "n.parquet"
    res = mine_to_file(ws, "val", MineConfig(strategy="hardest", k=2, device="cpu"), path)
    ds = Clip4CirCIRR(root, "val")
    wrapped = Clip4CirNegatives(ds, path, ws=ws, returns="ids")
    negs = table_negatives(res)
    for i, e in enumerate(ds.triplets):
        qid = f"cirr-val-{e['pairid']}"
        assert wrapped.query_ids[i] == qid
        ids, mask = wrapped[i][-2:]
        assert [x for x, m in zip(ids, mask) if m] == negs.get(qid, [])
    ds.triplets[1] = {**ds.triplets[1], "target_hard": ds.triplets[2]["target_hard"]}
    with pytest.raises(DataError, match=r"item 1 of the dataset is .* but query cirr-val-1001 \(pairid 1001\) is"):
        Clip4CirNegatives(ds, path, returns="ids")


def test_the_wrapper_feeds_a_dataloader_and_takes_a_remined_table(fiq):
    import torch

    from cir_mine import Remine

    root, ws, path, res = fiq
    ds = Clip4CirFashionIQ(root, "train", CLIP4CIR_DRESS_TYPES)
    wrapped = Clip4CirNegatives(ds, path, ws=ws)
    loader = torch.utils.data.DataLoader(wrapped, batch_size=5, num_workers=1)
    refs, tgts, caps, negs, mask = next(iter(loader))
    assert negs.shape == (5, 3, 16) and negs.dtype == torch.float32 and mask.dtype == torch.bool
    # re-mined with query embeddings in the dataset's own order, named by the wrapper's query ids
    g, t = ws.load("train")
    rng = np.random.default_rng(1)
    q = rng.standard_normal((len(ds), 16)).astype(np.float32)
    new = Remine(ws, negatives=path)(q, query_ids=wrapped.query_ids)
    wrapped.set_negatives(new)
    negs = table_negatives(new)
    for i, qid in enumerate(wrapped.query_ids.tolist()):
        rows = wrapped.rows[i][wrapped.mask[i]]
        assert g.image_ids[rows].tolist() == negs.get(qid, [])
