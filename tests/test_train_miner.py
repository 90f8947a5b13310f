"""cir-train with the real miner: refresh re-mines with the table's config; the checkpoint hook."""

import json

import pyarrow.parquet as pq
from typer.testing import CliRunner

from cir_mine.cli import mine_app, train_app
from cir_mine.miner.core.tables import read_negatives

runner = CliRunner()


def test_refresh_with_the_miner_and_checkpoint_queries(synth_work, tmp_path):
    negs = tmp_path / "negs.parquet"
    r = runner.invoke(
        mine_app,
        [
            "negatives",
            "--work",
            str(synth_work),
            "--mix",
            "random:0.5,midzone:0.5",
            "-k",
            "4",
            "--out",
            str(negs),
            "--device",
            "cpu",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    run = tmp_path / "run"
    r = runner.invoke(
        train_app,
        [
            "--work",
            str(synth_work),
            "--negatives",
            str(negs),
            "--out",
            str(run),
            "--epochs",
            "3",
            "--batch-size",
            "64",
            "--width",
            "0.5",
            "--refresh-every",
            "1",
            "--schedule",
            "0:random;2:midzone:0.5,hardest:0.5",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    base = read_negatives(negs).config
    r1, r2 = read_negatives(run / "negs.round1.parquet"), read_negatives(run / "negs.round2.parquet")
    # same config as the table except the query source and the mix the schedule names at that epoch
    for t, mix in ((r1, "random:1"), (r2, "midzone:0.5,hardest:0.5")):
        cfg = t.config
        assert cfg["query"] == "checkpoint" and cfg["mix"] == mix
        assert {k: v for k, v in cfg.items() if k not in ("query", "mix", "strategy", "schedule")} == {
            k: v for k, v in base.items() if k not in ("query", "mix", "strategy", "schedule")
        }
        assert t.meta["query_source"] == "provided"
    assert set(pq.read_table(run / "negs.round1.parquet").column("round").to_pylist()) == {1}
    assert set(pq.read_table(run / "negs.round2.parquet").column("strategy").to_pylist()) == {"midzone", "hardest"}
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x.get("refresh", {}).get("round") for x in recs] == [1, 2, None]

    out = tmp_path / "ckpt-negs.parquet"
    r = runner.invoke(
        mine_app,
        [
            "negatives",
            "--work",
            str(synth_work),
            "--strategy",
            "hardest",
            "-k",
            "2",
            "--checkpoint",
            str(run / "ckpt.pt"),
            "--out",
            str(out),
            "--device",
            "cpu",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    assert read_negatives(out).meta["query_source"] == "provided"


def test_demo_library_small(tmp_path):
    from cir_mine.train.demo import DemoConfig, run_demo

    said = []
    res = run_demo(
        tmp_path / "demo",
        DemoConfig(n_gallery=800, n_triplets=200, dim=16, epochs=1, batch_size=32, world="coarse"),
        on_step=said.append,
    )
    assert list(res.runs) == ["zero-shot", "in-batch", "random", "midzone", "attribute-mismatch"]
    assert all((r["dir"] / "metrics.json").exists() and 0 <= r["R@10"] <= r["R@50"] <= 100 for r in res.runs.values())
    assert all(p.exists() for p in res.tables.values()) and len(said) == 1 + 3 + 5
    assert (
        res.runs["zero-shot"]["R@10"] == json.loads((res.runs["zero-shot"]["dir"] / "metrics.json").read_text())["R@10"]
    )


def test_refresh_reads_the_split_once_and_equals_a_fresh_mine(synth_work, tmp_path, monkeypatch):
    """Every round reuses the split read at the first round; each round's table equals the miner's
    own from a fresh read with the same query embeddings."""
    import numpy as np

    from cir_mine.data.workspace import Workspace
    from cir_mine.miner.core.mine import MineConfig, mine_negatives, mine_to_file
    from cir_mine.miner.remine import Remine

    negs = tmp_path / "negs.parquet"
    mine_to_file(Workspace(synth_work), "train", MineConfig.of(strategy="hardest", k=3, device="cpu"), negs)
    reads = []
    real_load = Workspace.load
    monkeypatch.setattr(Workspace, "load", lambda self, split: reads.append(split) or real_load(self, split))
    remine = Remine(Workspace(synth_work), "train", negatives=negs, device="cpu")
    _, t = real_load(Workspace(synth_work), "train")
    rng = np.random.default_rng(0)
    for r in (1, 2):
        q = rng.standard_normal(t.text_embeddings.shape).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        table = remine(q, mining_round=r, epoch=r).table
        cfg = MineConfig.from_dict({**read_negatives(negs).config, "query": "checkpoint"})
        fresh = mine_negatives(Workspace(synth_work), "train", cfg, query_emb=q, mining_round=r).table
        assert table.equals(fresh)
    assert reads.count("train") == 1 + 2  # the remine's one read + the two fresh mines


def test_demo_fine_world_small(tmp_path):
    from cir_mine.train.demo import DemoConfig, run_demo

    cfg = DemoConfig(n_gallery=900, n_triplets=200, dim=16, epochs=2)  # the default world: fine
    synth, strategies, train_opts = cfg.resolve()
    assert synth.item_noise == 1.0 and synth.salience["neckline"] == 0.3 and synth.salience["color"] == 1.0
    assert strategies == ("random", "midzone", "attribute-mismatch", "hardest+refresh", "dqe+hardest+refresh")
    assert train_opts == {"batch_size": 128, "category_batches": True}
    res = run_demo(tmp_path / "demo", cfg)
    assert list(res.runs) == ["zero-shot", "in-batch", *strategies]
    assert sorted(res.tables) == ["attribute-mismatch", "hardest", "midzone", "random"]
    # the +refresh runs re-mined once, halfway, with the model being trained; the others never
    for name, r in res.runs.items():
        assert (r["dir"] / "negs.round1.parquet").exists() == name.endswith("+refresh")
        config = json.loads((r["dir"] / "metrics.json").read_text())["config"]
        assert (config["model"], config["attr_heads"]) == (
            ("dqe", "groups") if name.startswith("dqe+") else ("combiner", None)
        )


def test_demo_unknown_world(tmp_path):
    r = runner.invoke(mine_app, ["demo", "--out", str(tmp_path / "d"), "--world", "coarse-grained"])
    assert r.exit_code == 2
    assert r.output.strip() == "Error: --world 'coarse-grained': use one of fine, coarse."
    assert not (tmp_path / "d").exists()
