import numpy as np
import pyarrow.parquet as pq
import pytest

import cir_mine.data.synthetic as synth
from cir_mine.data.errors import UsageError
from cir_mine.data.synthetic import GROUPS, SynthConfig, generate
from cir_mine.data.workspace import Workspace


def test_targets_differ_in_described_groups(synth_work):
    g, t = Workspace(synth_work).load("train")
    ref = g.rows(t.ref_ids)
    tgt = g.rows(t.target_ids)
    n_silent = 0
    for j in range(len(t)):
        ra, ta = dict(a.split(":") for a in g.attributes[ref[j]]), dict(a.split(":") for a in g.attributes[tgt[j]])
        diff = {k for k in GROUPS if ra[k] != ta[k]}
        text = " ".join(t.captions[j])
        described = {k for k in diff if any(synth.phrase(k, ra[k], ta[k], s) in text for s in range(6))}
        assert described, (t.captions[j], ra, ta)
        assert len(diff - described) <= 1
        n_silent += len(diff - described)
        assert g.categories[ref[j]] == g.categories[tgt[j]] == t.categories[j]
    assert 0 < n_silent < 0.3 * len(t)


def test_extra_positives_are_exact_twins(synth_work):
    g, t = Workspace(synth_work).load("train")
    n = 0
    for j in range(len(t)):
        tr = g.rows([t.target_ids[j]])[0]
        for e in t.extra_positive_ids[j]:
            r = g.rows([e])[0]
            assert g.attributes[r] == g.attributes[tr] and g.categories[r] == g.categories[tr] and r != tr
            n += 1
    assert n > 0


def test_deterministic_and_chunk_independent(tmp_path, monkeypatch):
    cfg = SynthConfig(n_gallery=500, n_triplets=100, dim=16, seed=3)
    generate(cfg, tmp_path / "a")
    generate(cfg, tmp_path / "b")
    for name in ("gallery.train.parquet", "triplets.train.parquet"):
        assert pq.read_table(tmp_path / "a" / name).equals(pq.read_table(tmp_path / "b" / name))
    generate(SynthConfig(n_gallery=500, n_triplets=100, dim=16, seed=4), tmp_path / "c")
    assert not pq.read_table(tmp_path / "a" / "gallery.train.parquet").equals(
        pq.read_table(tmp_path / "c" / "gallery.train.parquet")
    )


def test_val_split_shares_the_world(tmp_path):
    generate(SynthConfig(n_gallery=400, n_triplets=50, dim=16, seed=1, split="train"), tmp_path)
    generate(SynthConfig(n_gallery=400, n_triplets=50, dim=16, seed=1, split="val"), tmp_path)
    ws = Workspace(tmp_path)
    assert ws.splits() == ["train", "val"]
    assert ws.manifest()["counts"] == {
        "gallery.train": 400,
        "gallery.val": 400,
        "triplets.train": 50,
        "triplets.val": 50,
    }
    assert set(ws.gallery("train").image_ids).isdisjoint(ws.gallery("val").image_ids)


def test_zero_shot_is_informative_but_not_solved(synth_work):
    g, t = Workspace(synth_work).load("train")
    q = g.embeddings[g.rows(t.ref_ids)] + t.text_embeddings
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    s = q @ g.embeddings.T
    ts = s[np.arange(len(t)), g.rows(t.target_ids)]
    rank = (s > ts[:, None]).sum(1)
    r10 = (rank < 10).mean()
    assert 0.1 < r10 < 0.9


def test_bad_config():
    with pytest.raises(UsageError, match=r"^n_triplets \(600\) must be at most half of n_gallery \(1000\)"):
        SynthConfig(n_gallery=1000, n_triplets=600).validate()


def test_chunked_gallery(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "CHUNK", 128)
    generate(SynthConfig(n_gallery=1000, n_triplets=10, dim=16, seed=2), tmp_path)
    f = pq.ParquetFile(tmp_path / "gallery.train.parquet")
    assert f.metadata.num_row_groups >= 8 and f.metadata.num_rows == 1000
    Workspace(tmp_path).load("train")
