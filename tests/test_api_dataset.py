"""NegativesDataset: cached features or preprocessed images per query, the same with DataLoader workers."""

import pickle

import numpy as np
import pytest
import torch

from cir_mine import MineConfig, NegativesDataset, Remine, Workspace, collate_negatives, mine_negatives
from cir_mine.data.errors import UsageError
from cir_mine.data.synthetic import SynthConfig, generate
from cir_mine.miner.core.mine import mine_to_file
from tests.fixtures import COLORS, write_png


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    generate(SynthConfig(n_gallery=400, n_triplets=60, dim=16, seed=2), root / "work")
    ws = Workspace(root / "work")
    path = root / "negs.parquet"
    mine_to_file(ws, "train", MineConfig(mix="hardest:0.5,midzone:0.5", k=4, candidates=6, max_candidates=None), path)
    return ws, path


def test_features_per_query(mined):
    ws, path = mined
    g, t = ws.load("train")
    ds = NegativesDataset(ws, path)
    table = {}
    from cir_mine import read_negatives

    for r in read_negatives(path).table.to_pylist():
        table.setdefault(r["query_id"], []).append(r)
    assert len(ds) == len(t) and ds.k == 4
    short = 0
    for i in range(len(ds)):
        it = ds[i]
        rows = table.get(it["query_id"], [])
        assert it["query_id"] == t.query_ids[i]
        assert torch.equal(it["reference"], torch.tensor(g.embeddings[g.row_of[t.ref_ids[i]]]))
        assert torch.equal(it["target"], torch.tensor(g.embeddings[g.row_of[t.target_ids[i]]]))
        assert torch.equal(it["text"], torch.tensor(t.text_embeddings[i]))
        assert it["caption"] == " and ".join(c.strip().rstrip(".") for c in t.captions[i])
        assert it["negative_mask"].tolist() == [True] * len(rows) + [False] * (4 - len(rows))
        want = np.stack([g.embeddings[g.row_of[r["neg_id"]]] for r in rows]) if rows else np.zeros((0, 16), np.float32)
        assert torch.equal(it["negatives"][: len(rows)], torch.from_numpy(want))
        assert (it["negatives"][len(rows) :] == 0).all() and torch.isnan(it["delta"][len(rows) :]).all()
        short += len(rows) < 4
    assert short > 0  # a shallow search leaves short queries: the mask is exercised


def test_dataloader_workers_give_the_same_batches(mined):
    ws, path = mined
    ds = NegativesDataset(ws, path)
    pickle.loads(pickle.dumps(ds))  # spawn-safe
    kw = dict(batch_size=16, shuffle=False, collate_fn=collate_negatives)
    plain = list(torch.utils.data.DataLoader(ds, num_workers=0, **kw))
    workers = list(torch.utils.data.DataLoader(ds, num_workers=2, **kw))
    assert len(plain) == len(workers) == 4
    for a, b in zip(plain, workers):
        assert a["query_id"] == b["query_id"] and a["negatives"].shape == (len(a["query_id"]), 4, 16)
        for key in ("reference", "target", "text", "negatives", "negative_mask"):
            assert torch.equal(a[key], b[key])
        assert torch.equal(torch.isnan(a["delta"]), torch.isnan(b["delta"]))


def test_set_negatives_with_a_remined_table(mined):
    ws, path = mined
    ds = NegativesDataset(ws, path, k=2)
    g, t = ws.load("train")
    q = g.embeddings[g.rows(t.ref_ids.tolist())] + 0.5 * t.text_embeddings  # another "model"'s queries
    res = Remine(ws, "train", negatives=path)(q / np.linalg.norm(q, axis=1, keepdims=True))
    per_query = {}
    for r in res.table.to_pylist():
        per_query.setdefault(r["query_id"], []).append(r["neg_id"])
    i = next(j for j, q in enumerate(t.query_ids.tolist()) if len(per_query.get(q, [])) >= 2)
    before = ds[i]["negatives"].clone()
    ds.set_negatives(res)
    want = torch.tensor(g.embeddings[[g.row_of[x] for x in per_query[t.query_ids[i]][:2]]])
    assert ds.k == 2 and torch.equal(ds[i]["negatives"], want)
    assert not torch.equal(before, ds[i]["negatives"])


def test_tables_of_another_split_or_workspace_are_refused(mined):
    from cir_mine import DataError

    ws, path = mined
    ds = NegativesDataset(ws, path)
    res = mine_negatives(ws, "train", MineConfig(strategy="random", k=2))
    res.meta["split"] = "val"
    with pytest.raises(UsageError) as e:
        ds.set_negatives(res)
    assert str(e.value) == (
        "the negatives table was mined from split 'val', this dataset holds split 'train'; "
        "make a NegativesDataset for that split."
    )
    g, t = ws.load("train")
    other = Workspace.from_arrays(
        g.embeddings,
        g.image_ids,
        ref_ids=t.ref_ids,
        target_ids=t.target_ids,
        text_emb=t.text_embeddings,
        captions=t.captions,
        query_ids=t.query_ids,
    )
    with pytest.raises(DataError, match="mined from another workspace"):
        NegativesDataset(other, path)


@pytest.mark.slow
def test_images_through_an_open_clip_preprocess(tmp_path):
    from open_clip import image_transform

    n, d = 12, 8
    rng = np.random.default_rng(0)
    names = [f"img{i:02d}" for i in range(n)]
    colors = list(COLORS)
    for i, name in enumerate(names):
        write_png(tmp_path / "images" / f"{name}.png", COLORS[colors[i % 4]], size=40, seed=i)
    emb = rng.standard_normal((n, d)).astype(np.float32)
    ws = Workspace.from_arrays(
        emb,
        names,
        paths=[f"images/{x}.png" for x in names],
        ref_ids=names[:4],
        target_ids=names[4:8],
        text_emb=emb[8:12],
        captions=["is red"] * 4,
        normalize=True,
    )
    res = mine_negatives(ws, "train", MineConfig(strategy="random", k=3))
    pre = image_transform(32, is_train=False)
    ds = NegativesDataset(ws, res, preprocess=pre, root=tmp_path)
    batch = collate_negatives([ds[i] for i in range(len(ds))])
    assert batch["reference"].shape == (4, 3, 32, 32) and batch["negatives"].shape == (4, 3, 3, 32, 32)
    from PIL import Image

    first = [r["neg_id"] for r in res.table.to_pylist() if r["query_id"] == "train-000000"]
    want = pre(Image.open(tmp_path / "images" / f"{first[0]}.png").convert("RGB"))
    assert torch.equal(batch["negatives"][0, 0], want)
    assert torch.equal(batch["target"][1], pre(Image.open(tmp_path / "images" / "img05.png").convert("RGB")))
    workers = list(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_negatives))
    assert torch.equal(workers[0]["negatives"], batch["negatives"])
    no_paths = Workspace.from_arrays(
        emb,
        names,
        ref_ids=names[:4],
        target_ids=names[4:8],
        text_emb=emb[8:12],
        captions=["is red"] * 4,
        normalize=True,
    )
    with pytest.raises(UsageError) as e:
        NegativesDataset(
            no_paths, mine_negatives(no_paths, "train", MineConfig(strategy="random", k=3)), preprocess=pre
        )
    assert str(e.value) == (
        "Workspace.from_arrays(split='train') gallery: the gallery has no image paths (column "
        "'path'), so there are no images to preprocess. Drop preprocess= to get cached "
        "embeddings, or embed the images with `cir-mine embed`."
    )
