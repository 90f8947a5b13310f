"""The training loop and cir-train: resume == uninterrupted, atomic checkpoints, refresh, CLI."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cir_mine.cli import train_app
from cir_mine.data import crash
from cir_mine.data.errors import UsageError
from cir_mine.data.workspace import Workspace
from cir_mine.miner.core.tables import write_negatives
from tests.builders import fake_negatives
from cir_mine.train import checkpoint as ck
from cir_mine.train.data import NegativeBank, dev_split, sample_negatives
from cir_mine.train.loop import TrainConfig, load_query_encoder, train
from cir_mine.miner.core.curriculum import Curriculum

runner = CliRunner()


@pytest.fixture(scope="module")
def negs(synth_work, tmp_path_factory):
    path = tmp_path_factory.mktemp("negs") / "negs.parquet"
    table, meta = fake_negatives(Workspace(synth_work), k=3)
    write_negatives(table, path, meta)
    return path


def cfg(synth_work, out, **kw):
    base = dict(work=str(synth_work), out=str(out), epochs=3, batch_size=64, width=0.5, threads=1)
    return TrainConfig(**{**base, **kw})


def records(run):
    return [
        {k: v for k, v in json.loads(x).items() if k != "train_s"}
        for x in (run / "metrics.jsonl").read_text().splitlines()
    ]


def test_resume_equals_uninterrupted(synth_work, negs, tmp_path, monkeypatch):
    kw = dict(negatives=str(negs), schedule="0:random,1:hardest", online_hard=2, static_bank=1, bank_k=200)
    full = train(cfg(synth_work, tmp_path / "a", **kw))
    crash.reset()
    monkeypatch.setenv(crash.CRASH_ENV, "epoch-saved:2:RAISE")
    with pytest.raises(RuntimeError, match="crash point epoch-saved reached"):
        train(cfg(synth_work, tmp_path / "b", **kw))
    assert len(records(tmp_path / "b")) == 2
    monkeypatch.delenv(crash.CRASH_ENV)
    resumed = train(cfg(synth_work, tmp_path / "b", **kw), resume=True)
    assert records(tmp_path / "a") == records(tmp_path / "b")
    assert full["R@10"] == resumed["R@10"] and full["epochs"] == resumed["epochs"] == 4
    sa, sb = ck.load_checkpoint(tmp_path / "a"), ck.load_checkpoint(tmp_path / "b")
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    ck.save_checkpoint(tmp_path, {"epoch": 1})

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        ck.save_checkpoint(tmp_path, {"epoch": 2})
    assert ck.load_checkpoint(tmp_path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_refresh_writes_rounds_and_logs_stats(synth_work, negs, tmp_path):
    ws = Workspace(synth_work)
    calls = []

    def remine(query_emb, mining_round, epoch):  # Remine's call signature, a MineResult's fields
        calls.append((query_emb.shape, mining_round, epoch))
        table, meta = fake_negatives(ws, query_emb=query_emb, k=3, mining_round=mining_round)
        return SimpleNamespace(table=table, meta=meta)

    train(cfg(synth_work, tmp_path / "r", negatives=str(negs), refresh_every=1, epochs=3), remine=remine)
    assert calls == [((600, 32), 1, 1), ((600, 32), 2, 2)]  # every query of the split, rounds 1, 2
    recs = records(tmp_path / "r")
    stats = recs[0]["refresh"]
    assert stats["round"] == 1 and stats["rows"] > 0
    assert set(stats["delta_quantiles"]) == {"0.1", "0.25", "0.5", "0.75", "0.9"}
    assert 0.0 <= stats["overlap_with_previous"] <= 1.0
    assert (tmp_path / "r" / "negs.round2.parquet").exists()
    assert ck.load_checkpoint(tmp_path / "r")["negatives"].endswith("negs.round2.parquet")


def test_query_encoder_hook_matches_training_model(synth_work, tmp_path):
    train(cfg(synth_work, tmp_path / "q", epochs=1, model="attention"))
    enc = load_query_encoder(tmp_path / "q" / "ckpt.pt")
    ws = Workspace(synth_work)
    g, t = ws.load("train")
    ref = g.embeddings[g.rows(t.ref_ids[:5].tolist(), t.categories[:5].tolist())]
    out = enc(ref, t.text_embeddings[:5])
    assert out.shape == (5, 32) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    assert np.allclose(enc(ref, t.text_embeddings[:5]), out)
    from cir_mine.train.checkpoint import encode_queries

    allq = encode_queries(tmp_path / "q" / "ckpt.pt", synth_work, "train")
    assert allq.shape == (600, 32) and np.allclose(allq[:5], out, atol=1e-6)


def test_sample_negatives_follows_mix_and_share():
    rows = np.array([[1, 2, 3, 4], [5, 6, -1, -1]])
    strategy = np.array([[0, 0, 1, 1], [1, 1, -1, -1]], dtype=np.int16)
    bank = NegativeBank(rows, strategy, ["hardest", "random"], set())
    rng = np.random.default_rng(0)
    picked = sample_negatives(bank, 3, rng, mix={"random": 1.0})
    assert set(picked[0]) == {3, 4, -1} and set(picked[1]) == {5, 6, -1}
    assert (sample_negatives(bank, 2, rng, share=0.0) == -1).all()
    assert set(sample_negatives(bank, 4, rng)[0]) == {1, 2, 3, 4}


def test_category_batches_are_pure(synth_work, tmp_path):
    from cir_mine.train.loop import Trainer

    t = Trainer(cfg(synth_work, tmp_path / "c", category_batches=True, batch_size=50))
    batches = t._batches(np.random.default_rng(0))
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(t.queries)))
    assert all(len(set(t.queries.categories[b].tolist())) == 1 for b in batches)
    assert all(len(b) <= 50 for b in batches) and sum(len(b) < 50 for b in batches) <= 3


def test_schedule_and_dev_split():
    c = Curriculum.parse("0:random;2:midzone:3,random:1;4:hardest")
    assert c.mix_at(1) == {"random": 1.0} and c.mix_at(3) == {"midzone": 0.75, "random": 0.25}
    assert c.mix_at(9) == {"hardest": 1.0}
    with pytest.raises(UsageError, match="must start at epoch 0"):
        Curriculum.parse("1:random")
    from cir_mine.miner.core.strategies import parse_mix
    from cir_mine.miner.core.curriculum import mix_spec

    assert dict(parse_mix(mix_spec(c.mix_at(3)))) == c.mix_at(3)
    tr, dev = dev_split(100, 0.2, 3)
    assert len(dev) == 20 and not set(tr) & set(dev)
    assert np.array_equal(dev, dev_split(100, 0.2, 3)[1])


def test_cli_train_run_and_errors(synth_work, negs, tmp_path):
    out = tmp_path / "run"
    args = [
        "--work",
        str(synth_work),
        "--negatives",
        str(negs),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--width",
        "0.5",
        "--seed",
        "1",
        "-q",
    ]
    r = runner.invoke(train_app, args)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert {"R@10", "R@50", "per_category", "config"} <= set(m) and m["epochs"] == 2
    assert set(m["per_category"]) == {"dress", "shirt", "toptee"}
    assert (out / "curves.png").stat().st_size > 0 and len(records(out)) == 2
    assert "R@10" in r.output and str(out / "metrics.json") in r.output
    r = runner.invoke(train_app, args)
    assert r.exit_code == 2
    assert r.output.strip() == (
        f"Error: {out} already holds a run. Pass --resume {out} to continue it, "
        f"--overwrite to replace it, or choose another --out."
    )
    r = runner.invoke(train_app, ["--resume", str(out), "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(train_app, ["--work", str(synth_work), "--out", str(tmp_path / "z"), "--zero-shot", "-q"])
    assert r.exit_code == 0 and "sum after 0 epoch(s)" in r.output
    r = runner.invoke(train_app, ["--work", str(synth_work), "--out", str(tmp_path / "x"), "--loss", "hinge"])
    assert r.exit_code == 2 and r.output.strip() == "Error: --loss 'hinge': use one of infonce, triplet, both."
    r = runner.invoke(train_app, ["--work", str(synth_work), "--out", str(tmp_path / "y"), "--refresh-every", "2"])
    assert r.exit_code == 2 and "--refresh-every needs --negatives" in r.output


def test_cli_run_directory_is_locked(synth_work, tmp_path):
    from cir_mine.data.io import DirLock

    with DirLock(tmp_path / "run"):
        r = runner.invoke(train_app, ["--work", str(synth_work), "--out", str(tmp_path / "run"), "-q"])
    assert r.exit_code == 1 and "is in use by process" in r.output


def test_cli_negatives_from_another_workspace(synth_work, synth_world, tmp_path):
    other = synth_world(n_gallery=200, n_triplets=20, dim=32, seed=1)
    table, meta = fake_negatives(Workspace(other), k=1)
    write_negatives(table, tmp_path / "n.parquet", meta)
    r = runner.invoke(
        train_app,
        ["--work", str(synth_work), "--negatives", str(tmp_path / "n.parquet"), "--out", str(tmp_path / "run"), "-q"],
    )
    assert r.exit_code == 1 and "mined from another workspace" in r.output
